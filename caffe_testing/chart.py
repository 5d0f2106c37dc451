"""The Helm chart under test: real Helm (helm-sdkpy, the Helm Go library) against kmock's emulator.

    from caffe_testing.chart import helm_cluster, helm_install, helm_lint, rendered_objects

    with helm_cluster() as cluster:                       # caffe_testing.cluster.Cluster, Helm-ready
        release = helm_install(cluster, "cs", "caffe-system", {"watch": {"scope": "namespace"}})
        objects = rendered_objects(release)               # every object Helm rendered and created

Two facts shape this module:
- Helm picks its release storage from HELM_DRIVER when its Go runtime starts, and a Go library
  loaded into Python sees only the environment the process started with. The default storage
  (Secrets) speaks protobuf, which the emulator does not; the memory driver keeps releases in the
  process. So every Helm call runs in a child process (this file run as a script) started with
  HELM_DRIVER=memory; that also keeps the Go runtime out of pytest's process.
- kmock 0.8 answers the core group's discovery (`GET /api/v1`) with groupVersion "/v1"; Helm's
  REST mapper then knows no core kind ("no matches for kind ServiceAccount in version v1").
  `HelmApiServer` answers "v1", as a real API server does.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "caffe-serving"


class HelmError(AssertionError):
    """Helm refused (the message is Helm's own)."""


# --------------------------------------------------------------------------------------------
# The emulator, as Helm needs it
# --------------------------------------------------------------------------------------------
def _helm_api_server_class():
    from caffe_testing import cluster as k8s

    class HelmApiServer(k8s.ApiServer):
        """k8s.ApiServer whose core discovery document says groupVersion "v1"."""

        async def _serve_version(self, request):
            doc = await super()._serve_version(request)
            if isinstance(doc, dict) and isinstance(doc.get("groupVersion"), str):
                doc["groupVersion"] = doc["groupVersion"].lstrip("/")
            return doc

    return HelmApiServer


@contextlib.contextmanager
def helm_cluster() -> Iterator[Any]:
    """A started `k8s.Cluster` whose emulator Helm can install into."""
    from caffe_testing import cluster as k8s

    cluster = k8s.Cluster()
    # Cluster.start() builds its emulator from the module's `ApiServer` name inside its own thread
    # and returns once it serves: rebind the name for that call only.
    original = k8s.ApiServer
    k8s.ApiServer = _helm_api_server_class()
    try:
        cluster.start()
    finally:
        k8s.ApiServer = original
    try:
        core = cluster.request("GET", "/api/v1")["groupVersion"]
        assert core == "v1", f"the emulator's core discovery says groupVersion {core!r}: Helm would find no core kinds"
        yield cluster
    finally:
        cluster.stop()


# --------------------------------------------------------------------------------------------
# Helm calls (each in a child process; see the module docstring)
# --------------------------------------------------------------------------------------------
def _run_helm(request: dict[str, Any], timeout: float = 180, driver: str = "memory") -> dict[str, Any]:
    """One Helm action in a child process with HELM_DRIVER=`driver` ("memory" for the emulator;
    "secret", Helm's default, against a real API server)."""
    import importlib.util

    if importlib.util.find_spec("helm_sdkpy") is None:
        raise RuntimeError("the Helm library is not installed: "
                           f"{sys.executable} -m pip install --ignore-requires-python helm-sdkpy  (make setup does it)")
    env = dict(os.environ, HELM_DRIVER=driver)
    proc = subprocess.run([sys.executable, __file__], input=json.dumps(request), capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"helm child process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    answer = json.loads(proc.stdout)
    if "error" in answer:
        raise HelmError(answer["error"])
    return answer["result"]


def helm_lint(chart: Path = CHART) -> dict[str, Any]:
    """Helm's lint result: {"Messages": [{"Severity": 1 info | 2 warning | 3 error, "Path": ...}], ...}."""
    return _run_helm({"action": "lint", "chart": str(chart)})


def helm_install(cluster, release: str, namespace: str, values: dict[str, Any] | None = None,
                 chart: Path = CHART, kubeconfig: Path | None = None, *, real: bool = False,
                 wait: bool = False) -> dict[str, Any]:
    """`helm install RELEASE CHART -n NAMESPACE --values ...`. Returns Helm's release (manifest, notes, ...).

    Into the emulator (default): memory storage, no namespace creation, no OpenAPI validation, no
    --wait (it has no controllers). `real=True` (a real API server, controlplane.py): Helm's default
    storage (a Secret per release revision), --create-namespace, the server's OpenAPI validation,
    and `wait` as `helm install --wait`."""
    return _run_helm({"action": "install", "chart": str(chart), "release": release, "namespace": namespace,
                      "values": values or {}, "kubeconfig": str(kubeconfig or cluster.kubeconfig),
                      "real": real, "wait": wait}, driver="secret" if real else "memory")


def helm_uninstall(cluster, release: str, namespace: str, kubeconfig: Path | None = None,
                   wait: bool = True) -> dict[str, Any]:
    """`helm uninstall RELEASE -n NAMESPACE [--wait]` from a real API server (Helm's Secret storage)."""
    return _run_helm({"action": "uninstall", "release": release, "namespace": namespace, "wait": wait,
                      "kubeconfig": str(kubeconfig or cluster.kubeconfig)}, driver="secret")


def rendered_objects(release: dict[str, Any]) -> list[dict[str, Any]]:
    """The objects of a release's manifest (templates/), in Helm's install order."""
    return [doc for doc in yaml.safe_load_all(release["manifest"]) if doc]


def chart_crds(chart: Path = CHART) -> list[dict[str, Any]]:
    """The CRDs Helm installs from the chart's crds/ folder (before any template)."""
    out = []
    for path in sorted((chart / "crds").glob("*.yaml")):
        out += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


# --------------------------------------------------------------------------------------------
# Pod Security "restricted"
# --------------------------------------------------------------------------------------------
ALLOWED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                        "projected", "secret"}


def restricted_violations(pod_spec: dict[str, Any]) -> list[str]:
    """Why a pod spec fails the Pod Security Standard "restricted" profile (plus a read-only root
    filesystem, which we ask of every container); [] when it passes."""
    out = []
    pod_sc = pod_spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(flag):
            out.append(f"pod sets {flag}")
    for volume in pod_spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUME_TYPES:
            out.append(f"volume {volume['name']} is of type {sorted(kinds)}")
    for c in (pod_spec.get("initContainers") or []) + (pod_spec.get("containers") or []):
        sc = c.get("securityContext") or {}
        name = c["name"]
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
            out.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            out.append(f"{name}: runs as uid 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile is {seccomp!r}")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities {caps['add']}")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: root filesystem is writable")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{name}: uses hostPort {port['hostPort']}")
    return out


# --------------------------------------------------------------------------------------------
# The child process
# --------------------------------------------------------------------------------------------
def _child() -> int:
    import asyncio

    import helm_sdkpy

    request = json.loads(sys.stdin.read())
    try:
        if request["action"] == "lint":
            result = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(request["chart"]))
        elif request["action"] == "install":
            config = helm_sdkpy.Configuration(namespace=request["namespace"], kubeconfig=request["kubeconfig"])
            # create_namespace stays off: Helm validates that Namespace against the server's OpenAPI
            # document, which the emulator does not serve (and the emulator needs no namespaces).
            real = bool(request.get("real"))
            result = asyncio.run(helm_sdkpy.Install(config).run(
                request["release"], request["chart"], values=request["values"], wait=bool(request.get("wait")),
                create_namespace=real, timeout=150, disable_openapi_validation=not real))
        elif request["action"] == "uninstall":
            config = helm_sdkpy.Configuration(namespace=request["namespace"], kubeconfig=request["kubeconfig"])
            result = asyncio.run(helm_sdkpy.Uninstall(config).run(request["release"], wait=request["wait"], timeout=120))
        else:
            raise ValueError(f"unknown action {request['action']!r}")
    except helm_sdkpy.HelmError as e:
        print(json.dumps({"error": str(e)}))
        return 0
    print(json.dumps({"result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(_child())

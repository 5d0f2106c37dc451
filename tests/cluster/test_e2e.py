"""End to end on one machine: helm install → kubectl apply → operator → gateway → pycaffe.

1. The chart is installed with the real Helm library into kmock's Kubernetes emulator; lint is
   clean and every object it created passes kubernetes-validate.
2. The operator runs exactly as the chart's Deployment says (command, args, env), as a process.
3. Real kubectl applies examples/digits/service.yaml; the operator creates the children.
4. The test plays the kubelet (caffe_testing/kubelet.py): real `caffeserve serve` processes from the
   generated pod template and ConfigMap, one per replica, the PersistentVolumeClaim being the
   example's folder; it publishes their EndpointSlices as the EndpointSlice controller would and
   reports the Deployment's status as the Deployment controller would. The gateway replicas run as
   the chart's gateway Deployment says and find the pods through their EndpointSlices.
5. tritonclient and a plain JSON request through the gateway get the right digits from pycaffe;
   the CaffeModelService turns Ready with the gateway URL. A second model with a canary and
   autoscaling gets its canary children and a KEDA ScaledObject, deleted when the spec drops them.
6. Least privilege, from the emulator's request log: each component talks to the API with its own
   ServiceAccount's token; every request it made is allowed by the RBAC objects the chart created,
   and every permission those grant was used.

The one stand-in for a cluster: each component gets its ServiceAccount's credentials from a
`--kubeconfig` file (a token naming the ServiceAccount) instead of the token Kubernetes mounts
into the pod. Everything else is the chart's and the operator's own output.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml

from caffe_operator import manifests
from caffe_testing.chart import chart_crds, helm_cluster, helm_install, helm_lint, rendered_objects, restricted_violations
from caffe_testing.digits import DIGITS_DIR, digits_data
from caffe_testing.grpc import OIPClient, infer_request, output
from caffe_testing.cluster import CMS, CONFIGMAPS, DEPLOYMENTS, REPO, SERVICES, Cluster, resource_path
from caffe_testing.keda import SCALEDOBJECT_CRD, SCALEDOBJECTS, unknown_fields
from caffe_testing.kubelet import ContainerProcess, endpoint_slice
from caffe_testing.rbac import (
    Attributes,
    Grant,
    authenticated_defaults,
    grants_for,
    request_attributes,
    rule_allows,
    unused_permissions,
)

RELEASE, NAMESPACE = "cs", "caffe-system"
PREFIX = f"{RELEASE}-caffe-serving"
MODEL_NS, MODEL = "ml", "digits"
SERVICE_ACCOUNTS = {"operator": f"{PREFIX}-operator", "gateway": f"{PREFIX}-gateway"}
RBAC_KINDS = {"ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings",
              "Role": "roles", "RoleBinding": "rolebindings"}

pytestmark = pytest.mark.timeout(240)


def token_of(component: str) -> str:
    """The bearer token each component presents: it names its ServiceAccount, as a projected
    service-account token's subject does."""
    return f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNTS[component]}"


def kubeconfig_for(cluster: Cluster, component: str) -> Path:
    path = cluster.workdir / f"kubeconfig-{component}"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": component,
        "clusters": [{"name": "kmock", "cluster": {"server": cluster.url}}],
        "users": [{"name": component, "user": {"token": token_of(component)}}],
        "contexts": [{"name": component, "context": {"cluster": "kmock", "user": component, "namespace": NAMESPACE}}],
    }))
    return path


def http_json(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def ready_condition(cr: dict[str, Any] | None) -> dict[str, Any]:
    for c in ((cr or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == "Ready":
            return c
    return {}


class Flow:
    """What the steps built, for the tests below to look at."""

    scope: str
    cluster: Cluster
    release: dict[str, Any]
    operator: ContainerProcess
    gateways: list[ContainerProcess]
    servers: list[ContainerProcess]
    timings: dict[str, float]


SCOPES = {  # the chart's two RBAC shapes: its default, and one watched namespace (NetworkPolicies on,
    # so that the operator's NetworkPolicy per model is in the request log the RBAC tests read)
    "cluster": {"networkPolicy": {"enabled": True}},
    "namespace": {"watch": {"scope": "namespace", "namespace": MODEL_NS}, "networkPolicy": {"enabled": True}},
}


@pytest.fixture(scope="module", params=sorted(SCOPES))
def flow(request):
    f = Flow()
    f.scope = request.param
    f.timings = {}
    start = time.monotonic()
    with helm_cluster() as cluster, contextlib.ExitStack() as processes:
        f.cluster = cluster
        # 1. helm install
        f.release = helm_install(cluster, RELEASE, NAMESPACE, SCOPES[f.scope])
        f.timings["helm install"] = time.monotonic() - start

        # 2. the operator, as its Deployment says
        operator_dep = cluster.get_object(DEPLOYMENTS, NAMESPACE, f"{PREFIX}-operator")
        f.operator = ContainerProcess(operator_dep["spec"]["template"], "operator", namespace=NAMESPACE,
                                      pod_name=f"{PREFIX}-operator-5d8c7b9f4-x2k8q", workdir=cluster.workdir,
                                      extra_args=["--kubeconfig", str(kubeconfig_for(cluster, "operator"))])
        processes.enter_context(f.operator)
        f.operator.wait("livenessProbe", timeout=60)
        f.timings["operator live"] = time.monotonic() - start

        # The gateway replicas, as their Deployment says, before any model exists: they must
        # find the pods by watching, not by a lucky first list.
        gateway_dep = cluster.get_object(DEPLOYMENTS, NAMESPACE, f"{PREFIX}-gateway")
        f.gateways = []
        for i in range(gateway_dep["spec"]["replicas"]):
            gw = ContainerProcess(gateway_dep["spec"]["template"], "gateway", namespace=NAMESPACE,
                                  pod_name=f"{PREFIX}-gateway-7f6d5c4b3-g{i}x0z", workdir=cluster.workdir,
                                  extra_args=["--kubeconfig", str(kubeconfig_for(cluster, "gateway"))])
            processes.enter_context(gw)
            f.gateways.append(gw)
        for gw in f.gateways:
            gw.wait("readinessProbe", timeout=60)
        f.timings["gateways ready"] = time.monotonic() - start

        # 3. kubectl apply the digits example
        cluster.kubectl("apply", "--validate=false", "-n", MODEL_NS, "-f", str(REPO / "examples/digits/service.yaml"))
        dep = cluster.wait_for(lambda: cluster.get_object(DEPLOYMENTS, MODEL_NS, f"{MODEL}-predictor"),
                               timeout=60, what="the operator's Deployment")
        svc = cluster.wait_for(lambda: cluster.get_object(SERVICES, MODEL_NS, f"{MODEL}-predictor"),
                               timeout=30, what="the operator's Service")
        f.timings["children created"] = time.monotonic() - start

        # 4. the kubelet: one server process per replica, from the pod template
        template = dep["spec"]["template"]
        pod_hash = template["metadata"]["annotations"][manifests.CONFIG_HASH_ANNOTATION][:10]
        f.servers = []
        for i in range(dep["spec"]["replicas"]):
            server = ContainerProcess(template, "server", namespace=MODEL_NS, pod_name=f"{MODEL}-predictor-{pod_hash}-p{i}0q",
                                      workdir=cluster.workdir, cluster=cluster, pvcs={"digits-model": DIGITS_DIR})
            processes.enter_context(server)
            f.servers.append(server)
        for server in f.servers:
            server.wait("readinessProbe", timeout=120)
        f.timings["servers ready"] = time.monotonic() - start
        for server in f.servers:  # the EndpointSlice controller: a ready pod behind the Service
            cluster.create("discovery.k8s.io/v1/endpointslices", MODEL_NS, endpoint_slice(
                svc, server.pod_name, "127.0.0.1", [{"name": "http", "port": server.port("http"), "protocol": "TCP"},
                                                    {"name": "grpc", "port": server.port("grpc"), "protocol": "TCP"}]))
        n = len(f.servers)  # the Deployment controller: every replica updated, ready and available
        cluster.patch(DEPLOYMENTS, MODEL_NS, f"{MODEL}-predictor", {"status": {
            "observedGeneration": dep["metadata"]["generation"], "replicas": n, "updatedReplicas": n,
            "readyReplicas": n, "availableReplicas": n,
            "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                           {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}}, sub="status")
        for gw in f.gateways:
            cluster.wait_for(lambda: http_json("GET", f"http://127.0.0.1:{gw.port('http')}/v2/models/{MODEL}/ready")[0] == 200,
                             timeout=30, what=f"{gw.pod_name} routing {MODEL}")
        f.timings["gateways route"] = time.monotonic() - start
        yield f
        f.timings["total"] = time.monotonic() - start
        print(f"\ne2e ({f.scope} scope) timings, s from start:", {k: round(v, 1) for k, v in f.timings.items()})


def on_failure_logs(f: Flow) -> str:
    parts = [f"--- {p.pod_name}\n{p.logs()}" for p in [f.operator, *f.gateways, *f.servers]]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# 1. helm install
# --------------------------------------------------------------------------------------------
def test_1_chart_is_lint_clean_and_installed_objects_are_valid(flow):
    assert not helm_lint()["Messages"]
    objects = rendered_objects(flow.release) + chart_crds()
    rbac = {"ClusterRole", "ClusterRoleBinding"} if flow.scope == "cluster" else {"Role", "RoleBinding"}
    assert {o["kind"] for o in objects} == {"CustomResourceDefinition", "ServiceAccount", "Deployment", "Service",
                                                  "PodDisruptionBudget", "NetworkPolicy"} | rbac
    for obj in objects:
        path = resource_path(_resource(obj), obj["metadata"].get("namespace"), obj["metadata"]["name"])
        stored = flow.cluster.request("GET", path)
        assert stored["metadata"]["name"] == obj["metadata"]["name"]
        kubernetes_validate.validate({k: v for k, v in stored.items() if k != "status"},
                                     kubernetes_validate.utils.latest_version(), strict=True)


def _resource(obj: dict[str, Any]) -> str:
    plural = {"ServiceAccount": "serviceaccounts", "Service": "services", "Deployment": "deployments",
              "CustomResourceDefinition": "customresourcedefinitions", "PodDisruptionBudget": "poddisruptionbudgets",
              "NetworkPolicy": "networkpolicies",
              **RBAC_KINDS}[obj["kind"]]
    return f"{obj['apiVersion']}/{plural}"


# --------------------------------------------------------------------------------------------
# 2, 3. the operator, as the chart runs it, makes the children
# --------------------------------------------------------------------------------------------
def test_2_operator_runs_the_charts_command(flow):
    scope = ["--all-namespaces"] if flow.scope == "cluster" else ["--namespace", MODEL_NS]
    assert flow.operator.argv[1:] == ["operator", *scope, "--liveness",
                                      f"http://127.0.0.1:{flow.operator.port('health')}/healthz",
                                      "--kubeconfig", str(flow.cluster.workdir / "kubeconfig-operator")]
    assert flow.operator.env["POD_NAMESPACE"] == NAMESPACE
    assert flow.operator.proc.poll() is None, on_failure_logs(flow)


def test_3_kubectl_apply_makes_the_children_with_the_charts_server_image(flow):
    cluster = flow.cluster
    cr = cluster.get_object(CMS, MODEL_NS, MODEL)
    dep = cluster.get_object(DEPLOYMENTS, MODEL_NS, f"{MODEL}-predictor")
    cm = cluster.get_object(CONFIGMAPS, MODEL_NS, f"{MODEL}-config")
    svc = cluster.get_object(SERVICES, MODEL_NS, f"{MODEL}-predictor")
    for child in (dep, cm, svc):
        assert child["metadata"]["labels"][manifests.MODEL_LABEL] == MODEL
        assert child["metadata"]["ownerReferences"][0]["uid"] == cr["metadata"]["uid"]
    (server,) = dep["spec"]["template"]["spec"]["containers"]
    operator_env = {e["name"]: e.get("value") for e in cluster.get_object(
        DEPLOYMENTS, NAMESPACE, f"{PREFIX}-operator")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert server["image"] == operator_env["CAFFESERVE_SERVER_IMAGE"] == f"ghcr.io/caffe-serving/caffe-server-gpu:{flow.release['chart']['metadata']['appVersion']}"
    assert server["command"] == manifests.SERVE_COMMAND + manifests.GRPC_ARGS
    assert restricted_violations(dep["spec"]["template"]["spec"]) == []
    assert svc["spec"]["ports"][0]["name"] == "http" and svc["spec"]["ports"][0]["port"] == 8080
    assert svc["spec"]["ports"][1]["name"] == "grpc" and svc["spec"]["ports"][1]["appProtocol"] == "grpc"


def test_3_model_pods_get_a_network_policy_letting_in_the_gateway_and_the_operator(flow):
    """networkPolicy.enabled covers the model pods: the operator makes one NetworkPolicy per model."""
    cluster = flow.cluster
    policy = cluster.get_object("networking.k8s.io/v1/networkpolicies", MODEL_NS, f"{MODEL}-predictor")
    assert policy is not None and policy["metadata"]["ownerReferences"][0]["kind"] == "CaffeModelService"
    assert policy["spec"]["podSelector"] == {"matchLabels": {manifests.MODEL_LABEL: MODEL}}
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}, {"port": 8081, "protocol": "TCP"}]  # http, grpc
    components = {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in rule["from"]}
    assert components == {"gateway", "operator"}
    assert all(p["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}} for p in rule["from"])
    kubernetes_validate.validate({k: v for k, v in policy.items() if k != "status"},
                                 kubernetes_validate.utils.latest_version(), strict=True)


# --------------------------------------------------------------------------------------------
# 4. pods from the template, found by the gateway
# --------------------------------------------------------------------------------------------
def test_4_model_pods_run_the_generated_template_and_config(flow):
    cm = flow.cluster.get_object(CONFIGMAPS, MODEL_NS, f"{MODEL}-config")
    generated = yaml.safe_load(cm["data"]["config.yaml"])
    assert generated["model"]["prototxt"] == "/models/deploy.prototxt"
    for server in flow.servers:
        assert server.argv[1:] == ["serve", "--config", str(server.mounts["/etc/caffeserve"] / "config.yaml"),
                                   "--host", "127.0.0.1", "--port", str(server.port("http")),
                                   "--grpc-port", str(server.port("grpc")), *manifests.SERVE_ARGS]
        mounted = yaml.safe_load((server.mounts["/etc/caffeserve"] / "config.yaml").read_text())
        # the same config, its /models paths pointing at the claim's folder (examples/digits)
        assert mounted["model"]["prototxt"] == str(DIGITS_DIR / "deploy.prototxt")
        assert {k: v for k, v in mounted.items() if k != "model"} == {k: v for k, v in generated.items() if k != "model"}
        status, meta = http_json("GET", f"http://127.0.0.1:{server.port('http')}/v2/models/{MODEL}")
        assert status == 200 and meta["name"] == MODEL


def test_4_gateways_discover_the_pods_through_endpointslices(flow):
    for gw in flow.gateways:
        status, body = http_json("GET", f"http://127.0.0.1:{gw.port('http')}/v2/models")
        assert status == 200 and body == {"models": [MODEL]}
        status, index = http_json("POST", f"http://127.0.0.1:{gw.port('http')}/v2/repository/index", {})
        assert index == [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]


# --------------------------------------------------------------------------------------------
# 5. a real client call through the gateway; status Ready
# --------------------------------------------------------------------------------------------
def one_digit_per_class() -> tuple[list[np.ndarray], list[int]]:
    images, labels = digits_data.held_out()
    picks = [int(np.flatnonzero(labels == d)[0]) for d in range(10)]
    return [images[i] for i in picks], [int(labels[i]) for i in picks]


@pytest.mark.parametrize("replica", [0, 1])
def test_5_tritonclient_through_the_gateway_reads_the_digits(flow, replica):
    images, labels = one_digit_per_class()
    gw = flow.gateways[replica]
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{gw.port('http')}")
    try:
        assert client.is_model_ready(MODEL)
        inp = httpclient.InferInput("data", [len(images)], "BYTES")
        inp.set_data_from_numpy(np.array([digits_data.render_png(im, size=28) for im in images], dtype=object),
                                binary_data=True)
        result = client.infer(MODEL, [inp], outputs=[httpclient.InferRequestedOutput("prob", class_count=1)])
        answers = [(a.decode() if isinstance(a, bytes) else a).split(":") for a in result.as_numpy("prob").reshape(-1)]
    finally:
        client.close()
    assert [int(a[2]) for a in answers] == labels, on_failure_logs(flow)


@pytest.mark.parametrize("replica", [0, 1])
def test_5_grpc_through_the_gateway_reads_the_digits(flow, replica):
    """The gateway learnt each pod's gRPC port from the EndpointSlice's port named grpc."""
    images, labels = one_digit_per_class()
    client = OIPClient(flow.gateways[replica].port("grpc"))
    try:
        resp = client.infer(infer_request(MODEL, {"data": digits_data.to_blob(np.stack(images))}))
    finally:
        client.close()
    assert [int(i) for i in np.argmax(output(resp, "prob"), axis=1)] == labels, on_failure_logs(flow)


def test_5_plain_json_through_the_gateway_reads_a_digit(flow):
    """What the docs' curl call sends: the FP32 input tensor as JSON."""
    images, labels = one_digit_per_class()
    blob = digits_data.to_blob(np.stack(images[3:4]))
    status, body = http_json("POST", f"http://127.0.0.1:{flow.gateways[0].port('http')}/v2/models/{MODEL}/infer", {
        "inputs": [{"name": "data", "shape": list(blob.shape), "datatype": "FP32", "data": blob.reshape(-1).tolist()}]})
    assert status == 200, body
    (prob,) = body["outputs"]
    assert prob["name"] == "prob" and int(np.argmax(prob["data"])) == labels[3] == 3


DOCS = REPO / "docs" / "kubernetes.md"


def doc_blocks(language: str) -> list[str]:
    """The fenced code blocks of docs/kubernetes.md in one language ("" for plain blocks)."""
    blocks, current, lang = [], None, ""
    for line in DOCS.read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, lang = [], line[3:].strip()
            else:
                if lang == language:
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_5_the_documented_curl_request_gets_the_documented_answer(flow):
    (request_json,) = doc_blocks("json")
    shipped = REPO / "examples" / "digits" / "request.json"
    assert json.loads(shipped.read_text()) == json.loads(request_json), "examples/digits/request.json drifted from the docs"
    answer = json.loads(doc_blocks("console")[-1].splitlines()[-1])  # the answer the curl block shows
    gw = flow.gateways[1]
    status, body = http_json("POST", f"http://127.0.0.1:{gw.port('http')}/v2/models/{MODEL}/infer", json.loads(request_json))
    assert status == 200 and body == answer


def test_5_the_documented_tritonclient_call_reads_a_3(flow):
    (snippet,) = doc_blocks("python")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(snippet.replace("localhost:8080", f"127.0.0.1:{flow.gateways[0].port('http')}"), {})
    documented = re.search(r"#\s*(\S+:\d+:\S+)", snippet).group(1).split(":")
    printed = out.getvalue().strip().split(":")
    assert printed[1:] == documented[1:] == ["3", "3"]
    assert float(printed[0]) == pytest.approx(float(documented[0]), abs=1e-5)


def served_inferences(server: ContainerProcess) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port('http')}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("caffeserve_inference_requests_total{") and 'code="200"' in line)


def test_5_the_gateway_spreads_requests_over_both_model_pods(flow):
    images, _ = one_digit_per_class()
    blob = digits_data.to_blob(np.stack(images[:1]))
    body = {"inputs": [{"name": "data", "shape": list(blob.shape), "datatype": "FP32", "data": blob.reshape(-1).tolist()}]}
    before = [served_inferences(s) for s in flow.servers]
    for i in range(20):
        gw = flow.gateways[i % len(flow.gateways)]
        assert http_json("POST", f"http://127.0.0.1:{gw.port('http')}/v2/models/{MODEL}/infer", body)[0] == 200
    after = [served_inferences(s) for s in flow.servers]
    assert sum(after) - sum(before) == 20
    assert all(a > b for a, b in zip(after, before)), (before, after)


def test_5_status_turns_ready_with_the_gateway_url(flow):
    cr = flow.cluster.wait_for(
        lambda: (cr := flow.cluster.get_object(CMS, MODEL_NS, MODEL)) and ready_condition(cr).get("status") == "True" and cr,
        timeout=60, what="Ready=True")
    assert ready_condition(cr)["reason"] == "ReplicasReady"
    assert cr["status"]["readyReplicas"] == 2
    assert cr["status"]["url"] == f"http://{PREFIX}-gateway.{NAMESPACE}.svc/v2/models/{MODEL}"
    assert cr["status"]["grpcAddress"] == f"{PREFIX}-gateway.{NAMESPACE}.svc:8081"
    assert cr["status"]["observedGeneration"] == cr["metadata"]["generation"]
    # the example leaves backend to auto: the digits net converts and passes parity, but ONNX Runtime runs
    # it at ~0.8× pycaffe's speed on this machine, so auto serves it with pycaffe and says both figures
    backend = flow.cluster.wait_for(
        lambda: (flow.cluster.get_object(CMS, MODEL_NS, MODEL).get("status") or {}).get("backend"),
        timeout=30, what="status.backend")
    assert backend["name"] == "pycaffe", backend
    assert backend["reason"].startswith("auto: serving with pycaffe because onnxruntime is not faster here"), backend
    assert "its parity check passed" in backend["reason"], backend


def test_5_spec_changes_and_hand_edits_are_reconciled(flow):
    """`kubectl patch` of the spec rolls the server config and the pods; a hand edit of a child is
    undone. (This exercises the operator's patch permissions, which the RBAC proof below needs.)"""
    cluster = flow.cluster
    old_hash = cluster.get_object(DEPLOYMENTS, MODEL_NS, f"{MODEL}-predictor")[
        "spec"]["template"]["metadata"]["annotations"][manifests.CONFIG_HASH_ANNOTATION]
    cluster.kubectl("patch", "cms", MODEL, "-n", MODEL_NS, "--type", "merge", "-p", '{"spec":{"runtime":{"instances":2}}}')

    def rolled() -> bool:
        config = yaml.safe_load(cluster.get_object(CONFIGMAPS, MODEL_NS, f"{MODEL}-config")["data"]["config.yaml"])
        dep = cluster.get_object(DEPLOYMENTS, MODEL_NS, f"{MODEL}-predictor")
        return config.get("instances") == 2 and \
            dep["spec"]["template"]["metadata"]["annotations"][manifests.CONFIG_HASH_ANNOTATION] != old_hash
    cluster.wait_for(rolled, timeout=30, what="the new config and pod template")

    cluster.kubectl("patch", "svc", f"{MODEL}-predictor", "-n", MODEL_NS, "--type", "merge", "-p",
                    '{"spec":{"ports":[{"name":"http","port":9090,"targetPort":8080,"protocol":"TCP"}]}}')
    cluster.wait_for(lambda: cluster.get_object(SERVICES, MODEL_NS, f"{MODEL}-predictor")["spec"]["ports"][0]["port"] == 8080,
                     timeout=30, what="the Service's port restored")

    # a NetworkPolicy opened to everyone by hand is closed again
    policies = "networking.k8s.io/v1/networkpolicies"
    cluster.patch(policies, MODEL_NS, f"{MODEL}-predictor", {"spec": {"ingress": [{}]}})
    cluster.wait_for(lambda: cluster.get_object(policies, MODEL_NS, f"{MODEL}-predictor")["spec"]["ingress"][0].get("from"),
                     timeout=30, what="the model's NetworkPolicy restored")


def test_5_a_canary_and_a_keda_scaledobject_come_and_go_with_the_spec(flow):
    """spec.canary and spec.autoscaling on a second model: the canary's children and a KEDA
    ScaledObject appear, follow a spec change, and are deleted when the spec drops them. (KEDA's
    CRD is installed, as in a cluster with KEDA; this exercises the operator's delete and
    scaledobjects permissions, which the RBAC proof below needs. The traffic itself is tested in
    tests/operator_tests/test_operator_traffic.py and tests/local.)"""
    cluster = flow.cluster
    cluster.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(SCALEDOBJECT_CRD))
    doc = yaml.safe_load((REPO / "examples/digits/service.yaml").read_text())
    doc["metadata"] = {"name": "digits-traffic", "namespace": MODEL_NS}
    doc["spec"]["canary"] = {"model": dict(doc["spec"]["model"], version="2"), "trafficPercent": 10}
    doc["spec"]["autoscaling"] = {"minReplicas": 0, "maxReplicas": 2, "target": 4}
    cluster.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(doc))
    so = cluster.wait_for(lambda: cluster.get_object(SCALEDOBJECTS, MODEL_NS, "digits-traffic-predictor"),
                          timeout=60, what="the ScaledObject")
    assert unknown_fields(so) == []
    cluster.wait_for(lambda: cluster.get_object(DEPLOYMENTS, MODEL_NS, "digits-traffic-canary"), timeout=30,
                     what="the canary's Deployment")
    cluster.kubectl("patch", "cms", "digits-traffic", "-n", MODEL_NS, "--type", "merge", "-p",
                    '{"spec":{"autoscaling":{"maxReplicas":3}}}')
    cluster.wait_for(lambda: cluster.get_object(SCALEDOBJECTS, MODEL_NS, "digits-traffic-predictor")
                     ["spec"]["maxReplicaCount"] == 3, timeout=30, what="the ScaledObject patched")
    cluster.kubectl("patch", "cms", "digits-traffic", "-n", MODEL_NS, "--type", "merge", "-p",
                    '{"spec":{"autoscaling":null,"canary":null}}')
    cluster.wait_for(lambda: cluster.get_object(SCALEDOBJECTS, MODEL_NS, "digits-traffic-predictor") is None
                     and cluster.get_object(DEPLOYMENTS, MODEL_NS, "digits-traffic-canary") is None
                     and cluster.get_object(SERVICES, MODEL_NS, "digits-traffic-canary") is None
                     and cluster.get_object(CONFIGMAPS, MODEL_NS, "digits-traffic-canary-config") is None,
                     timeout=30, what="the canary and the ScaledObject deleted")


# --------------------------------------------------------------------------------------------
# 6. least privilege, from the request log (run last: it reads every request made above)
# --------------------------------------------------------------------------------------------
def requests_by(flow: Flow, component: str) -> list[Attributes]:
    header = f"Bearer {token_of(component)}"
    out = []
    for request in flow.cluster.in_loop(lambda: list(flow.cluster.api)):
        if request.headers.get("Authorization") == header:
            out.append(request_attributes(request.method.value if hasattr(request.method, "value") else str(request.method),
                                          str(request.url)))
    return out


def chart_rbac_objects(flow: Flow) -> list[dict[str, Any]]:
    """The RBAC objects as the API stores them (what Helm created)."""
    out = []
    for kind, plural in RBAC_KINDS.items():
        out += [dict(o, kind=kind) for o in flow.cluster.list_objects(f"rbac.authorization.k8s.io/v1/{plural}")]
    return out


@pytest.mark.parametrize("component", ["operator", "gateway"])
def test_6_every_request_is_allowed_by_the_charts_rbac(flow, component):
    used = requests_by(flow, component)
    assert len(used) >= 3, f"no requests from the {component}'s ServiceAccount"
    grants = grants_for(SERVICE_ACCOUNTS[component], NAMESPACE, chart_rbac_objects(flow)) + authenticated_defaults()
    denied = sorted({str(a) for a in used if not any(g.allows(a) for g in grants)})
    assert not denied, f"the {component} made requests its RBAC does not allow:\n" + "\n".join(denied)


@pytest.mark.parametrize("component", ["operator", "gateway"])
def test_6_the_charts_rbac_grants_nothing_unused(flow, component):
    used = requests_by(flow, component)
    grants = grants_for(SERVICE_ACCOUNTS[component], NAMESPACE, chart_rbac_objects(flow))
    assert grants, f"no rules are bound to {SERVICE_ACCOUNTS[component]}"
    unused = unused_permissions(grants, used)
    assert not unused, f"the chart grants the {component} what it never used:\n" + "\n".join(unused)


# The checker itself: a proof is worth what its checker refuses.
def test_rbac_checker_reads_requests_like_the_api_server():
    assert request_attributes("GET", "/apis/apps/v1/namespaces/ml/deployments/x") == Attributes(
        "get", True, "apps", "deployments", "", "ml", "x", "/apis/apps/v1/namespaces/ml/deployments/x")
    assert request_attributes("GET", "/apis/caffeserving.io/v1alpha1/caffemodelservices?watch=true").verb == "watch"
    assert str(request_attributes("GET", "/api/v1/namespaces/ml/configmaps")) == "list core/configmaps in ml"
    status = request_attributes("PATCH", "/apis/caffeserving.io/v1alpha1/namespaces/ml/caffemodelservices/d/status")
    assert (status.verb, status.resource, status.subresource) == ("patch", "caffemodelservices", "status")
    assert request_attributes("DELETE", "/api/v1/namespaces/ml/services").verb == "deletecollection"
    assert not request_attributes("GET", "/apis/discovery.k8s.io/v1").resource_request


def test_rbac_checker_refuses_what_is_not_granted():
    rule = {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["create", "patch"]}
    assert rule_allows(rule, request_attributes("PATCH", "/apis/apps/v1/namespaces/ml/deployments/x"))
    assert not rule_allows(rule, request_attributes("DELETE", "/apis/apps/v1/namespaces/ml/deployments/x"))
    assert not rule_allows(rule, request_attributes("PATCH", "/apis/apps/v1/namespaces/ml/deployments/x/status"))
    assert not rule_allows(rule, request_attributes("PATCH", "/api/v1/namespaces/ml/services/x"))
    in_ml = Grant(rule, "Role/r", "ml")
    assert in_ml.allows(request_attributes("POST", "/apis/apps/v1/namespaces/ml/deployments"))
    assert not in_ml.allows(request_attributes("POST", "/apis/apps/v1/namespaces/other/deployments"))
    assert unused_permissions([in_ml], [request_attributes("POST", "/apis/apps/v1/namespaces/ml/deployments")]) == [
        "Role/r: patch apps/deployments"]
    assert not any(g.allows(request_attributes("GET", "/metrics")) for g in authenticated_defaults())

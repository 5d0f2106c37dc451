"""End to end against a real Kubernetes control plane: helm install → kubectl apply → operator →
Deployment/ReplicaSet controllers → scheduler → node agent → pycaffe, and back through the gateway.

One control plane for the module (caffe_testing/controlplane.py: etcd, kube-apiserver with
Node,RBAC authorization, the default admission plugins with Pod Security, kube-controller-manager,
kube-scheduler, all built by scripts/kube/build.sh) and a node agent (caffe_testing/nodeagent.py)
with four nodes: GPUs 1 and 8, MIG slices, CPU-only. Every step is its own test, in order:

1. the chart, installed with Helm's default storage (Secrets) and --wait: the operator and the
   gateway run as pods, from the chart's Deployments, with their ServiceAccounts' bound tokens;
2. a bad spec is refused by the API server with the CRD schema's message; every example and every
   CaffeModelService in the docs passes the server's validation (server-side dry run);
3. the digits example: the real controllers make its pods, the agent runs them (real
   `caffeserve serve`), the EndpointSlice controller publishes them, the gateway finds them;
4. tritonclient (REST) and gRPC through the gateway read the digits; status Ready with the URL;
5. `kubectl scale caffemodelservice/digits --replicas 3` (the CRD's scale subresource); hand edits
   of the children are undone;
6. the GPU examples' pods are scheduled on the GPU and MIG nodes; a model asking for more GPUs than
   any node has stays Pending and its status says Unschedulable, in the scheduler's words;
7. a canary and a KEDA ScaledObject (KEDA's CRD installed) come and go with the spec;
8. a rollout of new weights under load loses no request, and the old pods really terminate;
9. least privilege from the API server's audit log: no request of the operator or gateway was
   refused, and every permission the chart grants them was used;
10. deleting the CR garbage-collects its children; `helm uninstall` leaves nothing of the release.

What is not a cluster's: the pods are local processes (no container runtime), each on its own
address 10.244.B.N (see nodeagent.py); clients call the gateway pod's address (no kube-proxy, no
cluster DNS); the GPU examples' pods run no process (no GPU here): they are scheduled and reported
Running, as kwok does; a pod's credentials reach its process through a kubeconfig (nodeagent.py).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml

from caffe_http.tls import POD_SERVER_NAME
from caffe_operator import manifests
from caffe_testing.chart import (
    chart_crds,
    helm_install,
    helm_lint,
    helm_uninstall,
    rendered_objects,
    restricted_violations,
)
from caffe_testing.cluster import CMS, CONFIGMAPS, DEPLOYMENTS, REPO, SERVICES
from caffe_testing.controlplane import ControlPlane
from caffe_testing.digits import DIGITS_DIR, digits_data
from caffe_testing.grpc import OIPClient, infer_request, output
from caffe_testing.keda import SCALEDOBJECT_CRD, SCALEDOBJECTS, unknown_fields
from caffe_testing.nodeagent import TEST_NODES, NodeAgent
from caffe_testing.pki import CA
from caffe_testing.rbac import Attributes, authenticated_defaults, grants_for, unused_permissions
from inference_server.loading.selection import CHECK_RUNNING

RELEASE, NAMESPACE = "cs", "caffe-system"
PREFIX = f"{RELEASE}-caffe-serving"
MODEL_NS, MODEL = "ml", "digits"
SERVICE_ACCOUNTS = {"operator": f"{PREFIX}-operator", "gateway": f"{PREFIX}-gateway"}
GPU_EXAMPLES = {"alexnet", "resnet50"}  # their pods run no process here (no GPU, no model files)
PODS, ENDPOINTSLICES = "v1/pods", "discovery.k8s.io/v1/endpointslices"
RBAC_KINDS = {"ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings",
              "Role": "roles", "RoleBinding": "rolebindings"}
# The model and pool pods serve over TLS (podTLS): the gateway and the operator reach them checking the CA
VALUES = {"networkPolicy": {"enabled": True}, "podTLS": {"secretName": "pod-tls"}}
POOL, POOL_CLAIM = "small", "pool-models"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}

pytestmark = pytest.mark.timeout(300)


class Kube:
    """What the steps share."""

    cp: ControlPlane
    agent: NodeAgent
    release: dict[str, Any]
    model_dir: Path
    pool_mount: Path
    timings: dict[str, float]
    pod_context: ssl.SSLContext  # trusts the model pods' CA (podTLS)

    def gateways(self):
        return self.agent.running(NAMESPACE, f"{PREFIX}-gateway-")

    def operators(self):
        """Both replicas: one holds the leader-election Lease and reconciles, the other waits."""
        return self.agent.running(NAMESPACE, f"{PREFIX}-operator-")

    def gateway_url(self, i: int = 0) -> str:
        return f"http://{self.gateways()[i].ip}:8080"

    def model_pods(self, name: str = MODEL) -> list[dict[str, Any]]:
        return [p for p in self.cp.list_objects(PODS, MODEL_NS, labelSelector=f"{manifests.MODEL_LABEL}={name}")
                if not p["metadata"].get("deletionTimestamp")]

    def logs(self) -> str:
        return self.agent.logs()[-20000:] + "\n" + self.cp.logs()


def runs_a_process(pod: dict[str, Any]) -> bool:
    return (pod["metadata"].get("labels") or {}).get(manifests.MODEL_LABEL) not in GPU_EXAMPLES


def http_json(method: str, url: str, body: Any = None, timeout: float = 30, context=None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def condition(obj: dict[str, Any] | None, kind: str = "Ready") -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == kind:
            return c
    return {}


def volume(name: str, claim: str, path: Path, namespace: str = MODEL_NS) -> list[dict[str, Any]]:
    """A PersistentVolume (hostPath: the pods are local processes) pre-bound to claim `claim`, and the claim."""
    return [
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "local-models",
                  "hostPath": {"path": str(path)}, "claimRef": {"namespace": namespace, "name": claim}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": namespace},
         "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "local-models", "volumeName": name,
                  "resources": {"requests": {"storage": "1Gi"}}}},
    ]


def apply_all(cp: ControlPlane, objects: list[dict[str, Any]]) -> None:
    cp.apply("\n---\n".join(yaml.safe_dump(o) for o in objects))


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    k = Kube()
    k.timings = {}
    start = time.monotonic()
    # the PVC's folder: the digits example, plus a second weights file for the rollout
    k.model_dir = tmp_path_factory.mktemp("digits-model")
    for f in DIGITS_DIR.iterdir():
        if f.is_file():
            shutil.copy(f, k.model_dir / f.name)
    shutil.copy(DIGITS_DIR / "digits.caffemodel", k.model_dir / "digits-v2.caffemodel")
    # the pool's claim, mounted in pool pods at POOL_MOUNT/pool-models: here the same path as its local
    # folder, since the operator names files in its load calls' bodies, which the agent cannot remap
    k.pool_mount = tmp_path_factory.mktemp("pool-mount")
    shutil.copytree(k.model_dir, k.pool_mount / POOL_CLAIM)
    with ControlPlane() as cp, NodeAgent(cp, TEST_NODES, pvcs={"digits-model": k.model_dir,
                                                             POOL_CLAIM: k.pool_mount / POOL_CLAIM},
                                         run_processes=runs_a_process) as agent:
        k.cp, k.agent = cp, agent
        k.timings["control plane up"] = time.monotonic() - start
        for ns in (NAMESPACE, MODEL_NS):  # as an admin prepares a cluster: Pod Security "restricted" enforced
            cp.create_namespace(ns, RESTRICTED)
        # the pods' TLS Secret, as cert-manager writes it, where the pods run and where the chart's programs do
        ca = CA(tmp_path_factory.mktemp("pod-ca"))
        crt, key = ca.issue(POD_SERVER_NAME, POD_SERVER_NAME, server=True, hosts=[POD_SERVER_NAME])
        data = {"tls.crt": crt.read_bytes(), "tls.key": key.read_bytes(), "ca.crt": ca.cert_path.read_bytes()}
        apply_all(cp, [{"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                        "metadata": {"name": "pod-tls", "namespace": ns},
                        "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}
                       for ns in (NAMESPACE, MODEL_NS)])
        k.pod_context = ssl.create_default_context(cafile=str(ca.cert_path))
        k.pod_context.check_hostname = False  # a pod by its address: the chain is checked, its name is a DNS name
        apply_all(cp, volume("digits-model", "digits-model", k.model_dir))
        apply_all(cp, volume(POOL_CLAIM, POOL_CLAIM, k.pool_mount / POOL_CLAIM))
        yield k
        k.timings["total"] = time.monotonic() - start
        print("\ne2e timings, s from start:", {n: round(v, 1) for n, v in k.timings.items()},
              "control plane:", {n: round(v, 1) for n, v in cp.timings.items()})


@pytest.fixture(scope="module")
def installed(kube):
    start = time.monotonic()
    kube.release = helm_install(kube.cp, RELEASE, NAMESPACE, VALUES, real=True, wait=True)
    kube.timings["helm install --wait"] = time.monotonic() - start
    return kube


@pytest.fixture(scope="module")
def digits(installed):
    k = installed
    start = time.monotonic()
    k.cp.kubectl("apply", "-n", MODEL_NS, "-f", str(REPO / "examples/digits/service.yaml"))
    k.cp.wait_for(lambda: condition(k.cp.get_object(CMS, MODEL_NS, MODEL)).get("status") == "True",
                  timeout=180, what=f"{MODEL} Ready")
    # The CR's Ready counts the Deployment's ready replicas; the EndpointSlice controller publishes them on its
    # own schedule (batched, and slower on a loaded machine): the steps below start once both agree.
    try:
        k.cp.wait_for(lambda: ready_endpoints(k) == {p["status"].get("podIP"): p["metadata"]["name"]
                                                      for p in k.model_pods()}, timeout=90,
                      what=f"every {MODEL} pod ready in its EndpointSlices")
    except Exception:
        print("pods:", [(p["metadata"]["name"], p["status"].get("podIP"), p["status"].get("conditions"),
                         p["status"].get("containerStatuses")) for p in k.model_pods()])
        print("slices:", k.cp.list_objects(ENDPOINTSLICES, MODEL_NS,
                                           labelSelector=f"kubernetes.io/service-name={MODEL}-predictor"))
        raise
    for i in range(len(k.gateways())):
        k.cp.wait_for(lambda i=i: http_json("GET", f"{k.gateway_url(i)}/v2/models/{MODEL}/ready")[0] == 200,
                      timeout=30, what=f"gateway {i} routing {MODEL}")
    k.timings["digits Ready"] = time.monotonic() - start
    return k


# --------------------------------------------------------------------------------------------
# 1. helm install
# --------------------------------------------------------------------------------------------
def test_1_helm_install_stores_the_release_in_a_secret_and_runs_the_operator_and_gateway_as_pods(installed):
    k = installed
    assert not helm_lint()["Messages"]
    release = k.cp.list_objects("v1/secrets", NAMESPACE, labelSelector=f"owner=helm,name={RELEASE}")
    assert [(s["metadata"]["name"], s["type"]) for s in release] == [
        (f"sh.helm.release.v1.{RELEASE}.v1", "helm.sh/release.v1")
    ]
    for obj in rendered_objects(k.release) + chart_crds():
        kind = obj["kind"]
        listed = k.cp.kubectl("get", kind, obj["metadata"]["name"], "-n", obj["metadata"].get("namespace", NAMESPACE),
                              "-o", "json")
        assert json.loads(listed.stdout)["metadata"]["name"] == obj["metadata"]["name"]
    for component in ("operator", "gateway"):  # --wait returned: the Deployment controller says Available
        dep = k.cp.get_object(DEPLOYMENTS, NAMESPACE, f"{PREFIX}-{component}")
        assert condition(dep, "Available").get("status") == "True", dep["status"]
        assert restricted_violations(dep["spec"]["template"]["spec"]) == []
    pods = k.cp.list_objects(PODS, NAMESPACE)
    # two operators (one holds the Lease) and two gateways
    assert len(pods) == 4 and all(p["status"]["phase"] == "Running" and p["spec"]["nodeName"] for p in pods), pods


def test_1_the_operator_and_gateway_act_as_their_service_accounts_with_bound_tokens(installed):
    """The API server authenticated their requests as system:serviceaccount:…, and the token is bound
    to the pod that asked for it (TokenRequest with a boundObjectRef, as a kubelet asks)."""
    k = installed
    k.cp.wait_for(lambda: k.cp.audit_events(f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNTS['gateway']}"),
                  timeout=30, what="the gateway's requests in the audit log")
    for component, pods in (("operator", k.operators()), ("gateway", k.gateways())):
        events = k.cp.audit_events(f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNTS[component]}")
        assert events, f"no request from the {component}'s ServiceAccount"
        names = {e["user"].get("extra", {}).get("authentication.kubernetes.io/pod-name", [""])[0] for e in events}
        assert names <= {p.name for p in pods} and names, (component, names)


# --------------------------------------------------------------------------------------------
# 2. the API server validates
# --------------------------------------------------------------------------------------------
def test_2_a_bad_spec_is_refused_by_the_api_server_with_the_schemas_message(installed):
    doc = yaml.safe_load((REPO / "examples/digits/service.yaml").read_text())
    doc["metadata"]["name"] = "too-many-gpus"
    doc["spec"]["runtime"] = {"device": "gpu", "gpus": 99}
    refused = installed.cp.kubectl("apply", "-n", MODEL_NS, "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert refused.returncode != 0
    assert (
        "spec.runtime.gpus: Invalid value: 99: spec.runtime.gpus in body should be less than or equal to 16"
        in refused.stderr
    )
    assert installed.cp.get_object(CMS, MODEL_NS, "too-many-gpus") is None


def merged(base: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """`part` over `base`, key by key; a `source` is replaced whole (it is one of pvc, url, s3); a value
    the docs elide ("a326c965...") is the base's, as the reader fills it in."""
    out = dict(base)
    for key, value in part.items():
        if isinstance(value, str) and value.endswith("...") and key in base:
            continue
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) \
            and key != "source" else value
    return out


def manifests_in_docs() -> list[tuple[str, str]]:
    """Each CaffeModelService spec the docs show: whole manifests, and `spec:` fragments laid over
    the digits example (what a reader does with them)."""
    example = yaml.safe_load((REPO / "examples/digits/service.yaml").read_text())
    out = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S)):
            doc = yaml.safe_load(block)
            if isinstance(doc, dict) and doc.get("kind") == "CaffeModelService":
                out.append((f"{path.name} block {i}", block))
            elif isinstance(doc, dict) and set(doc) == {"spec"}:
                out.append((f"{path.name} block {i}", yaml.safe_dump(merged(example, doc))))
    return out


def test_2_every_example_and_every_manifest_in_the_docs_passes_the_servers_validation(installed):
    texts = [(p.name, p.read_text()) for p in sorted(REPO.glob("examples/**/*.yaml"))
             if "kind: CaffeModelService" in p.read_text()] + manifests_in_docs()
    assert len(texts) >= 7, [name for name, _ in texts]
    for name, text in texts:
        dry = installed.cp.kubectl("apply", "--dry-run=server", "-n", MODEL_NS, "-f", "-", input=text, check=False)
        assert dry.returncode == 0, f"{name}: {dry.stderr}"


# --------------------------------------------------------------------------------------------
# 3. pods from the real controllers, run by the agent, found by the gateway
# --------------------------------------------------------------------------------------------
def test_3_the_digits_pods_run_the_generated_template_on_addresses_of_their_own(digits):
    pods = digits.model_pods()
    assert len(pods) == 2 and all(p["status"]["phase"] == "Running" for p in pods)
    assert len({p["status"]["podIP"] for p in pods}) == 2
    for pod in pods:
        assert condition(pod).get("status") == "True"
        owner = pod["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "ReplicaSet" and owner["name"].startswith(f"{MODEL}-predictor-")
        (server,) = pod["spec"]["containers"]
        assert server["command"] == manifests.SERVE_COMMAND + manifests.GRPC_ARGS
        status, meta = http_json("GET", f"https://{pod['status']['podIP']}:8080/v2/models/{MODEL}",
                                 context=digits.pod_context)  # the pods serve over TLS (podTLS)
        assert status == 200 and meta["name"] == MODEL


def ready_endpoints(k: Kube) -> dict[str, str]:
    """address → pod name of the ready endpoints in the model Service's EndpointSlices."""
    slices = k.cp.list_objects(ENDPOINTSLICES, MODEL_NS, labelSelector=f"kubernetes.io/service-name={MODEL}-predictor")
    return {e["addresses"][0]: e["targetRef"]["name"]
            for s in slices for e in s.get("endpoints") or [] if e["conditions"]["ready"]}


def test_3_endpointslices_come_from_the_real_controller_and_the_gateways_route_by_them(digits):
    pods = {p["status"]["podIP"]: p["metadata"]["name"] for p in digits.model_pods()}
    slices = digits.cp.list_objects(
        ENDPOINTSLICES, MODEL_NS, labelSelector=f"kubernetes.io/service-name={MODEL}-predictor"
    )
    assert slices and all(
        s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
        for s in slices
    )
    assert ready_endpoints(digits) == pods
    assert {(p["name"], p["port"]) for s in slices for p in s["ports"]} == {("http", 8080), ("grpc", 8081)}
    for i in range(len(digits.gateways())):
        status, body = http_json("GET", f"{digits.gateway_url(i)}/v2/models")
        assert status == 200 and body == {"models": [MODEL]}


# --------------------------------------------------------------------------------------------
# 4. real clients through the gateway; status Ready
# --------------------------------------------------------------------------------------------
def one_digit_per_class() -> tuple[list[np.ndarray], list[int]]:
    images, labels = digits_data.held_out()
    picks = [int(np.flatnonzero(labels == d)[0]) for d in range(10)]
    return [images[i] for i in picks], [int(labels[i]) for i in picks]


def infer_body(images: list[np.ndarray]) -> dict[str, Any]:
    blob = digits_data.to_blob(np.stack(images))
    return {
        "inputs": [{"name": "data", "shape": list(blob.shape), "datatype": "FP32", "data": blob.reshape(-1).tolist()}]
    }


@pytest.mark.parametrize("replica", [0, 1])
def test_4_tritonclient_through_the_gateway_reads_the_digits(digits, replica):
    images, labels = one_digit_per_class()
    client = httpclient.InferenceServerClient(url=f"{digits.gateways()[replica].ip}:8080")
    try:
        assert client.is_model_ready(MODEL)
        inp = httpclient.InferInput("data", [len(images)], "BYTES")
        inp.set_data_from_numpy(np.array([digits_data.render_png(im, size=28) for im in images], dtype=object),
                                binary_data=True)
        result = client.infer(MODEL, [inp], outputs=[httpclient.InferRequestedOutput("prob", class_count=1)])
        answers = [(a.decode() if isinstance(a, bytes) else a).split(":") for a in result.as_numpy("prob").reshape(-1)]
    finally:
        client.close()
    assert [int(a[2]) for a in answers] == labels


@pytest.mark.parametrize("replica", [0, 1])
def test_4_grpc_through_the_gateway_reads_the_digits(digits, replica):
    images, labels = one_digit_per_class()
    client = OIPClient(8081, host=digits.gateways()[replica].ip)
    try:
        resp = client.infer(infer_request(MODEL, {"data": digits_data.to_blob(np.stack(images))}))
    finally:
        client.close()
    assert [int(i) for i in np.argmax(output(resp, "prob"), axis=1)] == labels


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


def test_4_the_documented_curl_request_gets_the_documented_answer(digits):
    (request_json,) = doc_blocks("json")
    shipped = REPO / "examples" / "digits" / "request.json"
    assert json.loads(shipped.read_text()) == json.loads(request_json), (
        "examples/digits/request.json drifted from the docs"
    )
    answer = json.loads(doc_blocks("console")[-1].splitlines()[-1])  # the answer the curl block shows
    status, body = http_json("POST", f"{digits.gateway_url(1)}/v2/models/{MODEL}/infer", json.loads(request_json))
    assert status == 200 and body == answer


def test_4_the_documented_tritonclient_call_reads_a_3(digits):
    (snippet,) = doc_blocks("python")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(snippet.replace("localhost:8080", f"{digits.gateways()[0].ip}:8080"), {})
    documented = re.search(r"#\s*(\S+:\d+:\S+)", snippet).group(1).split(":")
    printed = out.getvalue().strip().split(":")
    assert printed[1:] == documented[1:] == ["3", "3"]
    assert float(printed[0]) == pytest.approx(float(documented[0]), abs=1e-5)


def served_inferences(ip: str, context) -> float:
    with urllib.request.urlopen(f"https://{ip}:8080/metrics", timeout=10, context=context) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("caffeserve_inference_requests_total{") and 'code="200"' in line)


def test_4_the_gateways_spread_requests_over_both_model_pods(digits):
    images, _ = one_digit_per_class()
    ips = [p["status"]["podIP"] for p in digits.model_pods()]
    before = [served_inferences(ip, digits.pod_context) for ip in ips]
    for i in range(20):
        assert (
            http_json("POST", f"{digits.gateway_url(i % 2)}/v2/models/{MODEL}/infer", infer_body(images[:1]))[0] == 200
        )
    after = [served_inferences(ip, digits.pod_context) for ip in ips]
    assert sum(after) - sum(before) == 20
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def test_4_status_is_ready_with_the_gateway_url_and_the_backend(digits):
    cr = digits.cp.get_object(CMS, MODEL_NS, MODEL)
    assert condition(cr)["reason"] == "ReplicasReady"
    assert cr["status"]["readyReplicas"] == 2
    assert cr["status"]["url"] == f"http://{PREFIX}-gateway.{NAMESPACE}.svc/v2/models/{MODEL}"
    assert cr["status"]["observedGeneration"] == cr["metadata"]["generation"]
    backend = digits.cp.wait_for(
        lambda: (digits.cp.get_object(CMS, MODEL_NS, MODEL).get("status") or {}).get("backend"),
        timeout=60,
        what="status.backend",
    )
    assert backend["name"] == "pycaffe", backend
    printed = digits.cp.kubectl("get", "cms", "-n", MODEL_NS).stdout  # the printer columns, from a real `kubectl get`
    assert re.search(rf"^{MODEL}\s+True\s+2\s+2\s+cpu\s+pycaffe\s+http://", printed, re.M), printed


# --------------------------------------------------------------------------------------------
# 5. kubectl scale
# --------------------------------------------------------------------------------------------
def test_5_kubectl_scale_through_the_scale_subresource(digits):
    k = digits
    k.cp.kubectl("scale", f"caffemodelservice/{MODEL}", "-n", MODEL_NS, "--replicas", "3")
    assert k.cp.get_object(CMS, MODEL_NS, MODEL)["spec"]["replicas"] == 3
    cr = k.cp.wait_for(
        lambda: (
            (cr := k.cp.get_object(CMS, MODEL_NS, MODEL))
            and cr.get("status", {}).get("readyReplicas") == 3
            and condition(cr).get("status") == "True"
            and cr
        ),
        timeout=120,
        what="3 ready replicas",
    )
    assert cr["status"]["replicas"] == 3
    assert len(k.model_pods()) == 3
    scale = k.cp.client.request(
        "GET", f"/apis/caffeserving.io/v1alpha1/namespaces/{MODEL_NS}/caffemodelservices/{MODEL}/scale"
    )
    assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3


def test_5_hand_edits_of_the_children_are_undone(digits):
    """A hand edit of the Service, or of the model's NetworkPolicy, is reverted by the operator."""
    k = digits
    k.cp.kubectl("patch", "svc", f"{MODEL}-predictor", "-n", MODEL_NS, "--type", "merge", "-p",
                 '{"spec":{"ports":[{"name":"http","port":9090,"targetPort":8080,"protocol":"TCP"}]}}')
    k.cp.wait_for(
        lambda: (
            [p["port"] for p in k.cp.get_object(SERVICES, MODEL_NS, f"{MODEL}-predictor")["spec"]["ports"]]
            == [8080, 8081]
        ),
        timeout=30,
        what="the Service's ports restored",
    )
    policies = "networking.k8s.io/v1/networkpolicies"
    k.cp.patch(policies, MODEL_NS, f"{MODEL}-predictor", {"spec": {"ingress": [{}]}})
    k.cp.wait_for(lambda: k.cp.get_object(policies, MODEL_NS, f"{MODEL}-predictor")["spec"]["ingress"][0].get("from"),
                  timeout=30, what="the model's NetworkPolicy restored")


# --------------------------------------------------------------------------------------------
# 6. GPU scheduling
# --------------------------------------------------------------------------------------------
def test_6_the_gpu_examples_are_scheduled_on_gpu_and_mig_nodes(digits):
    k = digits
    # what a cluster ready for them has: the NVIDIA RuntimeClass, the PriorityClass and the models' claim
    apply_all(k.cp, [
        {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "nvidia"}, "handler": "nvidia"},
        {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "inference-high"},
         "value": 1000},
        *volume("caffe-models", "caffe-models", k.model_dir)])
    for name in ("alexnet-gpu.yaml", "resnet50-mig-gpu.yaml"):
        k.cp.kubectl("apply", "-f", str(REPO / "examples" / name))
    try:
        def placed(model: str, n: int) -> list[str]:
            pods = k.model_pods(model)
            nodes = [p["spec"].get("nodeName") for p in pods]
            return nodes if len(pods) == n and all(nodes) else []
        alexnet = k.cp.wait_for(lambda: placed("alexnet", 2), timeout=60, what="alexnet's pods scheduled")
        resnet = k.cp.wait_for(lambda: placed("resnet50", 3), timeout=60, what="resnet50's pods scheduled")
        assert set(alexnet) <= {"gpu-small", "gpu-large"}
        assert resnet == ["gpu-mig"] * 3
        gpu = {
            p["metadata"]["name"]: p["spec"]["containers"][0]["resources"]["limits"] for p in k.model_pods("alexnet")
        }
        assert all(limits["nvidia.com/gpu"] == "1" for limits in gpu.values()), gpu
    finally:
        for name in ("alexnet-gpu.yaml", "resnet50-mig-gpu.yaml"):
            k.cp.kubectl("delete", "-f", str(REPO / "examples" / name), "--wait=false")
    k.cp.wait_for(lambda: not k.model_pods("alexnet") and not k.model_pods("resnet50"), timeout=90,
                  what="the GPU examples' pods gone")


def test_6_more_gpus_than_any_node_has_stays_pending_and_says_unschedulable(digits):
    k = digits
    doc = yaml.safe_load((REPO / "examples/digits/service.yaml").read_text())
    doc["metadata"] = {"name": "too-big", "namespace": MODEL_NS}
    doc["spec"]["replicas"] = 1
    doc["spec"]["runtime"] = {"device": "gpu", "gpus": 12}
    k.cp.apply(doc)
    try:
        def unschedulable() -> dict[str, Any]:
            c = condition(k.cp.get_object(CMS, MODEL_NS, "too-big"))
            return c if c.get("reason") == "Unschedulable" else {}
        ready = k.cp.wait_for(unschedulable, timeout=90, what="Ready=False, reason Unschedulable")
        (pod,) = k.model_pods("too-big")
        assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")
        scheduled = condition(pod, "PodScheduled")
        assert scheduled["status"] == "False" and scheduled["reason"] == "Unschedulable"
        assert "Insufficient nvidia.com/gpu" in scheduled["message"]
        assert ready["status"] == "False" and scheduled["message"] in ready["message"], ready
    finally:
        k.cp.kubectl("delete", "cms", "too-big", "-n", MODEL_NS, "--wait=false")


# --------------------------------------------------------------------------------------------
# 7. canary and KEDA
# --------------------------------------------------------------------------------------------
def test_7_a_canary_and_a_keda_scaledobject_come_and_go_with_the_spec(digits):
    k = digits
    k.cp.apply(SCALEDOBJECT_CRD)
    k.cp.wait_for(
        lambda: (
            condition(
                k.cp.get_object(
                    "apiextensions.k8s.io/v1/customresourcedefinitions", None, SCALEDOBJECT_CRD["metadata"]["name"]
                ),
                "Established",
            ).get("status")
            == "True"
        ),
        timeout=30,
        what="KEDA's CRD established",
    )
    doc = yaml.safe_load((REPO / "examples/digits/service.yaml").read_text())
    doc["metadata"] = {"name": "digits-traffic", "namespace": MODEL_NS}
    doc["spec"]["canary"] = {"model": dict(doc["spec"]["model"], version="2"), "trafficPercent": 10}
    doc["spec"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 2, "target": 4}
    k.cp.apply(doc)
    so = k.cp.wait_for(lambda: k.cp.get_object(SCALEDOBJECTS, MODEL_NS, "digits-traffic-predictor"),
                       timeout=60, what="the ScaledObject")
    assert unknown_fields(so) == []
    k.cp.wait_for(lambda: k.cp.get_object(DEPLOYMENTS, MODEL_NS, "digits-traffic-canary"), timeout=30,
                  what="the canary's Deployment")
    k.cp.kubectl("patch", "cms", "digits-traffic", "-n", MODEL_NS, "--type", "merge", "-p",
                 '{"spec":{"autoscaling":{"maxReplicas":3}}}')
    k.cp.wait_for(
        lambda: k.cp.get_object(SCALEDOBJECTS, MODEL_NS, "digits-traffic-predictor")["spec"]["maxReplicaCount"] == 3,
        timeout=30,
        what="the ScaledObject patched",
    )
    k.cp.kubectl("patch", "cms", "digits-traffic", "-n", MODEL_NS, "--type", "merge", "-p",
                 '{"spec":{"autoscaling":null,"canary":null}}')
    k.cp.wait_for(lambda: k.cp.get_object(SCALEDOBJECTS, MODEL_NS, "digits-traffic-predictor") is None
                  and k.cp.get_object(DEPLOYMENTS, MODEL_NS, "digits-traffic-canary") is None
                  and k.cp.get_object(SERVICES, MODEL_NS, "digits-traffic-canary") is None
                  and k.cp.get_object(CONFIGMAPS, MODEL_NS, "digits-traffic-canary-config") is None,
                  timeout=60, what="the canary and the ScaledObject deleted")
    k.cp.kubectl("delete", "cms", "digits-traffic", "-n", MODEL_NS, "--wait=false")


# --------------------------------------------------------------------------------------------
# 8. a rollout under load
# --------------------------------------------------------------------------------------------
def test_8_a_rollout_of_new_weights_under_load_loses_no_request_and_old_pods_terminate(digits):
    k = digits
    images, labels = one_digit_per_class()
    body = infer_body(images[3:4])
    old = {p["metadata"]["name"] for p in k.model_pods()}
    old_workers = [k.agent.pod(MODEL_NS, name) for name in old]
    outcomes: list[tuple[int, Any]] = []
    stop = threading.Event()

    def load(i: int) -> None:
        while not stop.is_set():
            try:
                outcomes.append(http_json("POST", f"{k.gateway_url(i)}/v2/models/{MODEL}/infer", body, timeout=30))
            except OSError as e:
                outcomes.append((0, str(e)))
    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in (0, 1)]
    for t in threads:
        t.start()
    try:
        k.cp.kubectl("patch", "cms", MODEL, "-n", MODEL_NS, "--type", "merge", "-p", json.dumps(
            {"spec": {"model": {"weights": "digits-v2.caffemodel"}}}))

        def rolled() -> bool:
            cr = k.cp.get_object(CMS, MODEL_NS, MODEL)
            pods = {p["metadata"]["name"] for p in k.model_pods()}
            return (cr["status"].get("observedGeneration") == cr["metadata"]["generation"]
                    and condition(cr).get("status") == "True" and not (pods & old) and len(pods) == 3)
        k.cp.wait_for(rolled, timeout=240, interval=0.5, what="the rollout to finish")
        for w in old_workers:
            assert w.gone.wait(60), f"{w.name} still runs"
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    failed = [o for o in outcomes if o[0] != 200]
    assert len(outcomes) > 20 and not failed, f"{len(failed)} of {len(outcomes)} failed: {failed[:5]}"
    assert all(int(np.argmax(o[1]["outputs"][0]["data"])) == labels[3] for o in outcomes)
    for w in old_workers:  # SIGTERM, drained, exited by itself within the grace period
        (c,) = w.containers
        assert c.terminated and c.terminated["exitCode"] == 0, c.terminated
    config = yaml.safe_load(k.cp.get_object(CONFIGMAPS, MODEL_NS, f"{MODEL}-config")["data"]["config.yaml"])
    assert config["model"]["weights"].endswith("digits-v2.caffemodel")


# --------------------------------------------------------------------------------------------
# 8b. a pool: many models in shared pods
# --------------------------------------------------------------------------------------------
POOL_PODS, POOL_MODELS = "small-pool-", {"pool-a": "300Mi", "pool-b": "300Mi", "pool-c": "100Mi"}


def pool_model(name: str, memory: str) -> dict[str, Any]:
    """The digits files again (the claim the pool mounts), under another name, in pool `small`; its
    memory estimate (before a pod measures it) in resources.requests.memory."""
    return {"apiVersion": "caffeserving.io/v1alpha1", "kind": "CaffeModelService",
            "metadata": {"name": name, "namespace": MODEL_NS},
            "spec": {"pool": POOL, "source": {"pvc": {"claimName": POOL_CLAIM}},
                     "model": {"prototxt": "deploy.prototxt", "weights": "digits.caffemodel", "labels": "labels.txt"},
                     "resources": {"requests": {"memory": memory}}}}


def pool_pods(k: Kube) -> list[dict[str, Any]]:
    return [p for p in k.cp.list_objects(PODS, MODEL_NS, labelSelector=f"caffeserving.io/pool={POOL}")
            if not p["metadata"].get("deletionTimestamp")]


def placed(k: Kube, name: str) -> list[str]:
    cr = k.cp.get_object(CMS, MODEL_NS, name)
    if condition(cr).get("status") != "True":
        return []
    return list(((cr or {}).get("status") or {}).get("placement", {}).get("pods") or [])


def pool_state(k: Kube) -> str:
    """What the pool's objects and the operator say, for a failed wait's message."""
    crs = {m: (k.cp.get_object(CMS, MODEL_NS, m) or {}).get("status") for m in POOL_MODELS}
    pool = (k.cp.get_object("caffeserving.io/v1alpha1/caffeservingpools", MODEL_NS, POOL) or {}).get("status")
    pods = "\n".join(w.logs()[-1500:] for w in k.agent.running(MODEL_NS, POOL_PODS))
    return (f"models: {json.dumps(crs)}\npool: {json.dumps(pool)}\noperator: {k.operator().logs()[-6000:]}\n"
            f"pool pods: {pods}")


@pytest.mark.timeout(900)
def test_8b_a_pool_packs_models_into_shared_pods_the_gateway_routes_each_to_its_pods_and_a_dead_pods_move(digits):
    """Three models in a pool of two CPU pods (512 MiB each for models): packed by memory (estimates, then
    what a pod measured), loaded through the repository API, each answering
    through the gateway as the digits model's own pods answer; one that fits nowhere says
    Unschedulable; a pool pod deleted, its models are loaded on the other pod and keep answering."""
    k = digits
    k.cp.apply(yaml.safe_dump({"apiVersion": "caffeserving.io/v1alpha1", "kind": "CaffeServingPool",
                               "metadata": {"name": POOL, "namespace": MODEL_NS},
                               "spec": {"replicas": 2, "device": "cpu", "modelMemory": "512Mi",
                                        "modelClaims": [POOL_CLAIM], "modelMountPath": str(k.pool_mount)}}))
    k.cp.wait_for(lambda: len([p for p in pool_pods(k) if condition(p).get("status") == "True"]) == 2,
                  timeout=120, what="two ready pool pods")
    for name, memory in POOL_MODELS.items():
        k.cp.apply(yaml.safe_dump(pool_model(name, memory)))
    try:
        k.cp.wait_for(lambda: all(placed(k, m) for m in POOL_MODELS), timeout=120, what="the pool models Ready")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{pool_state(k)}") from None
    pods = sorted(p["metadata"]["name"] for p in pool_pods(k))
    placement = {m: placed(k, m) for m in POOL_MODELS}
    # one copy each, on the pool's pods (which ones depends on the order the models came in: once a pod
    # has measured a model, its measured memory replaces the estimate; tests/operator_tests/test_placement.py
    # checks the packing itself)
    assert all(len(where) == 1 and where[0] in pods for where in placement.values()), placement
    cr = k.cp.get_object(CMS, MODEL_NS, "pool-a")
    assert cr["status"]["placement"]["measured"] is True and cr["status"]["placement"]["memoryBytes"] > 0
    assert cr["status"]["replicas"] == 1 and cr["status"]["url"].endswith("/v2/models/pool-a")
    assert k.cp.get_object(DEPLOYMENTS, MODEL_NS, "pool-a-predictor") is None  # no pods of its own
    # the pool's pods are behind a NetworkPolicy with the peers a model's own pods get (networkPolicy.enabled)
    policies = "networking.k8s.io/v1/networkpolicies"
    pool_policy = k.cp.get_object(policies, MODEL_NS, f"{POOL}-pool")
    assert pool_policy is not None and pool_policy["metadata"]["ownerReferences"][0]["kind"] == "CaffeServingPool"
    model_policy = k.cp.get_object(policies, MODEL_NS, f"{MODEL}-predictor")
    assert pool_policy["spec"]["ingress"][0]["from"] == model_policy["spec"]["ingress"][0]["from"]
    assert all(p["metadata"]["labels"].get(key) == value for p in pool_pods(k)
               for key, value in pool_policy["spec"]["podSelector"]["matchLabels"].items())

    images, labels = one_digit_per_class()
    body = infer_body(images)
    status, own = http_json("POST", f"{k.gateway_url()}/v2/models/{MODEL}/infer", body)
    assert status == 200

    def answers(name: str) -> list[float] | None:
        status, got = http_json("POST", f"{k.gateway_url()}/v2/models/{name}/infer", body)
        return got["outputs"][0]["data"] if status == 200 else None
    for name in POOL_MODELS:
        k.cp.wait_for(lambda name=name: answers(name) is not None, timeout=30, what=f"the gateway routing {name}")
        assert answers(name) == own["outputs"][0]["data"], name
    # each model's EndpointSlice holds the pods that hold it, and only those
    for name in POOL_MODELS:
        slices = k.cp.list_objects(ENDPOINTSLICES, MODEL_NS,
                                   labelSelector=f"kubernetes.io/service-name={name}-predictor")
        held = {ep["targetRef"]["name"] for s in slices for ep in s.get("endpoints") or []}
        assert held == set(placed(k, name)), name

    pool = k.cp.get_object("caffeserving.io/v1alpha1/caffeservingpools", MODEL_NS, POOL)
    assert condition(pool).get("status") == "True", pool.get("status")
    held = {p["name"]: p["models"] for p in pool["status"]["pods"]}
    assert held == {pod: sorted(m for m, where in placement.items() if pod in where) for pod in pods}
    assert all(p["memoryBytes"] <= p["budgetBytes"] == 512 * 2**20 for p in pool["status"]["pods"])

    # a model bigger than a pod's budget: Unschedulable, the others untouched
    k.cp.apply(yaml.safe_dump(pool_model("pool-huge", "1Gi")))
    huge = k.cp.wait_for(lambda: (c := condition(k.cp.get_object(CMS, MODEL_NS, "pool-huge"))).get("reason") ==
                         "Unschedulable" and c, timeout=60, what="pool-huge Unschedulable")
    assert "one copy needs 1024 MiB and no other pod has that much free" in huge["message"], huge
    k.cp.kubectl("delete", "cms", "pool-huge", "-n", MODEL_NS)

    # a pool pod dies: its models are loaded on another pod and keep answering
    victim = placement["pool-a"][0]
    k.cp.kubectl("delete", "pod", victim, "-n", MODEL_NS, "--wait=false")
    k.cp.wait_for(lambda: all(placed(k, m) and victim not in placed(k, m) for m in POOL_MODELS), timeout=180,
                  what=f"the models of {victim} placed again")
    for name in POOL_MODELS:
        k.cp.wait_for(lambda name=name: answers(name) == own["outputs"][0]["data"], timeout=60,
                      what=f"{name} answering again")

    for name in POOL_MODELS:
        k.cp.kubectl("delete", "cms", name, "-n", MODEL_NS)
    k.cp.kubectl("delete", "caffeservingpool", POOL, "-n", MODEL_NS)
    k.cp.wait_for(lambda: not pool_pods(k), timeout=120, what="the pool's pods gone")


# --------------------------------------------------------------------------------------------
# 9. least privilege, from the audit log (after every step above that makes the components work)
# --------------------------------------------------------------------------------------------
def audit_attributes(events: list[dict[str, Any]]) -> list[Attributes]:
    out = []
    for e in events:
        ref = e.get("objectRef")
        if ref:
            out.append(Attributes(e["verb"], True, ref.get("apiGroup", ""), ref.get("resource", ""),
                                  ref.get("subresource", ""), ref.get("namespace", ""), ref.get("name", ""),
                                  e["requestURI"]))
        else:
            out.append(Attributes(e["verb"], False, path=e["requestURI"].split("?")[0]))
    return out


def chart_rbac_objects(k: Kube) -> list[dict[str, Any]]:
    out = []
    for kind, plural in RBAC_KINDS.items():
        out += [dict(o, kind=kind) for o in k.cp.list_objects(f"rbac.authorization.k8s.io/v1/{plural}")
                if (o["metadata"].get("labels") or {}).get("app.kubernetes.io/instance") == RELEASE]
    return out


WRITES = ("create", "update", "patch", "delete")


def writes_to_the_model(events: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """The writes among `events` to the model's objects: the CR, its children and their pods,
    ReplicaSets and EndpointSlices (all named after the model)."""
    return [e for e in events if e["verb"] in WRITES
            and ((e.get("objectRef") or {}).get("name") or "").startswith(model)]


def test_9_a_settled_model_costs_the_operator_no_writes(digits):
    """No hot loop: with nothing changing, the operator writes nothing (a child whose stored form
    differs from the desired one only by the API server's defaults would be patched again and again).

    "Nothing changing" is checked, not assumed: on a loaded machine a readiness probe can time out
    and a pod's readiness flap, and the operator rightly writes the new readyReplicas. So a window
    counts only when nobody else wrote to the model's objects in it or in the 5 s before it; the
    test takes the first such window of up to four. And `auto`'s onnxruntime check, which runs beside
    serving after the rollout of test 8, must have ended: its verdict is a status write of its own
    (status.backend; CI once saw it land in the window)."""
    k = digits
    user = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNTS['operator']}"
    k.cp.wait_for(lambda: condition(k.cp.get_object(CMS, MODEL_NS, MODEL)).get("status") == "True", timeout=60,
                  what=f"{MODEL} Ready")
    k.cp.wait_for(lambda: ((k.cp.get_object(CMS, MODEL_NS, MODEL).get("status") or {}).get("backend") or {})
                  .get("reason", CHECK_RUNNING) != CHECK_RUNNING, timeout=240,
                  what=f"{MODEL}'s onnxruntime check beside serving to end (status.backend.reason)")
    time.sleep(5)  # the last status write of the rollout settles
    busy = []
    for _ in range(4):
        lead_in = len(k.cp.audit_events())
        time.sleep(5)
        start = len(k.cp.audit_events())
        time.sleep(8)
        events = k.cp.audit_events()
        others = [f"{e['user'].get('username')}: {e['verb']} {e['requestURI']}"
                  for e in writes_to_the_model(events[lead_in:], MODEL) if e["user"].get("username") != user]
        if others:
            busy.append(others)
            continue
        # the leader's renewals of its Lease are the election's heartbeat (every 2 s), not reconciling
        writes = [f"{e['verb']} {e['requestURI']}" for e in events[start:]
                  if e["user"].get("username") == user and e["verb"] in WRITES
                  and (e.get("objectRef") or {}).get("resource") != "leases"]
        assert not writes, (writes, k.cp.get_object(CMS, MODEL_NS, MODEL).get("status"))
        return
    pytest.fail(f"no quiet 13 s window in four: others kept writing to {MODEL}'s objects: {busy}")


@pytest.mark.parametrize("component", ["operator", "gateway"])
def test_9_the_authorizer_refused_none_of_their_requests(digits, component):
    events = digits.cp.audit_events(f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNTS[component]}")
    refused = sorted(
        {
            f"{a} → {e['responseStatus'].get('code')}"
            for e, a in zip(events, audit_attributes(events), strict=True)
            if e.get("responseStatus", {}).get("code") == 403
        }
    )
    assert len(events) >= 3
    assert not refused, f"the API server refused the {component}:\n" + "\n".join(refused)


@pytest.mark.parametrize("component", ["operator", "gateway"])
def test_9_the_chart_grants_nothing_they_did_not_use(digits, component):
    used = audit_attributes(digits.cp.audit_events(f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNTS[component]}"))
    grants = grants_for(SERVICE_ACCOUNTS[component], NAMESPACE, chart_rbac_objects(digits))
    assert grants, f"no rules are bound to {SERVICE_ACCOUNTS[component]}"
    unused = unused_permissions(grants, used)
    assert not unused, f"the chart grants the {component} what it never used:\n" + "\n".join(unused)
    assert authenticated_defaults()


# --------------------------------------------------------------------------------------------
# 10. deletion
# --------------------------------------------------------------------------------------------
def test_10_deleting_the_cr_garbage_collects_its_children(digits):
    k = digits
    workers = k.agent.running(MODEL_NS, f"{MODEL}-predictor-")
    k.cp.kubectl("delete", "cms", MODEL, "-n", MODEL_NS)
    kinds = [DEPLOYMENTS, "apps/v1/replicasets", SERVICES, CONFIGMAPS, "networking.k8s.io/v1/networkpolicies",
             ENDPOINTSLICES, PODS]

    def left() -> list[str]:
        return [f"{kind} {o['metadata']['name']}" for kind in kinds for o in k.cp.list_objects(kind, MODEL_NS)
                if (o["metadata"].get("labels") or {}).get(manifests.MODEL_LABEL) == MODEL
                or o["metadata"]["name"].startswith(f"{MODEL}-")]
    k.cp.wait_for(lambda: not left(), timeout=120, interval=0.5, what="the garbage collector")
    assert all(w.gone.is_set() for w in workers)


def test_10_helm_uninstall_leaves_nothing_of_the_release(digits):
    k = digits
    workers = k.agent.running(NAMESPACE)
    helm_uninstall(k.cp, RELEASE, NAMESPACE)
    namespaced = ["v1/pods", SERVICES, "v1/serviceaccounts", "v1/secrets", CONFIGMAPS, DEPLOYMENTS,
                  "apps/v1/replicasets", "policy/v1/poddisruptionbudgets", "networking.k8s.io/v1/networkpolicies",
                  "rbac.authorization.k8s.io/v1/roles", "rbac.authorization.k8s.io/v1/rolebindings", ENDPOINTSLICES]

    def left() -> list[str]:
        out = [
            f"{kind} {o['metadata']['name']}"
            for kind in namespaced
            for o in k.cp.list_objects(kind, NAMESPACE)
            if o["metadata"]["name"].startswith(RELEASE)
            or "helm" in (o["metadata"].get("labels") or {}).get("owner", "")
        ]
        for kind in ("rbac.authorization.k8s.io/v1/clusterroles", "rbac.authorization.k8s.io/v1/clusterrolebindings"):
            out += [
                f"{kind} {o['metadata']['name']}"
                for o in k.cp.list_objects(kind)
                if o["metadata"]["name"].startswith(RELEASE)
            ]
        return out
    k.cp.wait_for(lambda: not left(), timeout=120, interval=0.5, what="nothing left of the release")
    k.cp.wait_for(lambda: all(w.gone.is_set() for w in workers), timeout=60, what="the release's pods stopped")
    # Helm never deletes a chart's CRDs (crds/): the CaffeModelService type outlives the release
    assert k.cp.get_object(
        "apiextensions.k8s.io/v1/customresourcedefinitions", None, "caffemodelservices.caffeserving.io"
    )


# --------------------------------------------------------------------------------------------
# 11. the chart's other RBAC shape: one watched namespace, Roles only
# --------------------------------------------------------------------------------------------
def test_11_a_namespace_scoped_release_serves_its_namespace_with_roles_only(digits):
    """watch.scope=namespace: Roles and RoleBindings in the watched namespace, nothing cluster-wide;
    the operator and gateway still do their work, and the authorizer refuses them nothing."""
    k = digits
    release, ns, watched = "cs-ns", "caffe-ns", "ml-team"
    for name in (ns, watched):
        k.cp.create_namespace(name, RESTRICTED)
    apply_all(k.cp, volume("digits-model-team", "digits-model", k.model_dir, namespace=watched))
    values = {"watch": {"scope": "namespace", "namespace": watched}, "gateway": {"replicas": 1}}
    rendered = rendered_objects(helm_install(k.cp, release, ns, values, real=True, wait=True))
    try:
        assert not {o["kind"] for o in rendered} & {"ClusterRole", "ClusterRoleBinding"}
        doc = yaml.safe_load((REPO / "examples/digits/service.yaml").read_text())
        doc["spec"]["replicas"] = 1
        k.cp.apply(doc, namespace=watched)
        k.cp.wait_for(lambda: condition(k.cp.get_object(CMS, watched, MODEL)).get("status") == "True",
                      timeout=180, what="the model Ready in the watched namespace")
        (gw,) = k.agent.running(ns, f"{release}-caffe-serving-gateway-")
        images, labels = one_digit_per_class()
        k.cp.wait_for(lambda: http_json("GET", f"http://{gw.ip}:8080/v2/models/{MODEL}/ready")[0] == 200,
                      timeout=30, what="the gateway routing")
        status, body = http_json("POST", f"http://{gw.ip}:8080/v2/models/{MODEL}/infer", infer_body(images[5:6]))
        assert status == 200 and int(np.argmax(body["outputs"][0]["data"])) == labels[5]
        for component in ("operator", "gateway"):
            events = k.cp.audit_events(f"system:serviceaccount:{ns}:{release}-caffe-serving-{component}")
            refused = sorted({str(a) for e, a in zip(events, audit_attributes(events), strict=True)
                              if e.get("responseStatus", {}).get("code") == 403})
            assert events and not refused, f"the API server refused the {component}:\n" + "\n".join(refused)
    finally:
        k.cp.kubectl("delete", "cms", MODEL, "-n", watched, "--wait=false", check=False)
        helm_uninstall(k.cp, release, ns)

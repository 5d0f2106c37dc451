"""The Helm chart (charts/caffe-serving) with real Helm, and the two images it runs.

Helm is the real Helm Go library (helm-sdkpy): `Lint` as `helm lint` runs it, and `Install` into
kmock's Kubernetes emulator (see caffe_testing/chart.py for how). Every object Helm created is read back
from the emulator and checked against the Kubernetes OpenAPI schemas with kubernetes-validate.
No Docker engine runs here: the Dockerfiles are checked for what the chart and operator rely on
(the uid, the commands, the Caffe build options), and the scripts they run are run here.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from caffe_operator import manifests
from caffe_operator.crd import crd_yaml, custom_resource_definition, pool_custom_resource_definition
from caffe_operator.pool_api import parse_pool_spec
from caffe_operator.pool_manifests import pool_deployment
from caffe_testing.chart import (
    CHART,
    REPO,
    HelmError,
    chart_crds,
    find,
    helm_cluster,
    helm_install,
    helm_lint,
    one,
    rendered_objects,
    restricted_violations,
)
from caffe_testing.cluster import resource_path

NAMESPACE = "caffe-system"
RELEASE = "cs"
PREFIX = "cs-caffe-serving"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas we have.
K8S_VERSIONS = ["1.25.0", kubernetes_validate.utils.latest_version()]


def api_path(obj: dict[str, Any]) -> str:
    group_version = obj["apiVersion"]
    plural = {"ServiceAccount": "serviceaccounts", "ClusterRole": "clusterroles", "Role": "roles",
              "ClusterRoleBinding": "clusterrolebindings", "RoleBinding": "rolebindings", "Service": "services",
              "Deployment": "deployments", "HorizontalPodAutoscaler": "horizontalpodautoscalers",
              "NetworkPolicy": "networkpolicies", "ServiceMonitor": "servicemonitors",
              "PodDisruptionBudget": "poddisruptionbudgets", "ConfigMap": "configmaps",
              "CustomResourceDefinition": "customresourcedefinitions",
              "CaffeServingPool": "caffeservingpools"}[obj["kind"]]
    resource = f"{group_version}/{plural}"
    return resource_path(resource, obj["metadata"].get("namespace"), obj["metadata"]["name"])


def install(values: dict[str, Any] | None = None, before=None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A fresh emulator, the chart installed into it; (release, the objects as the API stores them)."""
    with helm_cluster() as cluster:
        if before:
            before(cluster)
        release = helm_install(cluster, RELEASE, NAMESPACE, values)
        stored = [cluster.request("GET", api_path(obj)) for obj in rendered_objects(release) + chart_crds()]
    return release, stored


@pytest.fixture(scope="module")
def default_install():
    return install()


@pytest.fixture(scope="module")
def namespaced_install():
    return install({"watch": {"scope": "namespace", "namespace": "models"}})


def register_servicemonitors(cluster) -> None:
    """The Prometheus Operator's ServiceMonitor kind, as its CRD would serve it."""
    cluster.create("apiextensions.k8s.io/v1/customresourcedefinitions", None, {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
        "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                 "names": {"kind": "ServiceMonitor", "plural": "servicemonitors", "singular": "servicemonitor"},
                 "versions": [{"name": "v1", "served": True, "storage": True,
                               "schema": {"openAPIV3Schema": {"type": "object",
                                                              "x-kubernetes-preserve-unknown-fields": True}}}]},
    })


@pytest.fixture(scope="module")
def everything_install():
    values = {
        "gateway": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "networkPolicy": {"enabled": True, "gatewayFrom": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]},
        "server": {"image": {"repository": "registry.example/caffe-gpu", "digest": "sha256:" + "ab" * 32}},
    }
    return install(values, before=register_servicemonitors)


# --------------------------------------------------------------------------------------------
# lint, objects, validity
# --------------------------------------------------------------------------------------------
def test_helm_lint_is_clean():
    result = helm_lint()
    assert result["TotalChartsLinted"] == 1
    # Helm's Go errors do not survive JSON, so a failure names the file and severity (1 info,
    # 2 warning, 3 error); `helm lint charts/caffe-serving` says the rest.
    assert not result["Messages"], result["Messages"]
    assert not result["Errors"]


def test_install_creates_the_crd_rbac_deployments_and_service(default_install):
    release, stored = default_install
    assert release["info"]["status"] == "deployed"
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in stored)
    assert kinds == sorted([
        ("CustomResourceDefinition", "caffemodelservices.caffeserving.io"),
        ("CustomResourceDefinition", "caffeservingpools.caffeserving.io"),
        ("ServiceAccount", f"{PREFIX}-operator"), ("ServiceAccount", f"{PREFIX}-gateway"),
        ("ClusterRole", f"{PREFIX}-operator"), ("ClusterRoleBinding", f"{PREFIX}-operator"),
        ("ClusterRole", f"{PREFIX}-gateway"), ("ClusterRoleBinding", f"{PREFIX}-gateway"),
        ("Deployment", f"{PREFIX}-operator"), ("Deployment", f"{PREFIX}-gateway"),
        ("Service", f"{PREFIX}-gateway"), ("PodDisruptionBudget", f"{PREFIX}-gateway"),
        # two operators, one leading (a Lease), and a PodDisruptionBudget for them too
        ("Role", f"{PREFIX}-operator-leader"), ("RoleBinding", f"{PREFIX}-operator-leader"),
        ("PodDisruptionBudget", f"{PREFIX}-operator"),
    ])
    for obj in stored:
        if obj["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", ["default_install", "namespaced_install", "everything_install"])
def test_every_object_passes_kubernetes_validate(variant, k8s_version, request):
    _, stored = request.getfixturevalue(variant)
    checked = 0
    for obj in stored:
        if obj["kind"] == "ServiceMonitor":
            continue  # not a Kubernetes API type: checked in test_optional_objects
        clean = {k: v for k, v in obj.items() if k != "status"}
        try:
            kubernetes_validate.validate(clean, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {e.message} at {list(e.path)}")
        checked += 1
    assert checked >= 10


def test_every_object_has_the_recommended_labels(everything_install):
    _, stored = everything_install
    for obj in stored:
        if obj["kind"] == "CustomResourceDefinition":
            continue  # from crds/, not templated: Helm never labels or upgrades CRDs
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "caffe-serving"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == APP_VERSION
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "caffe-serving"
        assert labels["app.kubernetes.io/component"] in ("operator", "gateway", "model-server")
        assert labels["helm.sh/chart"] == "caffe-serving-0.1.0"


def test_notes_tell_the_user_what_to_do_next(default_install):
    notes = default_install[0]["info"]["notes"]
    examples = "https://github.com/caffe-serving/caffe-serving/raw/v0.1.0/examples/digits"
    assert f"kubectl apply -n caffe-system -f {examples}/service.yaml" in notes
    assert f"curl -sLO {examples}/request.json" in notes
    # a packaged chart holds neither examples/ nor docs/: every file it names is a URL
    assert not re.search(r"(?<![/\w])(examples|docs)/", notes), notes
    assert f"kubectl port-forward -n caffe-system svc/{PREFIX}-gateway 8080:80" in notes
    assert "curl -s localhost:8080/v2/models/digits" in notes
    assert "every namespace" in notes


# --------------------------------------------------------------------------------------------
# the operator and gateway Deployments
# --------------------------------------------------------------------------------------------
def test_pods_meet_pod_security_restricted(everything_install):
    _, stored = everything_install
    for dep in find(stored, "Deployment"):
        assert restricted_violations(dep["spec"]["template"]["spec"]) == [], dep["metadata"]["name"]


def test_operator_runs_two_replicas_one_leading_with_the_server_image_and_gateway_url(default_install):
    _, stored = default_install
    dep = one(stored, "Deployment", f"{PREFIX}-operator")
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == f"{PREFIX}-operator"
    (c,) = pod["containers"]
    assert c["image"] == f"ghcr.io/caffe-serving/caffe-serving-operator:{APP_VERSION}"
    assert c["command"] + c["args"] == [
        "caffeserve", "operator", "--all-namespaces", "--liveness", "http://0.0.0.0:8081/healthz",
        "--leader-elect", "--lease-name", "caffe-serving-operator"]
    fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "valueFrom" in e}
    assert fields["POD_NAME"] == "metadata.name" and fields["POD_NAMESPACE"] == "metadata.namespace"
    env = {e["name"]: e.get("value") for e in c["env"]}
    # The default server image is the one the operator would fall back to (one image name, two places).
    assert env["CAFFESERVE_SERVER_IMAGE"] == manifests.DEFAULT_SERVER_IMAGE == \
        f"ghcr.io/caffe-serving/caffe-server-gpu:{APP_VERSION}"
    assert env["CAFFESERVE_GATEWAY_URL"] == f"http://{PREFIX}-gateway.{NAMESPACE}.svc"
    assert env["CAFFESERVE_GATEWAY_GRPC_ADDRESS"] == f"{PREFIX}-gateway.{NAMESPACE}.svc:8081"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_server_image_digest_pins_the_image(everything_install):
    _, stored = everything_install
    (c,) = one(stored, "Deployment", f"{PREFIX}-operator")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CAFFESERVE_SERVER_IMAGE"] == "registry.example/caffe-gpu@sha256:" + "ab" * 32


def test_gateway_scales_on_its_own_behind_its_service(default_install, everything_install):
    _, stored = default_install
    dep = one(stored, "Deployment", f"{PREFIX}-gateway")
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == f"{PREFIX}-gateway"
    (c,) = pod["containers"]
    assert c["image"] == f"ghcr.io/caffe-serving/caffe-serving-operator:{APP_VERSION}"  # same image
    assert c["command"] + c["args"] == ["caffeserve", "gateway", "--kubernetes", "--all-namespaces", "--host",
                                        "0.0.0.0", "--port", "8080", "--grpc-port", "8081", "--grace", "30",
                                        "--drain-delay", "5"]
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "grpc", "containerPort": 8081, "protocol": "TCP"}]
    assert pod["terminationGracePeriodSeconds"] == 45  # 5 s drain delay + 30 s grace + a margin
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    svc = one(stored, "Service", f"{PREFIX}-gateway")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"},
        {"name": "grpc", "port": 8081, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}]
    # With autoscaling, the HPA owns the replica count.
    _, stored = everything_install
    dep = one(stored, "Deployment", f"{PREFIX}-gateway")
    assert "replicas" not in dep["spec"]
    hpa = one(stored, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{PREFIX}-gateway"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)


def test_gateway_grpc_can_be_turned_off_or_moved():
    _, stored = install({"gateway": {"grpc": {"enabled": False}}})
    (c,) = one(stored, "Deployment", f"{PREFIX}-gateway")["spec"]["template"]["spec"]["containers"]
    assert "--no-grpc" in c["args"] and "--grpc-port" not in c["args"]
    assert [p["name"] for p in c["ports"]] == ["http"]
    assert [p["name"] for p in one(stored, "Service", f"{PREFIX}-gateway")["spec"]["ports"]] == ["http"]
    (op,) = one(stored, "Deployment", f"{PREFIX}-operator")["spec"]["template"]["spec"]["containers"]
    assert "CAFFESERVE_GATEWAY_GRPC_ADDRESS" not in {e["name"] for e in op["env"]}
    _, stored = install({"gateway": {"grpc": {"port": 9001}, "service": {"grpcPort": 443}}})
    (c,) = one(stored, "Deployment", f"{PREFIX}-gateway")["spec"]["template"]["spec"]["containers"]
    assert c["args"][c["args"].index("--grpc-port") + 1] == "9001"
    (grpc_port,) = [p for p in one(stored, "Service", f"{PREFIX}-gateway")["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_port["port"] == 443 and grpc_port["targetPort"] == "grpc"
    (op,) = one(stored, "Deployment", f"{PREFIX}-operator")["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e.get("value") for e in op["env"]}["CAFFESERVE_GATEWAY_GRPC_ADDRESS"] == \
        f"{PREFIX}-gateway.{NAMESPACE}.svc:443"


def test_tracing_endpoint_reaches_the_gateway_and_the_model_pods_default():
    _, stored = install({"tracing": {"endpoint": "http://otel-collector.observability:4318", "sampleRatio": 0.1}})
    (c,) = one(stored, "Deployment", f"{PREFIX}-gateway")["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[args.index("--otlp-endpoint") + 1] == "http://otel-collector.observability:4318"
    assert args[args.index("--trace-sample-ratio") + 1] == "0.1"
    (op,) = one(stored, "Deployment", f"{PREFIX}-operator")["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e.get("value") for e in op["env"]}["CAFFESERVE_OTLP_ENDPOINT"] == \
        "http://otel-collector.observability:4318"
    _, stored = install({})  # off by default: neither is told anything
    (c,) = one(stored, "Deployment", f"{PREFIX}-gateway")["spec"]["template"]["spec"]["containers"]
    (op,) = one(stored, "Deployment", f"{PREFIX}-operator")["spec"]["template"]["spec"]["containers"]
    assert "--otlp-endpoint" not in c["args"] and "CAFFESERVE_OTLP_ENDPOINT" not in {e["name"] for e in op["env"]}


def test_model_cache_claim_reaches_the_operator_and_a_bad_name_is_refused():
    from caffe_operator.reconcile import OperatorConfig

    _, stored = install({"modelCache": {"claimName": "onnx-cache"}})
    (op,) = one(stored, "Deployment", f"{PREFIX}-operator")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in op["env"] if "value" in e}
    assert env["CAFFESERVE_MODEL_CACHE_CLAIM"] == "onnx-cache"
    assert OperatorConfig.from_env(env).model_cache_claim == "onnx-cache"  # what the operator mounts
    _, stored = install({})  # off by default
    (op,) = one(stored, "Deployment", f"{PREFIX}-operator")["spec"]["template"]["spec"]["containers"]
    assert "CAFFESERVE_MODEL_CACHE_CLAIM" not in {e["name"] for e in op["env"]}


def test_pod_tls_reaches_the_operator_and_the_gateway_with_the_ca_only():
    from caffe_operator.reconcile import OperatorConfig

    _, stored = install({"podTLS": {"secretName": "pod-tls"}})
    (op,) = one(stored, "Deployment", f"{PREFIX}-operator")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in op["env"] if "value" in e}
    config = OperatorConfig.from_env(env)
    assert (config.pod_tls_secret, config.pod_tls_ca, config.pod_tls_server_name) == (
        "pod-tls", "/etc/caffe-serving/pod-ca/ca.crt", "caffe-model-server")
    gateway = one(stored, "Deployment", f"{PREFIX}-gateway")["spec"]["template"]["spec"]
    (c,) = gateway["containers"]
    assert c["args"][c["args"].index("--upstream-ca") + 1] == "/etc/caffe-serving/pod-ca/ca.crt"
    assert c["args"][c["args"].index("--upstream-server-name") + 1] == "caffe-model-server"
    for spec in (gateway, one(stored, "Deployment", f"{PREFIX}-operator")["spec"]["template"]["spec"]):
        (volume,) = [v for v in spec["volumes"] if v["name"] == "pod-ca"]
        assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # not the pods' key
    _, stored = install({})  # off by default
    (op,) = one(stored, "Deployment", f"{PREFIX}-operator")["spec"]["template"]["spec"]["containers"]
    assert "CAFFESERVE_POD_TLS_SECRET" not in {e["name"] for e in op["env"]}
    (c,) = one(stored, "Deployment", f"{PREFIX}-gateway")["spec"]["template"]["spec"]["containers"]
    assert "--upstream-ca" not in c["args"]


def test_gateway_can_be_left_out():
    _, stored = install({"gateway": {"enabled": False}})
    assert not [o for o in stored if "gateway" in o["metadata"]["name"]]
    (c,) = one(stored, "Deployment", f"{PREFIX}-operator")["spec"]["template"]["spec"]["containers"]
    assert "CAFFESERVE_GATEWAY_URL" not in {e["name"] for e in c["env"]}  # status.url: the model Services


# --------------------------------------------------------------------------------------------
# RBAC scope (what each rule is for: test_e2e.py proves the rules are exactly what is used)
# --------------------------------------------------------------------------------------------
def test_cluster_scope_binds_cluster_roles_to_each_component(default_install):
    _, stored = default_install
    for component in ("operator", "gateway"):
        binding = one(stored, "ClusterRoleBinding", f"{PREFIX}-{component}")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                      "name": f"{PREFIX}-{component}"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{PREFIX}-{component}",
                                        "namespace": NAMESPACE}]
    # the one namespaced grant: the operators' leader-election Lease, by name, in the release namespace
    (leader,) = find(stored, "Role")
    assert leader["metadata"]["namespace"] == NAMESPACE and leader["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["caffe-serving-operator"],
         "verbs": ["get", "update"]}]
    assert [b["metadata"]["name"] for b in find(stored, "RoleBinding")] == [f"{PREFIX}-operator-leader"]
    gateway_rules = one(stored, "ClusterRole", f"{PREFIX}-gateway")["rules"]
    assert gateway_rules == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["list", "watch"]}]
    for rule in one(stored, "ClusterRole", f"{PREFIX}-operator")["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        if "delete" in rule["verbs"]:  # only a canary's children, a ScaledObject and a NetworkPolicy, when the
            # spec or the chart drops them; every other child goes with its CR (garbage collection)
            assert set(rule["resources"]) <= {"configmaps", "services", "deployments", "scaledobjects",
                                              "networkpolicies"}, rule


def test_namespace_scope_grants_nothing_outside_the_watched_namespace(namespaced_install):
    _, stored = namespaced_install
    for component in ("operator", "gateway"):
        role = one(stored, "Role", f"{PREFIX}-{component}")
        binding = one(stored, "RoleBinding", f"{PREFIX}-{component}")
        assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "models"
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == NAMESPACE  # the service accounts stay with the release
    assert not find(stored, "ClusterRole") and not find(stored, "ClusterRoleBinding")
    for component in ("operator", "gateway"):
        (c,) = one(stored, "Deployment", f"{PREFIX}-{component}")["spec"]["template"]["spec"]["containers"]
        assert c["args"][1:3] == ["--namespace", "models"] or c["args"][2:4] == ["--namespace", "models"]


def test_namespace_scope_defaults_to_the_release_namespace():
    _, stored = install({"watch": {"scope": "namespace"}})
    assert one(stored, "Role", f"{PREFIX}-operator")["metadata"]["namespace"] == NAMESPACE


# --------------------------------------------------------------------------------------------
# optional objects
# --------------------------------------------------------------------------------------------
def test_optional_servicemonitors_and_networkpolicies(everything_install):
    _, stored = everything_install
    gateway_sm = one(stored, "ServiceMonitor", f"{PREFIX}-gateway")
    models_sm = one(stored, "ServiceMonitor", f"{PREFIX}-models")
    for sm in (gateway_sm, models_sm):
        assert sm["metadata"]["labels"]["release"] == "prometheus"
        assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s",
                                            "scrapeTimeout": "10s"}]
    gateway_svc = one(stored, "Service", f"{PREFIX}-gateway")
    assert gateway_sm["spec"]["selector"]["matchLabels"].items() <= gateway_svc["metadata"]["labels"].items()
    # The model servers' Services are the operator's {name}-predictor, labelled caffeserving.io/model.
    assert models_sm["spec"]["selector"] == {"matchExpressions": [
        {"key": manifests.MODEL_LABEL, "operator": "Exists"}]}
    assert models_sm["spec"]["namespaceSelector"] == {"any": True}
    operator_np = one(stored, "NetworkPolicy", f"{PREFIX}-operator")
    assert operator_np["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in operator_np["spec"]
    gateway_np = one(stored, "NetworkPolicy", f"{PREFIX}-gateway")
    assert gateway_np["spec"]["ingress"] == [{
        "ports": [{"port": "http", "protocol": "TCP"}, {"port": "grpc", "protocol": "TCP"}],
        "from": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}],
    }]


def test_servicemonitors_need_their_crd():
    with pytest.raises(HelmError, match="ServiceMonitor"):
        install({"metrics": {"serviceMonitor": {"enabled": True}}})


# --------------------------------------------------------------------------------------------
# values.yaml and values.schema.json
# --------------------------------------------------------------------------------------------
def test_values_yaml_passes_its_schema():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.validate(VALUES, SCHEMA)


def schema_at(path: str) -> dict[str, Any] | None:
    """The schema of a dotted values path; a free-form object (resources, securityContext) covers
    everything under it. None: the schema does not know the path."""
    node = SCHEMA
    for key in path.split("."):
        props = node.get("properties")
        if props is None:
            return node if node.get("type") == "object" else None
        node = props.get(key)
        if node is None:
            return None
    return node


def values_keys() -> list[tuple[int, str, str]]:
    """(line number, dotted path, the line above) of every key in values.yaml."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        out.append((i + 1, ".".join(k for _, k in stack), lines[i - 1].strip() if i else ""))
    return out


def test_every_value_is_documented():
    """Each setting in values.yaml has a comment right above it; keys inside a Kubernetes object
    (resources.requests.cpu, podSecurityContext.runAsUser) are covered by that object's comment."""
    undocumented = []
    for line, path, above in values_keys():
        parent = schema_at(path.rpartition(".")[0]) if "." in path else None
        if parent is not None and ("properties" not in parent or parent["description"].startswith("Kubernetes ")):
            continue
        if not above.startswith("#"):
            undocumented.append(f"line {line}: {path}")
    assert undocumented == []


def leaf_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in leaf_paths(v, f"{prefix}.{k}" if prefix else k)]
    return [prefix]


def test_schema_describes_every_value():
    missing = [p for p in leaf_paths(VALUES) if schema_at(p) is None]
    assert missing == []


BAD_VALUES = {
    "unknown top-level key": ({"replicaCount": 3}, "replicaCount"),
    "misspelt nested key": ({"gateway": {"replica": 3}}, "replica"),
    "negative replicas": ({"gateway": {"replicas": -1}}, "replicas"),
    "replicas as a string": ({"gateway": {"replicas": "two"}}, "replicas"),
    "unknown watch scope": ({"watch": {"scope": "galaxy"}}, "scope"),
    "namespace that is not a DNS label": ({"watch": {"namespace": "Models!"}}, "namespace"),
    "image repository with a tag in it": ({"server": {"image": {"repository": "Caffe GPU"}}}, "repository"),
    "digest that is not sha256": ({"operator": {"image": {"digest": "md5:abc"}}}, "digest"),
    "pull policy typo": ({"operator": {"image": {"pullPolicy": "Sometimes"}}}, "pullPolicy"),
    "port out of range": ({"gateway": {"port": 70000}}, "port"),
    "grpc port out of range": ({"gateway": {"grpc": {"port": 0}}}, "port"),
    "grpc flag as a string": ({"gateway": {"grpc": {"enabled": "yes"}}}, "enabled"),
    "service type typo": ({"gateway": {"service": {"type": "Ingress"}}}, "type"),
    "bad scrape interval": ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "interval"),
    "extraArgs not strings": ({"operator": {"extraArgs": [1, 2]}}, "extraArgs"),
    "tracing endpoint without a scheme": ({"tracing": {"endpoint": "otel-collector:4318"}}, "endpoint"),
    "sample ratio above 1": ({"tracing": {"sampleRatio": 2}}, "sampleRatio"),
}


def merged(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: merged(base.get(k), v) for k, v in override.items()}}
    return override


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(case):
    override, field = BAD_VALUES[case]
    errors = list(jsonschema.Draft7Validator(SCHEMA).iter_errors(merged(VALUES, override)))
    assert errors, f"{case} was accepted"
    assert any(field in (list(e.absolute_path) + [e.message]).__str__() for e in errors), [e.message for e in errors]


@pytest.mark.parametrize("case", ["negative replicas", "unknown watch scope", "unknown top-level key"])
def test_helm_install_refuses_bad_values_naming_the_field(case):
    """The same schema through Helm itself: the install fails before any template is applied."""
    override, field = BAD_VALUES[case]
    with helm_cluster() as cluster:
        with pytest.raises(HelmError, match=field) as raised:
            helm_install(cluster, RELEASE, NAMESPACE, override)
        assert "values don't meet the specifications of the schema" in str(raised.value)
        assert cluster.get_object("apps/v1/deployments", NAMESPACE, f"{PREFIX}-operator") is None


def test_autoscaling_bounds_must_be_ordered():
    with helm_cluster() as cluster:
        with pytest.raises(HelmError, match="minReplicas"):
            helm_install(cluster, RELEASE, NAMESPACE,
                         {"gateway": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}})


# --------------------------------------------------------------------------------------------
# the CRD: one source
# --------------------------------------------------------------------------------------------
def test_chart_crd_is_the_generated_crd():
    """charts/caffe-serving/crds/ holds a copy of crds/caffemodelservices.yaml (`caffeserve crd`):
    a copy, not a symlink, so the chart folder is complete on its own (packaged, vendored, checked
    out where symlinks are not). This test fails whenever the copy drifts."""
    chart_copy = (CHART / "crds" / "caffemodelservices.yaml").read_text()
    assert chart_copy == crd_yaml(), "run: make crd"
    assert chart_copy == (REPO / "crds" / "caffemodelservices.yaml").read_text()
    pool_copy = (CHART / "crds" / "caffeservingpools.yaml").read_text()
    assert pool_copy == crd_yaml("CaffeServingPool") == (REPO / "crds" / "caffeservingpools.yaml").read_text(), \
        "run: make crd"
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == ["caffemodelservices.yaml", "caffeservingpools.yaml"]


def test_helm_installed_the_crds_and_the_api_serves_them(default_install):
    _, stored = default_install
    crds = {c["metadata"]["name"]: c for c in find(stored, "CustomResourceDefinition")}
    assert crds["caffemodelservices.caffeserving.io"]["spec"] == custom_resource_definition()["spec"]
    assert crds["caffeservingpools.caffeserving.io"]["spec"] == pool_custom_resource_definition()["spec"]


POOLS = [
    {"name": "whole", "replicas": 2, "modelMemory": "8Gi", "modelClaims": ["models"]},
    {"name": "sliced", "modelMemory": "4Gi", "gpu": {"sharing": "timeSlicing"}},
    {"name": "mig", "gpu": {"sharing": "mig", "migProfile": "1g.10gb"}},
    {"name": "hami", "gpu": {"sharing": "hami", "memoryMiB": 6144, "coresPercent": 25}},
]


def test_chart_renders_pools_with_each_gpu_sharing_mode():
    """values.pools become CaffeServingPools (over poolDefaults) that the operator's own types accept,
    and their pods ask for the GPU resource each sharing mode names."""
    release, stored = install({"poolDefaults": {"gpu": {"sharing": "whole", "count": 1}}, "pools": POOLS})
    pools = {p["metadata"]["name"]: p for p in find(stored, "CaffeServingPool")}
    assert sorted(pools) == ["hami", "mig", "sliced", "whole"]
    limits = {}
    for name, pool in pools.items():
        assert pool["metadata"]["namespace"] == NAMESPACE
        spec = parse_pool_spec(name, pool["spec"])
        container = pool_deployment(name, NAMESPACE, spec)["spec"]["template"]["spec"]["containers"][0]
        limits[name] = {k: v for k, v in container["resources"]["limits"].items() if k.startswith("nvidia.com/")}
    assert limits == {
        "whole": {"nvidia.com/gpu": 1},
        "sliced": {"nvidia.com/gpu.shared": 1},
        "mig": {"nvidia.com/mig-1g.10gb": 1},
        "hami": {"nvidia.com/gpu": 1, "nvidia.com/gpumem": 6144, "nvidia.com/gpucores": 25},
    }
    assert parse_pool_spec("whole", pools["whole"]["spec"]).replicas == 2


def test_schema_rejects_an_unknown_gpu_sharing_mode():
    with helm_cluster() as cluster:
        with pytest.raises(HelmError, match="sharing"):
            helm_install(cluster, RELEASE, NAMESPACE, {"pools": [{"name": "p", "gpu": {"sharing": "shared"}}]})


# --------------------------------------------------------------------------------------------
# the images
# --------------------------------------------------------------------------------------------
def dockerfile(name: str) -> str:
    return (REPO / name).read_text()


def final_stage(text: str) -> str:
    return re.split(r"^FROM ", text, flags=re.M)[-1]


@pytest.mark.parametrize("name", ["Dockerfile.operator", "Dockerfile.caffe-gpu"])
def test_images_run_as_the_uid_the_pods_ask_for(name, default_install):
    stage = final_stage(dockerfile(name))
    assert re.search(r"^USER 1000:1000$", stage, re.M), "the final stage must switch to uid/gid 1000"
    assert "useradd --uid 1000 --gid 1000" in stage
    # The chart's pods and the operator's model pods run as that uid, never as root.
    assert VALUES["podSecurityContext"]["runAsUser"] == manifests.RUN_AS == 1000


def entrypoint(text: str) -> list[str]:
    stage = final_stage(text)
    ep = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", stage, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", stage, re.M).group(1))
    return ep + cmd


def test_operator_image_runs_the_commands_the_chart_gives_it(default_install):
    text = dockerfile("Dockerfile.operator")
    assert entrypoint(text) == ["caffeserve", "operator", "--all-namespaces"]
    assert re.search(r"^FROM python:3\.12-slim", text.replace("${PYTHON_IMAGE}", "python:3.12-slim-bookworm"), re.M)
    assert 'pip install --no-cache-dir ".[operator,tracing]"' in text  # the gateway traces when the chart says so
    _, stored = default_install
    for component in ("operator", "gateway"):
        (c,) = one(stored, "Deployment", f"{PREFIX}-{component}")["spec"]["template"]["spec"]["containers"]
        assert c["command"] == ["caffeserve"] and c["args"][0] == component


def test_server_image_runs_what_the_operator_puts_in_model_pods():
    text = dockerfile("Dockerfile.caffe-gpu")
    assert entrypoint(text) == manifests.SERVE_COMMAND
    assert '"/src[s3,tracing]"' in text  # a CR's spec.runtime.tracing needs the SDK in the image


def test_gpu_image_builds_the_cpu_builds_source_with_the_same_script():
    """One Caffe source (the PyPI sdist) and one build script (scripts/caffe/build_caffe.sh, through
    install_pycaffe.sh) for the CPU pycaffe and the GPU image; CUDA 13 with cuDNN 9 for ONNX Runtime."""
    text = dockerfile("Dockerfile.caffe-gpu")
    assert "github.com" not in text and "CAFFE_COMMIT" not in text, "the image builds the sdist, not a GitHub tarball"
    assert re.search(r"install_pycaffe\.sh /opt/venv \\\n\s+--cuda /usr/local/cuda", text)
    install = (REPO / "scripts" / "caffe" / "install_pycaffe.sh").read_text()
    build = (REPO / "scripts" / "caffe" / "build_caffe.sh").read_text()
    assert 'build_caffe.sh" "$@" --python "$PY"' in install  # CPU (no options) and CUDA (--cuda ...) alike
    assert re.search(r"^SDIST_VERSION=9\.0\.2$", build, re.M) and 'brocolli-caffe==$SDIST_VERSION' in build
    cuda = re.search(r"^ARG CUDA_VERSION=(\d+)\.(\d+)\.(\d+)$", text, re.M)
    assert cuda.group(1) == "13", "onnxruntime-gpu (<= 1.31.1) is built for CUDA 13"
    archs = re.search(r'^ARG CUDA_ARCH_BIN="([\d ]+)"$', text, re.M).group(1).split()
    assert "90" in archs and all(int(a) >= 75 for a in archs), "CUDA 13 builds sm_75 and newer"
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_VERSION\}-devel-", text, re.M)
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_VERSION\}-cudnn-runtime-", text, re.M), "cuDNN 9 for ONNX Runtime"
    assert '"onnxruntime-gpu>=1.24,<=1.31.1"' in text
    assert "-DUSE_CUDNN=OFF" in build  # Caffe's cuDNN code predates cuDNN 8
    assert "-DBUILD_python_layer=ON" not in build and "BUILD_python_layer" not in text  # the GIL patch needs none


def test_both_builds_apply_the_same_source_patches():
    """build_caffe.sh patches every build through scripts/caffe/apply_patches.py (GIL release, 2 GiB protobuf
    reads, the forks' layers), a CUDA build with --cuda (also patch_caffe_cuda.py); the image's install runs
    the same script, so the image and the CPU pycaffe get the same patches."""
    build = (REPO / "scripts" / "caffe" / "build_caffe.sh").read_text()
    assert '"$PY" "$HERE/apply_patches.py" source "$src" "${CUDA_FLAG[@]}"' in build
    assert 'CUDA_FLAG=(); [ -z "$CUDA_ROOT" ] || CUDA_FLAG=(--cuda)' in build
    assert "/src/scripts/caffe/install_pycaffe.sh" in dockerfile("Dockerfile.caffe-gpu")


def test_dockerignore_keeps_the_venv_and_git_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".venv", ".git", "tests", "charts"):
        assert path in ignored
    for needed in ("scripts", "caffeserve", "caffe_http", "inference_server", "caffe_gateway", "operator",
                   "pyproject.toml", "README.md"):
        assert needed not in ignored


# --------------------------------------------------------------------------------------------
# security: TLS, tokens, the admin calls (docs/security.md)
# --------------------------------------------------------------------------------------------
SECURED = {"gateway": {"tls": {"secretName": "gateway-tls"},
                       "auth": {"mode": "tokenreview", "groups": ["system:serviceaccounts:team-a", "ops"],
                                "audiences": ["caffe-serving"]},
                       "adminApi": {"enabled": True, "users": ["alice"], "groups": ["ml-admins"]}}}


def test_gateway_tls_and_tokenreview_reach_its_flags_volumes_probes_and_rbac():
    _, stored = install(SECURED)
    dep = one(stored, "Deployment", f"{PREFIX}-gateway")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = c["args"]
    flags = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--") and not args[i + 1].startswith("--")}
    assert flags["--tls-dir"] == "/etc/caffe-serving/tls" and flags["--auth"] == "tokenreview"
    assert flags["--auth-groups"] == "system:serviceaccounts:team-a,ops" and flags["--auth-audience"] == "caffe-serving"
    assert "--admin-api" in args and flags["--admin-users"] == "alice" and flags["--admin-groups"] == "ml-admins"
    # the parser the gateway runs accepts exactly these
    from caffe_gateway.main import parser
    parsed = parser().parse_args(args[1:])
    assert parsed.tls_dir == "/etc/caffe-serving/tls" and parsed.admin_api
    assert {"name": "tls", "mountPath": "/etc/caffe-serving/tls", "readOnly": True} in c["volumeMounts"]
    assert {v["name"]: v for v in pod["volumes"]}["tls"]["secret"]["secretName"] == "gateway-tls"
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS" and c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    binding = one(stored, "ClusterRoleBinding", f"{PREFIX}-gateway-auth-delegator")
    assert binding["roleRef"]["name"] == "system:auth-delegator"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{PREFIX}-gateway", "namespace": NAMESPACE}]


def test_gateway_static_tokens_mount_their_secret():
    _, stored = install({"gateway": {"auth": {"mode": "tokens", "tokensSecret": "gateway-tokens"}}})
    pod = one(stored, "Deployment", f"{PREFIX}-gateway")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][c["args"].index("--auth-token-file") + 1] == "/etc/caffe-serving/tokens/tokens.csv"
    assert {v["name"]: v for v in pod["volumes"]}["tokens"]["secret"]["secretName"] == "gateway-tokens"
    assert "scheme" not in c["readinessProbe"]["httpGet"]  # no TLS: plain HTTP probes
    assert not find(stored, "ClusterRoleBinding", f"{PREFIX}-gateway-auth-delegator")


@pytest.mark.parametrize("values, message", [
    ({"adminApi": {"enabled": True, "users": ["alice"]}}, "gateway.adminApi.enabled needs gateway.auth.mode"),
    ({"auth": {"mode": "tokens"}}, "gateway.auth.tokensSecret is required"),
])
def test_security_values_that_do_not_fit_fail_the_install_with_a_message(values, message):
    with helm_cluster() as cluster:
        with pytest.raises(HelmError, match=message):
            helm_install(cluster, RELEASE, NAMESPACE, {"gateway": values})

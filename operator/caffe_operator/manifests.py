"""Child manifests of one variant of a CaffeModelService: pure functions of (variant, namespace).

A variant (variants.py: the primary, or the canary) carries its own spec, names and labels, so
the same builders make both. The same spec always gives the same children, byte for byte, so the
operator can create-or-patch them on every event (level-based), tests can check them without a
cluster, and `caffeserve up` can run the very same server config locally. Below, the primary's
names; the canary's are `{name}-canary-config` and `{name}-canary`.

- ConfigMap `{name}-config`: `config.yaml`, a `caffeserve serve` config (inference_server.config).
- Deployment `{name}-predictor`: the server container, model files under /models (PVC subPath,
  ConfigMap volume, or an emptyDir filled by `caffeserve fetch` init containers), GPU limits,
  probes on the V2 health endpoints, the Pod Security "restricted" profile, and a config-hash
  annotation on the pod template so that any change to what the pods see rolls them. `replicas`
  as the variant says (none while autoscaled).
- The shared ONNX cache, when the operator is given a PVC (`CAFFESERVE_MODEL_CACHE_CLAIM`, the chart's
  `modelCache.claimName`): mounted read-write at /var/cache/caffe-serving and named in the config
  (`onnxCache.sharedDir`), so that `backend: auto` on a new pod skips the conversion.
- Service `{name}-predictor`: port `http` 8080 in front of the pods, and `grpc` 8081 (appProtocol
  grpc) unless spec.runtime.grpc.enabled is false; the variant's traffic labels for the gateway.
- NetworkPolicy `{name}-predictor`, when the operator is given the peers allowed in
  (`CAFFESERVE_NETWORK_POLICY_FROM`, set by the chart's `networkPolicy.enabled`): ingress to the
  variant's pods on the Service's ports from those peers only (the gateway, the operator, and
  what the chart adds, e.g. Prometheus).

Every container has a memory limit (the server's from `spec.resources`, else DEFAULT_MEMORY_LIMIT;
a container without one can take a node's memory), and every emptyDir a `sizeLimit`.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from dataclasses import dataclass
from typing import Any

import yaml

from caffe_operator.api import CaffeModelServiceSpec, RuntimeDevice

# the model's names and labels live in variants.py; these stay reachable here for callers of this module
from caffe_operator.variants import (
    MANAGED_BY as MANAGED_BY,
    Variant,
    predictor_name as predictor_name,
    selector_string as selector_string,
)
from inference_server.config import Grpc, ModelServing, OnnxCache, ServerConfig
from inference_server.slices import (
    GRPC_PORT,
    GRPC_PORT_NAME,
    MODEL_LABEL as MODEL_LABEL,  # the pods' contract (slices.py)
    PORT as PORT,  # the pods' HTTP port, for reconcile
    PORT_NAME,
)

CONFIG_DIR = "/etc/caffeserve"
CONFIG_KEY = "config.yaml"
MODEL_DIR = "/models"
RUN_AS = 1000  # the uid/gid the server images run as (numeric, for runAsNonRoot)
# A model pod's memory limit when spec.resources sets none (a request without a limit sets it too):
# room for AlexNet-size weights, their Net and the request buffers. Big nets set their own.
DEFAULT_MEMORY_LIMIT = "4Gi"
TMP_SIZE_LIMIT = "1Gi"  # /tmp (an emptyDir): ONNX conversions, Python's scratch files
# The chart's modelCache.claimName (CAFFESERVE_MODEL_CACHE_CLAIM): a PVC mounted read-write here in every model
# pod and named as the server config's onnxCache.sharedDir, so that a new pod (a new node, a scale-up) finds
# the converted graph and its verdict instead of converting again (inference_server/loading/onnx_cache.py)
MODEL_CACHE_DIR = "/var/cache/caffe-serving"
MODEL_CACHE_VOLUME = "model-cache"
# The chart's podTLS.secretName (CAFFESERVE_POD_TLS_SECRET): a kubernetes.io/tls Secret in the model's namespace,
# mounted here in every model and pool pod, whose server then serves REST and gRPC over TLS (`--tls-dir`); its
# probes and Prometheus scrape say https. The operator and the gateway check the pods' certificates against its
# ca.crt (mounted from the release namespace's Secret of that name at POD_TLS_CA_FILE).
POD_TLS_DIR = "/etc/caffe-serving/tls"
POD_TLS_VOLUME = "tls"
POD_TLS_CA_FILE = "/etc/caffe-serving/pod-ca/ca.crt"
S3_CREDENTIALS_DIR = "/var/run/secrets/caffeserve/s3"  # source.s3.secretRef's keys as files (fetch containers only)
MODELS_SIZE_LIMIT = "20Gi"  # /models for downloaded files (source.url, source.s3); fetch caps a file at 8 GiB

CONFIG_HASH_ANNOTATION = "caffeserving.io/config-hash"
DEFAULT_SERVER_IMAGE = "ghcr.io/caffe-serving/caffe-server-gpu:0.1.0"

SERVE_COMMAND = [
    "caffeserve",
    "serve",
    "--config",
    f"{CONFIG_DIR}/{CONFIG_KEY}",
    "--host",
    "0.0.0.0",
    "--port",
    str(PORT),
]
GRPC_ARGS = ["--grpc-port", str(GRPC_PORT)]


def serve_command(spec: CaffeModelServiceSpec) -> list[str]:
    """The server container's command: REST on 8080, and gRPC on 8081 unless turned off."""
    return SERVE_COMMAND + (GRPC_ARGS if spec.runtime.grpc.enabled else [])
# On SIGTERM the server turns its readiness 503 at once and keeps its listener open this long, so that
# the endpoints controller, kube-proxy and the gateway stop sending before it closes (Knative's
# queue-proxy and Envoy drain the same way); then it finishes what it received within the grace
# period. No preStop hook is needed: a `sleep` preStop would only delay the SIGTERM, while this delay
# also turns readiness false at once and closes each kept-alive connection after its next response.
DRAIN_DELAY_S = 5
GRACE_PERIOD_S = 30
SERVE_ARGS = ["--drain-delay", str(DRAIN_DELAY_S), "--grace-period", str(GRACE_PERIOD_S)]
# The kubelet's SIGKILL comes after the drain, the grace period and a margin for the exit itself.
TERMINATION_GRACE_S = DRAIN_DELAY_S + GRACE_PERIOD_S + 5

# Optional pod-spec fields that come from the CR: when the CR drops one, the patch must remove it.
OPTIONAL_POD_FIELDS = (
    "nodeSelector", "tolerations", "affinity", "runtimeClassName", "priorityClassName",
    "imagePullSecrets", "serviceAccountName", "initContainers",
)


def service_url(name: str, namespace: str, tls: bool = False) -> str:
    return f"{'https' if tls else 'http'}://{predictor_name(name)}.{namespace}.svc:{PORT}/v2/models/{name}"


def model_url(name: str, namespace: str, gateway_url: str | None = None, tls: bool = False) -> str:
    """Where clients reach the model: through the gateway when there is one, else the Service (https when
    the pods serve over TLS)."""
    if gateway_url:
        return f"{gateway_url.rstrip('/')}/v2/models/{name}"
    return service_url(name, namespace, tls)


def grpc_address(name: str, namespace: str, spec: CaffeModelServiceSpec | None,
                 gateway_grpc_address: str | None = None) -> str | None:
    """Where gRPC clients reach the model (host:port; each call names the model): the gateway's
    gRPC address when there is one, else the Service's port grpc; None when gRPC is off (or the
    spec is not known)."""
    if spec is None or not spec.runtime.grpc.enabled:
        return None
    if gateway_grpc_address:
        return gateway_grpc_address
    return f"{predictor_name(name)}.{namespace}.svc:{GRPC_PORT}"


# --------------------------------------------------------------------------------------------
# the server config
# --------------------------------------------------------------------------------------------
def server_config(name: str, spec: CaffeModelServiceSpec, model_dir: str = MODEL_DIR) -> ServerConfig:
    """The `caffeserve serve` config the pods run: the CR's serving fields, files under `model_dir`
    (/models in a pod; local mode passes its own folder)."""
    m, rt = spec.model, spec.runtime
    paths = {f.role: f.path(model_dir) for f in spec.model_files()}
    preprocessing = None
    if m.preprocessing is not None:
        preprocessing = m.preprocessing.model_copy(update={"mean_file": paths.get("meanFile")})
    # Every serving field of the server config, from spec.model or spec.runtime (test_crd checks
    # that each has a home there), so a field added to the config reaches the pods unchanged.
    serving = {
        field: getattr(m if field in type(m).model_fields else rt, field)
        for field in ModelServing.model_fields if field != "device"
    }
    serving["preprocessing"] = preprocessing
    return ServerConfig(
        name=name,
        version=m.version,
        # the port is the pod's (the command says it too, so that each local replica can get its own)
        grpc=Grpc(enabled=rt.grpc.enabled, port=GRPC_PORT),
        model={
            "prototxt": paths["prototxt"],
            "weights": paths["weights"],
            "prototxt_sha256": m.prototxt_sha256,
            "weights_sha256": m.weights_sha256,
            "labels": paths.get("labels"),
            # only ever a folder of the model's own volume (api.py refuses other sources and paths)
            "python_layers": {"path": posixpath.normpath(posixpath.join(model_dir, m.python_layers.path))}
            if m.python_layers is not None else None,
        },
        device={"kind": rt.device.value if isinstance(rt.device, RuntimeDevice) else rt.device, "id": 0},
        **serving,
    )


def with_tracing_default(spec: CaffeModelServiceSpec, endpoint: str | None) -> CaffeModelServiceSpec:
    """The spec with the operator's OTLP endpoint (the chart's tracing.endpoint) where it sets none itself."""
    tracing = spec.runtime.tracing
    if not endpoint or tracing.endpoint:
        return spec
    runtime = spec.runtime.model_copy(update={"tracing": tracing.model_copy(update={"endpoint": endpoint})})
    return spec.model_copy(update={"runtime": runtime})


def server_config_yaml(name: str, spec: CaffeModelServiceSpec, model_cache: str | None = None) -> str:
    """The config as YAML, defaults left out: the server image applies its own, so an operator
    and a server of neighbouring versions still agree on the file. `model_cache` (a PVC's name): the
    shared ONNX cache is where the pods mount it."""
    cfg = server_config(name, spec)
    if model_cache:
        cfg.onnx_cache = OnnxCache(shared_dir=MODEL_CACHE_DIR)
    data = cfg.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True, mode="json")
    head: dict[str, Any] = {k: data.pop(k) for k in ("name", "version", "model") if k in data}
    return yaml.safe_dump({**head, **data}, sort_keys=False)


# --------------------------------------------------------------------------------------------
# children
# --------------------------------------------------------------------------------------------
def _metadata(name: str, namespace: str, v: Variant) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": v.labels}


def config_map(v: Variant, namespace: str, model_cache: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(v.config_name, namespace, v),
        "data": {CONFIG_KEY: server_config_yaml(v.model, v.spec, model_cache)},
    }


def _service_ports(spec: CaffeModelServiceSpec) -> list[dict[str, Any]]:
    ports = [{"name": PORT_NAME, "port": PORT, "targetPort": PORT, "protocol": "TCP", "appProtocol": "http"}]
    if spec.runtime.grpc.enabled:
        ports.append({"name": GRPC_PORT_NAME, "port": GRPC_PORT, "targetPort": GRPC_PORT, "protocol": "TCP",
                      "appProtocol": "grpc"})
    return ports


def service(v: Variant, namespace: str) -> dict[str, Any]:
    """The variant's Service; its labels (copied onto its EndpointSlices) tell the gateway the variant's traffic."""
    metadata = _metadata(v.resource_name, namespace, v)
    metadata["labels"] = {**v.labels, **v.traffic_labels}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {"type": "ClusterIP", "selector": v.selector, "ports": _service_ports(v.spec)},
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


def _server_resources(spec: CaffeModelServiceSpec) -> dict[str, Any]:
    resources = json.loads(json.dumps(spec.resources or {}))
    limits = resources.setdefault("limits", {})
    if "memory" not in limits:
        limits["memory"] = (resources.get("requests") or {}).get("memory") or DEFAULT_MEMORY_LIMIT
    if spec.runtime.device == RuntimeDevice.gpu:
        resources.setdefault("limits", {})[spec.runtime.gpu_resource] = spec.runtime.gpu_count
    return resources


def _fetch_resources(spec: CaffeModelServiceSpec) -> dict[str, Any]:
    """An init container gets the server's cpu/memory (so quotas and LimitRanges agree), never GPUs."""
    return {
        part: {k: v for k, v in values.items() if k in ("cpu", "memory", "ephemeral-storage")}
        for part, values in _server_resources(spec).items()
        if part in ("requests", "limits") and isinstance(values, dict)
    }


def _model_volume(spec: CaffeModelServiceSpec) -> dict[str, Any]:
    src = spec.source
    if src.pvc is not None:
        return {
            "name": "models",
            "persistentVolumeClaim": {"claimName": src.pvc.claim_name, "readOnly": src.pvc.read_only},
        }
    if src.config_map is not None:
        return {"name": "models", "configMap": {"name": src.config_map.name}}
    return {"name": "models", "emptyDir": {"sizeLimit": MODELS_SIZE_LIMIT}}


def _model_mount(spec: CaffeModelServiceSpec) -> dict[str, Any]:
    mount = {"name": "models", "mountPath": MODEL_DIR, "readOnly": True}
    if spec.source.pvc is not None and spec.source.pvc.path.strip("/"):
        mount["subPath"] = spec.source.pvc.path.strip("/")
    return mount


def _fetch_containers(spec: CaffeModelServiceSpec, image: str) -> list[dict[str, Any]]:
    """One init container per file: download, check the sha256, rename into place. A failure's last
    lines (`fetch: <why>`) become the container's termination message, which the operator reports."""
    if not spec.source.downloaded:
        return []
    s3 = spec.source.s3
    out = []
    for f in spec.model_files():
        assert f.url is not None, f.name  # a source that is downloaded gives every file a URL (api.ModelSpec.files)
        command = ["caffeserve", "fetch", "--url", f.url, "--dest", f.path(MODEL_DIR)]
        if f.sha256:
            command += ["--sha256", f.sha256]
        if s3 is not None and f.url.startswith("s3://"):
            if s3.endpoint:
                command += ["--s3-endpoint", s3.endpoint]
            if s3.region:
                command += ["--s3-region", s3.region]
            if s3.secret_ref is not None:
                command += ["--s3-credentials-dir", S3_CREDENTIALS_DIR]
        container: dict[str, Any] = {
            "name": f"fetch-{f.role.lower()}",
            "image": image,
            "command": command,
            "env": [{"name": "HOME", "value": "/tmp"}],
            "securityContext": _container_security(),
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": [{"name": "models", "mountPath": MODEL_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
        }
        if s3 is not None and s3.secret_ref is not None:  # as files, not environment variables
            container["volumeMounts"].append(
                {"name": "s3-credentials", "mountPath": S3_CREDENTIALS_DIR, "readOnly": True}
            )
        if spec.runtime.image_pull_policy:
            container["imagePullPolicy"] = spec.runtime.image_pull_policy
        if resources := _fetch_resources(spec):
            container["resources"] = resources
        out.append(container)
    return out


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _tolerations(spec: CaffeModelServiceSpec) -> list[dict[str, Any]]:
    tolerations = [dict(t) for t in spec.tolerations or []]
    if spec.runtime.device == RuntimeDevice.gpu and not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
        # GPU node pools are commonly tainted nvidia.com/gpu:NoSchedule (GKE, AKS, EKS guides).
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def with_pod_tls(pod: dict[str, Any], server: dict[str, Any], annotations: dict[str, str], secret: str) -> None:
    """A model or pool pod serving over TLS with `secret` (see POD_TLS_DIR): its volume and mount, `--tls-dir`,
    https probes and scrape."""
    pod["volumes"].append({"name": POD_TLS_VOLUME, "secret": {"secretName": secret, "defaultMode": 0o440}})
    server["volumeMounts"].append({"name": POD_TLS_VOLUME, "mountPath": POD_TLS_DIR, "readOnly": True})
    server["args"] = [*server["args"], "--tls-dir", POD_TLS_DIR]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        server[probe]["httpGet"]["scheme"] = "HTTPS"
    annotations["prometheus.io/scheme"] = "https"


def pod_template(v: Variant, image: str, model_cache: str | None = None, pod_tls: str | None = None) -> dict[str, Any]:
    """The pod template without its config-hash annotation; `model_cache`: the shared ONNX cache's PVC;
    `pod_tls`: the TLS Secret the server serves with."""
    spec = v.spec
    rt = spec.runtime
    startup_period = 5
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        _model_mount(spec),
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if model_cache:
        mounts.append({"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_DIR})
    server = {
        "name": "server",
        "image": image,
        "command": serve_command(spec),
        "args": SERVE_ARGS,
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}]
        + ([{"name": GRPC_PORT_NAME, "containerPort": GRPC_PORT, "protocol": "TCP"}] if rt.grpc.enabled else []),
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": _server_resources(spec),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
        # Startup waits for readiness (the model loaded): liveness never races a slow load, and a
        # model that never loads is restarted once the budget is spent, visibly (restarts, events).
        "startupProbe": _probe(
            "/v2/health/ready", startup_period, math.ceil(rt.startup_timeout_seconds / startup_period)
        ),
        "livenessProbe": _probe("/v2/health/live", 10, 3),
        "readinessProbe": _probe("/v2/health/ready", 5, 2),
    }
    if rt.image_pull_policy:
        server["imagePullPolicy"] = rt.image_pull_policy
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # drain delay + grace period + a margin (see DRAIN_DELAY_S)
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "containers": [server],
        "volumes": [
            {"name": "config", "configMap": {"name": v.config_name}},
            _model_volume(spec),
            {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}},
        ],
    }
    if model_cache:
        pod["volumes"].append({"name": MODEL_CACHE_VOLUME, "persistentVolumeClaim": {"claimName": model_cache}})
    if init := _fetch_containers(spec, image):
        pod["initContainers"] = init
    if spec.source.s3 is not None and spec.source.s3.secret_ref is not None:
        # readable by the pod's group (fsGroup) only; mounted into the fetch containers, not the server
        pod["volumes"].append({"name": "s3-credentials",
                               "secret": {"secretName": spec.source.s3.secret_ref.name, "defaultMode": 0o440}})
    optional = {
        "nodeSelector": spec.node_selector,
        "tolerations": _tolerations(spec),
        "affinity": spec.affinity,
        "runtimeClassName": spec.runtime_class_name,
        "priorityClassName": spec.priority_class_name,
        "imagePullSecrets": [s.model_dump(by_alias=True) for s in spec.image_pull_secrets]
        if spec.image_pull_secrets
        else None,
        "serviceAccountName": spec.service_account_name,
    }
    pod.update({k: v for k, v in optional.items() if v})
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}
    if pod_tls:
        with_pod_tls(pod, server, annotations, pod_tls)
    return {"metadata": {"labels": v.pod_labels, "annotations": annotations}, "spec": pod}


def config_hash(config: dict[str, Any], template: dict[str, Any]) -> str:
    """sha256 of everything the pods see: the ConfigMap's data and the pod template."""
    blob = json.dumps({"config": config.get("data"), "template": template}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def deployment(v: Variant, namespace: str, image: str, config: dict[str, Any],
               model_cache: str | None = None, pod_tls: str | None = None) -> dict[str, Any]:
    template = pod_template(v, image, model_cache, pod_tls)
    template["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] = config_hash(config, template)
    spec: dict[str, Any] = {} if v.replicas is None else {"replicas": v.replicas}
    spec.update({
        "selector": {"matchLabels": v.selector},
        # A new pod comes up (and loads the model) before an old one goes: no capacity dip.
        # It needs room for one more replica's GPUs during a rollout.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "progressDeadlineSeconds": v.spec.runtime.startup_timeout_seconds + 120,
        "revisionHistoryLimit": 3,
        "template": template,
    })
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(v.resource_name, namespace, v),
        "spec": spec,
    }


def network_policy(v: Variant, namespace: str, peers: list[dict[str, Any]]) -> dict[str, Any]:
    """Ingress to the variant's pods on its Service's ports (http, and grpc when on), from `peers`
    (NetworkPolicyPeers) only. It selects what the variant's Deployment selects."""
    ports = [{"port": p["targetPort"], "protocol": p.get("protocol", "TCP")} for p in _service_ports(v.spec)]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(v.resource_name, namespace, v),
        "spec": {
            "podSelector": {"matchLabels": v.selector},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": ports}],
        },
    }


@dataclass(frozen=True)
class Children:
    config_map: dict[str, Any]
    deployment: dict[str, Any]
    service: dict[str, Any]
    network_policy: dict[str, Any] | None = None

    def all(self) -> list[dict[str, Any]]:
        """In creation order: the policy and the config before the pods, the Service last (the
        gateway sees a variant once its Service's slices appear)."""
        first = [self.network_policy] if self.network_policy is not None else []
        return first + [self.config_map, self.deployment, self.service]


def server_image(spec: CaffeModelServiceSpec, default_image: str = DEFAULT_SERVER_IMAGE) -> str:
    return spec.runtime.image or default_image


def children(v: Variant, namespace: str, default_image: str = DEFAULT_SERVER_IMAGE,
             network_peers: list[dict[str, Any]] | None = None, model_cache: str | None = None,
             pod_tls: str | None = None) -> Children:
    """Every child of one variant (without owner references: the operator adds them); a
    NetworkPolicy when `network_peers` is given (None: no policy); the shared ONNX cache's PVC
    mounted where `model_cache` names one; serving over TLS with the Secret `pod_tls` names."""
    cm = config_map(v, namespace, model_cache)
    return Children(
        config_map=cm,
        deployment=deployment(v, namespace, server_image(v.spec, default_image), cm, model_cache, pod_tls),
        service=service(v, namespace),
        network_policy=network_policy(v, namespace, network_peers) if network_peers is not None else None,
    )

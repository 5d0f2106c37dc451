"""A pool's children and a pool model's Service: pure functions of the specs.

- Deployment `{pool}-pool`: `replicas` pods of the many-model server (`caffeserve serve
  --model-repository /repository --model-control-mode explicit`), holding no model at start; the
  operator loads each model through the repository API. The GPU resource comes from spec.gpu
  (pool_api.PoolGpu: whole, time-sliced, MIG or HAMi); the model claims are mounted at
  spec.modelMountPath/CLAIM (/models/CLAIM by default).
- The shared ONNX cache, when the operator is given a PVC (the chart's `modelCache.claimName`): mounted
  read-write in every pool pod as in a model's own (manifests.py), and named in each model's load config,
  so that a pool pod on a node with an empty local cache loads `auto`'s converted graph and verdict
  instead of converting again.
- NetworkPolicy `{pool}-pool` when the operator is given peers (the chart's networkPolicy.enabled), as
  for a model's own pods: ingress to the pool's pods on http and grpc from those peers only.
- A pool model `m` keeps its Service `m-predictor` (labels, traffic labels, ports as before), whose
  selector is the pool's pods that hold `m`: `caffeserving.io/pool: POOL` and `pool.caffeserving.io/m:
  loaded`, a label the operator sets on a pod once `m` is loaded there and removes before it unloads.

Why placement travels as pod labels (not annotations read by the gateway, not the CR status): the
endpoints controller then publishes each model's EndpointSlices from the pods that hold it, so the
gateway's discovery, balancing, canary split and drain work for pool models unchanged, a pod that
dies leaves every model's slices at once, and in-cluster clients of `m-predictor` reach the right pods
too. The gateway needs no read access to CRs or pods.
"""

from __future__ import annotations

import json
import math
import posixpath
from typing import Any

from caffe_operator import manifests
from caffe_operator.api import CaffeModelServiceSpec
from caffe_operator.pool_api import CaffeServingPoolSpec
from caffe_operator.variants import MANAGED_BY, Variant
from inference_server.config import DeviceKind, OnnxCache
from inference_server.slices import GRPC_PORT, GRPC_PORT_NAME, PORT, PORT_NAME

POOL_LABEL = "caffeserving.io/pool"
HOLDS_PREFIX = "pool.caffeserving.io/"  # + model name: "loaded" on a pool pod that holds the model
LOADED = "loaded"
REPOSITORY_DIR = "/repository"
POOL_MODEL_DIR = "/models"
# The pod's memory limit: the models' budget plus the server itself (Python, pycaffe, buffers).
SERVER_OVERHEAD_BYTES = 1 << 30


def holds_label(model: str) -> str:
    """The pod label that says a pool pod holds `model` (a model name is a DNS label of <= 53 chars)."""
    return HOLDS_PREFIX + model


def pool_name(pool: str) -> str:
    return f"{pool}-pool"


def pool_labels(pool: str) -> dict[str, str]:
    return {
        POOL_LABEL: pool,
        "app.kubernetes.io/name": "caffe-model-server",
        "app.kubernetes.io/instance": pool_name(pool),
        "app.kubernetes.io/component": "pool",
        "app.kubernetes.io/part-of": "caffe-serving",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def pool_selector_string(pool: str) -> str:
    return f"{POOL_LABEL}={pool}"


def model_selector(pool: str, model: str) -> dict[str, str]:
    """The pool pods that hold `model`: its Service's selector."""
    return {POOL_LABEL: pool, holds_label(model): LOADED}


def model_selector_string(pool: str, model: str) -> str:
    return ",".join(f"{k}={v}" for k, v in model_selector(pool, model).items())


# --------------------------------------------------------------------------------------------
# a model in the pool
# --------------------------------------------------------------------------------------------
def model_dir(spec: CaffeModelServiceSpec, mount_path: str = POOL_MODEL_DIR) -> str:
    """Where a pool pod sees the model's files: MOUNT/CLAIM/PATH (the pool mounts each claim)."""
    pvc = spec.source.pvc
    assert pvc is not None  # api.CaffeModelServiceSpec: a pool model's source is a PVC
    return posixpath.join(mount_path, pvc.claim_name, pvc.path.strip("/")).rstrip("/")


def load_config(name: str, spec: CaffeModelServiceSpec, device: str, mount_path: str = POOL_MODEL_DIR,
                model_cache: str | None = None) -> str:
    """The model's server config as the repository load's `parameters.config` (a JSON string): the
    same config its own pods would run (manifests.server_config), files under the pool's mount, on the
    pool's device (`gpu` or `cpu`: the pool decides, whatever the model's runtime.device says), with
    the shared ONNX cache where the pool's pods mount one (`model_cache`, a PVC's name)."""
    cfg = manifests.server_config(name, spec, model_dir(spec, mount_path))
    cfg.device.kind = DeviceKind(device)
    if model_cache:
        cfg.onnx_cache = OnnxCache(shared_dir=manifests.MODEL_CACHE_DIR)
    return json.dumps(cfg.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True, mode="json"),
                      sort_keys=True)


def model_service(v: Variant, namespace: str, pool: str) -> dict[str, Any]:
    """The pool model's Service: as its own pods' (manifests.service), selecting the pool pods that hold it."""
    svc = manifests.service(v, namespace)
    svc["spec"]["selector"] = model_selector(pool, v.model)
    svc["spec"]["ports"] = _ports()
    return svc


def _ports() -> list[dict[str, Any]]:
    return [
        {"name": PORT_NAME, "port": PORT, "targetPort": PORT, "protocol": "TCP", "appProtocol": "http"},
        {"name": GRPC_PORT_NAME, "port": GRPC_PORT, "targetPort": GRPC_PORT, "protocol": "TCP", "appProtocol": "grpc"},
    ]


# --------------------------------------------------------------------------------------------
# the pool's pods
# --------------------------------------------------------------------------------------------
SERVE_COMMAND = [
    "caffeserve", "serve",
    "--model-repository", REPOSITORY_DIR,
    "--model-control-mode", "explicit",
    "--host", "0.0.0.0",
    "--port", str(PORT),
    "--grpc-port", str(GRPC_PORT),
]


def serve_command(spec: CaffeServingPoolSpec) -> list[str]:
    """The pool server's command: its own memory budget is the pool's (a load past it is refused with 507,
    never an out-of-memory kill): device memory on a GPU, host memory on the CPU."""
    flag = "--gpu-memory-bytes" if spec.device == "gpu" else "--memory-bytes"
    return [*SERVE_COMMAND, flag, str(spec.budget_bytes)]


def _resources(spec: CaffeServingPoolSpec) -> dict[str, Any]:
    resources = json.loads(json.dumps(spec.resources or {}))
    limits = resources.setdefault("limits", {})
    if "memory" not in limits:
        # the models' host memory is at most their budget (on a GPU it is mostly device memory)
        limits["memory"] = str(spec.budget_bytes + SERVER_OVERHEAD_BYTES)
    if spec.device == "gpu":
        limits.update(spec.gpu.resources())
    return resources


def _tolerations(spec: CaffeServingPoolSpec) -> list[dict[str, Any]] | None:
    tolerations = [dict(t) for t in spec.tolerations or []]
    if spec.device == "gpu" and not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    return tolerations or None


def pool_deployment(pool: str, namespace: str, spec: CaffeServingPoolSpec,
                    default_image: str = manifests.DEFAULT_SERVER_IMAGE,
                    model_cache: str | None = None, pod_tls: str | None = None) -> dict[str, Any]:
    """The pool's Deployment: `replicas` empty many-model servers, ready before any model is loaded
    (the repository server is ready when it serves; each model's readiness is its own). `model_cache`:
    the shared ONNX cache's PVC, mounted read-write; `pod_tls`: the TLS Secret the server serves with."""
    labels = pool_labels(pool)
    startup_period = 5
    server: dict[str, Any] = {
        "name": "server",
        "image": spec.image or default_image,
        "command": serve_command(spec),
        "args": manifests.SERVE_ARGS,
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"},
                  {"name": GRPC_PORT_NAME, "containerPort": GRPC_PORT, "protocol": "TCP"}],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": _resources(spec),
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": True, "runAsNonRoot": True},
        "volumeMounts": [{"name": "repository", "mountPath": REPOSITORY_DIR},
                         {"name": "tmp", "mountPath": "/tmp"}]
        + [{"name": f"claim-{i}", "mountPath": f"{spec.model_mount_path}/{c}", "readOnly": True}
           for i, c in enumerate(spec.model_claims)]
        + ([{"name": manifests.MODEL_CACHE_VOLUME, "mountPath": manifests.MODEL_CACHE_DIR}] if model_cache else []),
        "startupProbe": {"httpGet": {"path": "/v2/health/live", "port": PORT_NAME}, "periodSeconds": startup_period,
                         "timeoutSeconds": 2,
                         "failureThreshold": math.ceil(spec.startup_timeout_seconds / startup_period)},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": PORT_NAME}, "periodSeconds": 10,
                          "timeoutSeconds": 2, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/v2/health/live", "port": PORT_NAME}, "periodSeconds": 5,
                           "timeoutSeconds": 2, "failureThreshold": 2},
    }
    if spec.image_pull_policy:
        server["imagePullPolicy"] = spec.image_pull_policy
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": manifests.RUN_AS, "runAsGroup": manifests.RUN_AS,
                            "fsGroup": manifests.RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": manifests.TERMINATION_GRACE_S,
        "containers": [server],
        "volumes": [{"name": "repository", "emptyDir": {"sizeLimit": "1Gi"}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": manifests.TMP_SIZE_LIMIT}}]
        + [{"name": f"claim-{i}", "persistentVolumeClaim": {"claimName": c, "readOnly": True}}
           for i, c in enumerate(spec.model_claims)]
        + ([{"name": manifests.MODEL_CACHE_VOLUME, "persistentVolumeClaim": {"claimName": model_cache}}]
           if model_cache else []),
    }
    optional = {
        "nodeSelector": spec.node_selector,
        "tolerations": _tolerations(spec),
        "runtimeClassName": spec.runtime_class_name,
        "priorityClassName": spec.priority_class_name,
        "imagePullSecrets": [s.model_dump(by_alias=True) for s in spec.image_pull_secrets]
        if spec.image_pull_secrets else None,
    }
    pod.update({k: v for k, v in optional.items() if v})
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}
    if pod_tls:
        manifests.with_pod_tls(pod, server, annotations, pod_tls)
    template = {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": pool_name(pool), "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": {POOL_LABEL: pool}},
            # a new pod comes up empty; the operator places models on it, then the old one goes
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": template,
        },
    }


def pool_network_policy(pool: str, namespace: str, peers: list[dict[str, Any]]) -> dict[str, Any]:
    """Ingress to every pod of the pool on http and grpc, from `peers` (NetworkPolicyPeers) only: the
    same rule a model's own pods get (manifests.network_policy), over the pool's pod selector."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": pool_name(pool), "namespace": namespace, "labels": pool_labels(pool)},
        "spec": {
            "podSelector": {"matchLabels": {POOL_LABEL: pool}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": [{"port": PORT, "protocol": "TCP"},
                                                  {"port": GRPC_PORT, "protocol": "TCP"}]}],
        },
    }

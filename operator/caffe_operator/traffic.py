"""Traffic children of a CaffeModelService: its canary and its autoscaler (pure functions of the spec).

- The labels on the predictor Services that tell the gateway each variant's share, version and
  cold-start hold (`service_traffic_labels`; the names are in inference_server/slices.py, which the
  gateway reads: Kubernetes copies a Service's labels onto its EndpointSlices).
- `spec.canary`: a second predictor, `{name}-canary`: ConfigMap `{name}-canary-config`,
  Deployment and Service `{name}-canary`, built by the same builders as the primary from
  `spec.canary_spec()`. Its pods are labelled `caffeserving.io/canary-of: NAME` instead of
  `caffeserving.io/model: NAME`, so the primary's (immutable) selector never picks them up;
  its Service carries the model label, so the gateway finds it as the model's canary variant.
- `spec.autoscaling`: a KEDA ScaledObject `{name}-predictor` scaling the predictor Deployment on the
  gateway's load signal, in-flight + queued requests per replica: KEDA's `metrics-api` scaler
  reading `GET {gateway}/autoscaling/{name}` (`concurrency`), or, where the operator is told a
  Prometheus URL, the `prometheus` scaler summing `caffeserve_gateway_concurrency` over every
  gateway replica. With one gateway replica both read the same number; with several, each gateway
  sees its share of the load, so only the Prometheus sum is exact (docs/traffic.md).
  No HPA fallback: an HPA on a signal other than CPU/memory needs a metrics adapter (KEDA is one).
"""

from __future__ import annotations

import copy
from typing import Any

from caffe_operator import manifests
from caffe_operator.api import CaffeModelServiceSpec
from inference_server.slices import (
    CANARY,
    CANARY_OF_LABEL,
    COLD_START_LABEL,
    MODEL_LABEL,
    PRIMARY,
    TRAFFIC_LABEL,
    VARIANT_LABEL,
    VERSION_LABEL,
    label_value_ok,
)

KEDA_GROUP_VERSION = "keda.sh/v1alpha1"
POLLING_INTERVAL_S = 5  # KEDA's default is 30 s: a held request should wake its model sooner


def canary_name(name: str) -> str:
    return f"{name}-canary"


def canary_config_map_name(name: str) -> str:
    return f"{name}-canary-config"


def scaled_object_name(name: str) -> str:
    return manifests.predictor_name(name)


def service_traffic_labels(spec: CaffeModelServiceSpec, variant: str = PRIMARY) -> dict[str, str]:
    """The variant's share, version and cold-start hold, as labels of its Service."""
    canary_percent = spec.canary.traffic_percent if spec.canary is not None else 0
    labels = {
        VARIANT_LABEL: variant,
        TRAFFIC_LABEL: str(canary_percent if variant == CANARY else 100 - canary_percent),
    }
    version = (spec.canary.model.version if variant == CANARY and spec.canary else spec.model.version)
    if label_value_ok(version):  # else a request pinning that version goes by weight
        labels[VERSION_LABEL] = version
    auto = spec.autoscaling
    if variant == PRIMARY and auto is not None and auto.min_replicas == 0:
        labels[COLD_START_LABEL] = str(auto.cold_start_timeout_seconds)
    return labels


def canary_pod_labels(name: str) -> dict[str, str]:
    out = {k: v for k, v in manifests.labels(name).items() if k != MODEL_LABEL}
    out[CANARY_OF_LABEL] = name
    out[VARIANT_LABEL] = CANARY
    return out


def canary_children(name: str, namespace: str, spec: CaffeModelServiceSpec,
                    default_image: str = manifests.DEFAULT_SERVER_IMAGE) -> list[dict[str, Any]]:
    """ConfigMap, Deployment and Service of the canary (spec.canary must be set), in creation order."""
    cspec = spec.canary_spec()
    cm = manifests.config_map(name, namespace, cspec)
    cm["metadata"]["name"] = canary_config_map_name(name)
    selector = {CANARY_OF_LABEL: name}

    template = manifests.pod_template(name, cspec, manifests.server_image(cspec, default_image))
    template["metadata"]["labels"] = canary_pod_labels(name)
    for volume in template["spec"]["volumes"]:
        if volume["name"] == "config":
            volume["configMap"]["name"] = canary_config_map_name(name)
    template["metadata"]["annotations"][manifests.CONFIG_HASH_ANNOTATION] = manifests.config_hash(cm, template)
    dep = manifests.deployment(name, namespace, cspec, manifests.server_image(cspec, default_image), cm)
    dep["metadata"]["name"] = canary_name(name)
    dep["spec"]["selector"] = {"matchLabels": selector}
    dep["spec"]["template"] = template

    svc = manifests.service(name, namespace, cspec)
    svc["metadata"]["name"] = canary_name(name)
    svc["metadata"]["labels"].update(service_traffic_labels(spec, CANARY))
    svc["spec"]["selector"] = selector
    return [cm, dep, svc]


def scaled_object(name: str, namespace: str, spec: CaffeModelServiceSpec, gateway_url: str,
                  prometheus_url: str | None = None) -> dict[str, Any]:
    """The KEDA ScaledObject of the predictor Deployment (spec.autoscaling must be set)."""
    auto = spec.autoscaling
    assert auto is not None
    if prometheus_url:
        trigger = {"type": "prometheus", "metricType": "AverageValue", "metadata": {
            "serverAddress": prometheus_url,
            "query": f'sum(caffeserve_gateway_concurrency{{model="{name}",variant="primary"}})',
            "threshold": str(auto.target),
            "activationThreshold": "0",
        }}
    else:
        trigger = {"type": "metrics-api", "metricType": "AverageValue", "metadata": {
            "url": f"{gateway_url.rstrip('/')}/autoscaling/{name}",
            "format": "json",
            "valueLocation": "concurrency",
            "targetValue": str(auto.target),
            "activationTargetValue": "0",
        }}
    return {
        "apiVersion": KEDA_GROUP_VERSION,
        "kind": "ScaledObject",
        "metadata": {"name": scaled_object_name(name), "namespace": namespace, "labels": manifests.labels(name)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": manifests.predictor_name(name)},
            "pollingInterval": POLLING_INTERVAL_S,
            "cooldownPeriod": auto.scale_down_delay_seconds,
            "minReplicaCount": auto.min_replicas,
            "maxReplicaCount": auto.max_replicas,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                "scaleDown": {"stabilizationWindowSeconds": auto.scale_down_delay_seconds},
            }}},
            "triggers": [trigger],
        },
    }


def with_traffic(kids: manifests.Children, spec: CaffeModelServiceSpec) -> manifests.Children:
    """The primary's children with what traffic changes in them: its Service's traffic labels, and no
    `replicas` on an autoscaled Deployment (the autoscaler owns it; Kubernetes starts it at 1)."""
    svc = copy.deepcopy(kids.service)
    svc["metadata"]["labels"].update(service_traffic_labels(spec))
    dep = kids.deployment
    if spec.autoscaling is not None:
        dep = copy.deepcopy(dep)
        dep["spec"].pop("replicas", None)
    return manifests.Children(config_map=kids.config_map, deployment=dep, service=svc,
                              network_policy=kids.network_policy)


# Traffic labels the operator may have set earlier and must remove when the spec no longer says them.
OPTIONAL_TRAFFIC_LABELS = (COLD_START_LABEL, VERSION_LABEL)

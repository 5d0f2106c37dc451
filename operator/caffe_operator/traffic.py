"""The autoscaler of a model variant: a KEDA ScaledObject (a pure function of the variant).

With `spec.autoscaling`, each variant (variants.py: the primary, and the canary while there is
one) gets a ScaledObject of its own, named like its Deployment (`{name}-predictor`,
`{name}-canary`), scaling that Deployment between the same bounds on the gateway's load signal
for that variant, in-flight + queued requests per replica: KEDA's `metrics-api` scaler reading
`GET {gateway}/autoscaling/{name}[/canary]` (`concurrency`), or, where the operator is told a
Prometheus URL, the `prometheus` scaler summing `caffeserve_gateway_concurrency{variant=...}`
over every gateway replica. With one gateway replica both read the same number; with several,
each gateway sees its share of the load, so only the Prometheus sum is exact (docs/traffic.md).
No HPA fallback: an HPA on a signal other than CPU/memory needs a metrics adapter (KEDA is one).

The variant's Deployment then carries no `replicas` (Variant.replicas), and its Service the
cold-start hold label with minReplicas 0 (Variant.traffic_labels): the gateway holds a request
for a variant at zero while KEDA wakes it.
"""

from __future__ import annotations

from typing import Any

from caffe_operator.variants import Variant
from inference_server.slices import COLD_START_LABEL, PRIMARY, VERSION_LABEL

KEDA_GROUP_VERSION = "keda.sh/v1alpha1"
POLLING_INTERVAL_S = 5  # KEDA's default is 30 s: a held request should wake its model sooner


def scaled_object(v: Variant, namespace: str, gateway_url: str, prometheus_url: str | None = None) -> dict[str, Any]:
    """The KEDA ScaledObject of the variant's Deployment (its spec.autoscaling must be set)."""
    auto = v.spec.autoscaling
    assert auto is not None
    name = v.model
    path = name if v.name == PRIMARY else f"{name}/{v.name}"
    if prometheus_url:
        trigger = {"type": "prometheus", "metricType": "AverageValue", "metadata": {
            "serverAddress": prometheus_url,
            "query": f'sum(caffeserve_gateway_concurrency{{model="{name}",variant="{v.name}"}})',
            "threshold": str(auto.target),
            "activationThreshold": "0",
        }}
    else:
        trigger = {"type": "metrics-api", "metricType": "AverageValue", "metadata": {
            "url": f"{gateway_url.rstrip('/')}/autoscaling/{path}",
            "format": "json",
            "valueLocation": "concurrency",
            "targetValue": str(auto.target),
            "activationTargetValue": "0",
        }}
    return {
        "apiVersion": KEDA_GROUP_VERSION,
        "kind": "ScaledObject",
        "metadata": {"name": v.resource_name, "namespace": namespace, "labels": v.labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": v.resource_name},
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


# Traffic labels the operator may have set earlier and must remove when the spec no longer says them.
OPTIONAL_TRAFFIC_LABELS = (COLD_START_LABEL, VERSION_LABEL)

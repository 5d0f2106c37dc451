"""A model's variants, and what tells their children apart: names, labels, selectors, replicas.

A CaffeModelService `NAME` has its primary variant and, while `spec.canary` is set, a canary.
Every child builder (manifests.py, traffic.py) takes a `Variant`, so the canary's children are
built as the primary's are, from the canary's own spec, never built as the primary's and patched:

                  primary                         canary
  children        {NAME}-predictor                {NAME}-canary        Deployment, Service,
                                                                       NetworkPolicy, ScaledObject
  server config   {NAME}-config                   {NAME}-canary-config ConfigMap
  pod selector    caffeserving.io/model: NAME     caffeserving.io/canary-of: NAME
  spec            the CR's                        spec.canary_spec()   (its model, source, replicas)

The canary's pods lack the model label, so the primary's selector (immutable once created) never
picks them up. Every child carries `labels(NAME)` (with the model label), so the gateway finds both
variants' Services and the operator sees a change to any child; a Service adds its variant's
traffic labels (share, version, cold-start hold: inference_server/slices.py, read by the gateway).

`Variant.replicas` is the one place that decides a Deployment's replica count: the spec's, or
none when spec.autoscaling hands it to the autoscaler; an autoscaled canary follows the same
bounds as the primary, with a ScaledObject of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

MANAGED_BY = "caffe-serving-operator"
VARIANT_NAMES = (PRIMARY, CANARY)


def labels(model: str) -> dict[str, str]:
    """Labels on every child and on the primary's pods; the gateway finds model Services by them."""
    return {
        MODEL_LABEL: model,
        "app.kubernetes.io/name": "caffe-model-server",
        "app.kubernetes.io/instance": model,
        "app.kubernetes.io/part-of": "caffe-serving",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def selector(model: str) -> dict[str, str]:
    """The primary's pods (its Deployment's and Service's selector; immutable once created)."""
    return {MODEL_LABEL: model}


def selector_string(model: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(model).items())


def predictor_name(model: str) -> str:
    return f"{model}-predictor"


def config_map_name(model: str) -> str:
    return f"{model}-config"


def resource_name(model: str, variant: str = PRIMARY) -> str:
    """The variant's Deployment, Service, NetworkPolicy and ScaledObject."""
    return predictor_name(model) if variant == PRIMARY else f"{model}-{variant}"


def config_name(model: str, variant: str = PRIMARY) -> str:
    """The variant's server-config ConfigMap."""
    return config_map_name(model) if variant == PRIMARY else f"{model}-{variant}-config"


@dataclass(frozen=True)
class Variant:
    """One variant of model `model`: `name` (primary | canary), its own spec, its share of requests."""

    model: str
    spec: CaffeModelServiceSpec
    name: str = PRIMARY
    traffic_percent: int = 100

    @property
    def resource_name(self) -> str:
        return resource_name(self.model, self.name)

    @property
    def config_name(self) -> str:
        return config_name(self.model, self.name)

    @property
    def labels(self) -> dict[str, str]:
        """Labels of each of its children (the model's, whatever the variant)."""
        return labels(self.model)

    @property
    def selector(self) -> dict[str, str]:
        """Its pods: its Deployment's, Service's and NetworkPolicy's selector."""
        return selector(self.model) if self.name == PRIMARY else {CANARY_OF_LABEL: self.model}

    @property
    def pod_labels(self) -> dict[str, str]:
        if self.name == PRIMARY:
            return labels(self.model)
        out = {k: v for k, v in labels(self.model).items() if k != MODEL_LABEL}
        out[CANARY_OF_LABEL] = self.model
        out[VARIANT_LABEL] = self.name
        return out

    @property
    def traffic_labels(self) -> dict[str, str]:
        """Its share, version and cold-start hold, as labels of its Service (for the gateway)."""
        out = {VARIANT_LABEL: self.name, TRAFFIC_LABEL: str(self.traffic_percent)}
        if label_value_ok(self.spec.model.version):  # else a request pinning that version goes by weight
            out[VERSION_LABEL] = self.spec.model.version
        auto = self.spec.autoscaling
        if auto is not None and auto.min_replicas == 0:
            out[COLD_START_LABEL] = str(auto.cold_start_timeout_seconds)
        return out

    @property
    def replicas(self) -> int | None:
        """Its Deployment's replica count; None while autoscaled (the autoscaler owns it: a count in
        what the operator writes would undo the autoscaler's on every reconcile)."""
        return None if self.spec.autoscaling is not None else self.spec.replicas

    def expected_replicas(self, deployment: Mapping[str, Any]) -> int:
        """The pods it should have now: its replicas, or the autoscaler's choice (Kubernetes starts at 1)."""
        if (count := self.replicas) is not None:
            return count
        return int((deployment.get("spec") or {}).get("replicas", 1))


def of(model: str, spec: CaffeModelServiceSpec) -> list[Variant]:
    """The variants `spec` asks for: the primary, and the canary while spec.canary is set."""
    if spec.canary is None:
        return [Variant(model, spec)]
    percent = spec.canary.traffic_percent
    return [Variant(model, spec, PRIMARY, 100 - percent), Variant(model, spec.canary_spec(), CANARY, percent)]

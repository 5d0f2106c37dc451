"""KEDA for tests: the ScaledObject CRD's schema (the fields we write), and the smallest stand-in
for KEDA's operator.

KEDA cannot run here (no cluster, no Go binaries), so:
- `SCALEDOBJECT_CRD` is KEDA's `scaledobjects.keda.sh` CRD (keda.sh/v1alpha1), cut down to the
  part of its published schema (config/crd/bases/keda.sh_scaledobjects.yaml) that a ScaledObject
  of ours touches: spec.scaleTargetRef, pollingInterval, cooldownPeriod, min/maxReplicaCount,
  advanced.horizontalPodAutoscalerConfig.behavior, triggers[] (type, metadata: string map,
  metricType, name, authenticationRef, useCachedMetrics), with the same types and required
  lists. Applied to the emulator, it makes the API serve ScaledObjects (so the operator finds
  KEDA through discovery, as in a cluster), and `unknown_fields` checks an object against it as
  the API server's pruning would: a field KEDA does not know would be silently dropped.
- `KedaDouble.step()` plays KEDA's part for one polling interval, as its metrics-api scaler and
  the HPA it drives do: read the trigger's URL, take `valueLocation` from the JSON, desired =
  ceil(value / targetValue) clamped to [minReplicaCount, maxReplicaCount], any value above
  activationTargetValue activating a Deployment at zero, and patch the Deployment's scale
  subresource. (No stabilization window: the test decides when to step.)
"""

from __future__ import annotations

import json
import math
import urllib.request
from typing import Any

from caffe_testing.cluster import Cluster, resource_path

SCALEDOBJECTS = "keda.sh/v1alpha1/scaledobjects"

_INT32 = {"type": "integer", "format": "int32"}
_POLICY = {"type": "object", "required": ["periodSeconds", "type", "value"], "properties": {
    "periodSeconds": _INT32, "type": {"type": "string"}, "value": _INT32}}
_RULES = {"type": "object", "properties": {
    "policies": {"type": "array", "items": _POLICY}, "selectPolicy": {"type": "string"},
    "stabilizationWindowSeconds": _INT32}}

SCALEDOBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "properties": {
                    "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
                    "envSourceContainerName": {"type": "string"}}},
                "pollingInterval": _INT32, "cooldownPeriod": _INT32, "initialCooldownPeriod": _INT32,
                "idleReplicaCount": _INT32, "minReplicaCount": _INT32, "maxReplicaCount": _INT32,
                "fallback": {"type": "object", "required": ["failureThreshold", "replicas"], "properties": {
                    "failureThreshold": _INT32, "replicas": _INT32}},
                "advanced": {"type": "object", "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {"type": "object", "properties": {
                        "name": {"type": "string"},
                        "behavior": {"type": "object", "properties": {"scaleUp": _RULES, "scaleDown": _RULES}}}}}},
                "triggers": {"type": "array", "items": {
                    "type": "object", "required": ["metadata", "type"], "properties": {
                        "type": {"type": "string"}, "name": {"type": "string"},
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        "metricType": {"type": "string", "enum": ["AverageValue", "Value", "Utilization"]},
                        "useCachedMetrics": {"type": "boolean"},
                        "authenticationRef": {"type": "object", "required": ["name"], "properties": {
                            "name": {"type": "string"}, "kind": {"type": "string"}}}}}},
            },
        },
        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    },
}

SCALEDOBJECT_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "scaledobjects.keda.sh"},
    "spec": {
        "group": "keda.sh", "scope": "Namespaced",
        "names": {"kind": "ScaledObject", "listKind": "ScaledObjectList", "plural": "scaledobjects",
                  "singular": "scaledobject", "shortNames": ["so"]},
        "versions": [{"name": "v1alpha1", "served": True, "storage": True,
                      "schema": {"openAPIV3Schema": SCALEDOBJECT_SCHEMA}, "subresources": {"status": {}}}],
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int}


def unknown_fields(obj: Any, schema: dict[str, Any] = SCALEDOBJECT_SCHEMA, where: str = "") -> list[str]:
    """What the API server would prune or reject: fields the schema does not know, wrong types,
    missing required fields, values outside an enum."""
    errors: list[str] = []
    kind = schema.get("type")
    if kind and not isinstance(obj, _TYPES[kind]) or (kind == "integer" and isinstance(obj, bool)):
        return [f"{where or '.'}: {obj!r} is not {kind}"]
    if "enum" in schema and obj not in schema["enum"]:
        errors.append(f"{where}: {obj!r} not in {schema['enum']}")
    if isinstance(obj, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        errors += [f"{where}.{k}: required" for k in schema.get("required", []) if k not in obj]
        for key, value in obj.items():
            if props is not None and key in props:
                errors += unknown_fields(value, props[key], f"{where}.{key}")
            elif isinstance(extra, dict):
                errors += unknown_fields(value, extra, f"{where}.{key}")
            elif props is not None:
                errors.append(f"{where}.{key}: unknown to the schema (would be pruned)")
    if isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            errors += unknown_fields(item, schema["items"], f"{where}[{i}]")
    return errors


class KedaDouble:
    """KEDA's operator, reduced to one polling step over every ScaledObject in a namespace."""

    def __init__(self, cluster: Cluster, namespace: str, url_map=lambda url: url):
        self.cluster = cluster
        self.namespace = namespace
        self.url_map = url_map  # the in-cluster gateway URL → where the test's gateway listens
        self.readings: list[tuple[str, float, int]] = []

    def step(self) -> dict[str, int]:
        out = {}
        for so in self.cluster.list_objects(SCALEDOBJECTS, self.namespace):
            spec = so["spec"]
            (trigger,) = spec["triggers"]
            assert trigger["type"] == "metrics-api", trigger
            meta = trigger["metadata"]
            with urllib.request.urlopen(self.url_map(meta["url"]), timeout=10) as r:
                value = float(json.loads(r.read())[meta["valueLocation"]])
            target = float(meta["targetValue"])
            desired = math.ceil(value / target) if value > float(meta.get("activationTargetValue", "0")) else 0
            desired = max(spec.get("minReplicaCount", 0), min(spec.get("maxReplicaCount", 100), desired))
            ref = spec["scaleTargetRef"]
            self.cluster.request("PATCH", resource_path("apps/v1/deployments", self.namespace, ref["name"], "scale"),
                                 {"spec": {"replicas": desired}}, "application/merge-patch+json")
            self.readings.append((ref["name"], value, desired))
            out[ref["name"]] = desired
        return out

"""The CaffeModelService CRD, generated from the CR's pydantic types (api.py).

`caffeserve crd` prints it; crds/caffemodelservices.yaml and the chart's copy are its output
(`make crd`), and a test fails when either drifts from the types.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml
from pydantic import BaseModel

from caffe_http.access_log import add_logging_arguments, configure_logging
from caffe_operator.api import (
    CATEGORIES,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    CaffeModelServiceSpec,
    CaffeModelServiceStatus,
    RuntimeDevice,
)
from caffe_operator.pool_api import (
    POOL_KIND,
    POOL_PLURAL,
    POOL_SHORT_NAMES,
    POOL_SINGULAR,
    CaffeServingPoolSpec,
    CaffeServingPoolStatus,
)

_DROP = {"title", "default", "examples"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """pydantic's JSON schema (2020-12) → a Kubernetes structural OpenAPI v3 schema."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:  # inline the definition; the field's own keys (description) win
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**target, **node}
    if "anyOf" in node:
        alternatives = [a for a in node.pop("anyOf") if a.get("type") != "null"]
        if len(alternatives) == 1:  # Optional[X]: absent means unset
            node = {**_resolve(alternatives[0], defs), **node}
        else:  # a scalar of several types (e.g. true | false | "auto"): enumerate the values
            values: list[Any] = []
            for alt in (_resolve(a, defs) for a in alternatives):
                if alt.get("type") == "boolean":
                    values += [True, False]
                elif "const" in alt:
                    values.append(alt["const"])
                elif "enum" in alt:
                    values += alt["enum"]
                else:
                    raise ValueError(f"cannot express {alternatives} in a structural schema")
            node.update({"x-kubernetes-preserve-unknown-fields": True, "enum": values})
    default = node.get("default")
    description = node.get("description")
    if description and default not in (None, {}, []) and "Default:" not in description:
        node["description"] = f"{description.rstrip('.')}. Default: {json.dumps(default)}."
    for key in _DROP:
        node.pop(key, None)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if isinstance(node.get("exclusiveMinimum"), (int, float)) and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"], node["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if isinstance(node.get("exclusiveMaximum"), (int, float)) and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"], node["exclusiveMaximum"] = node["exclusiveMaximum"], True
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]  # unknown fields are pruned (or rejected by kubectl's strict validation)
    if node.get("additionalProperties") is True or node.get("additionalProperties") == {}:
        del node["additionalProperties"]
        node["x-kubernetes-preserve-unknown-fields"] = True
    if "properties" in node:
        node["properties"] = {k: _structural(v, defs) for k, v in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        node["items"] = _structural(node["items"], defs)
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _structural(node["additionalProperties"], defs)
    if node.get("x-kubernetes-preserve-unknown-fields") and node.get("type") is None and "enum" not in node:
        node["type"] = "object"
    return node


_KEY_ORDER = ["type", "description", "default", "enum", "format", "pattern", "minimum", "exclusiveMinimum",
              "maximum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "required"]


def _ordered(node: Any) -> Any:
    """Readable key order: type and description first, nested schemas last."""
    if isinstance(node, list):
        return [_ordered(n) for n in node]
    if not isinstance(node, dict):
        return node
    rank = {k: i for i, k in enumerate(_KEY_ORDER)}
    keys = sorted(node, key=lambda k: (rank.get(k, len(rank)), k in ("properties", "items", "additionalProperties"), k))
    out = {k: _ordered(node[k]) for k in keys}
    if isinstance(node.get("properties"), dict):  # the fields keep the model's order
        out["properties"] = {name: _ordered(sub) for name, sub in node["properties"].items()}
    return out


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        return {**defs[node["$ref"].split("/")[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


# Defaults the API server fills in, so that `kubectl get cms` shows them (Replicas, Device columns).
# Every other default stays in the operator (stated in the field's description), so that a newer
# operator's defaults reach existing objects.
CRD_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("replicas",): 1,
    ("runtime",): {},
    ("runtime", "device"): RuntimeDevice.gpu.value,
}


def _set_defaults(spec_schema: dict[str, Any]) -> dict[str, Any]:
    for path, value in CRD_DEFAULTS.items():
        node = spec_schema
        for key in path:
            node = node["properties"][key]
        node["default"] = value
    return spec_schema


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model, as a CRD version embeds it."""
    raw = model.model_json_schema(by_alias=True, mode="validation", ref_template="#/$defs/{model}")
    defs = raw.pop("$defs", {})
    return _ordered(_structural(raw, defs))


def custom_resource_definition() -> dict[str, Any]:
    """The CaffeModelService CRD (apiextensions.k8s.io/v1)."""
    ready = '.status.conditions[?(@.type=="Ready")]'
    schema = {
        "type": "object",
        "description": "A Caffe model (deploy.prototxt + .caffemodel) served over the Open Inference Protocol "
        "(KServe V2 REST) by GPU or CPU pods that the caffe-serving operator runs.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object: caffeserving.io/v1alpha1."},
            "kind": {"type": "string", "description": "Kind of this object: CaffeModelService."},
            "metadata": {"type": "object"},
            "spec": _set_defaults(openapi_schema(CaffeModelServiceSpec)),
            "status": openapi_schema(CaffeModelServiceStatus),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "caffe-serving"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": f"{ready}.status",
                            "description": "Whether clients can use the model.",
                        },
                        {
                            "name": "Reason",
                            "type": "string",
                            "jsonPath": f"{ready}.reason",
                            "priority": 1,
                            "description": "Why (not) ready.",
                        },
                        {
                            "name": "Replicas",
                            "type": "integer",
                            "jsonPath": ".spec.replicas",
                            "description": "Desired server pods.",
                        },
                        {
                            "name": "Ready Replicas",
                            "type": "integer",
                            "jsonPath": ".status.readyReplicas",
                            "description": "Ready server pods.",
                        },
                        {
                            "name": "Device",
                            "type": "string",
                            "jsonPath": ".spec.runtime.device",
                            "description": "gpu or cpu.",
                        },
                        {
                            "name": "Backend",
                            "type": "string",
                            "jsonPath": ".status.backend.name",
                            "description": "pycaffe or onnxruntime, as a ready pod reports it.",
                        },
                        {
                            "name": "URL",
                            "type": "string",
                            "jsonPath": ".status.url",
                            "description": "Where clients reach the model.",
                        },
                        {
                            "name": "gRPC",
                            "type": "string",
                            "jsonPath": ".status.grpcAddress",
                            "description": "Where gRPC clients reach the model (host:port).",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


POOL_CRD_DEFAULTS: dict[tuple[str, ...], Any] = {("replicas",): 1, ("device",): "gpu"}


def pool_custom_resource_definition() -> dict[str, Any]:
    """The CaffeServingPool CRD (apiextensions.k8s.io/v1), from pool_api.py's types."""
    ready = '.status.conditions[?(@.type=="Ready")]'
    spec_schema = openapi_schema(CaffeServingPoolSpec)
    for path, value in POOL_CRD_DEFAULTS.items():
        spec_schema["properties"][path[0]]["default"] = value
    schema = {
        "type": "object",
        "description": "A pool of GPU pods running the many-model Caffe server; CaffeModelServices that name it in "
        "spec.pool are packed onto its pods by memory and loaded through the repository API.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object: caffeserving.io/v1alpha1."},
            "kind": {"type": "string", "description": "Kind of this object: CaffeServingPool."},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": openapi_schema(CaffeServingPoolStatus),
        },
    }
    column = [
        {"name": "Ready", "type": "string", "jsonPath": f"{ready}.status", "description": "Pods ready, models placed."},
        {"name": "Reason", "type": "string", "jsonPath": f"{ready}.reason", "priority": 1, "description": "Why."},
        {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas", "description": "Desired pods."},
        {"name": "Ready Replicas", "type": "integer", "jsonPath": ".status.readyReplicas",
         "description": "Ready pods."},
        {"name": "Models", "type": "integer", "jsonPath": ".status.models", "description": "Models in the pool."},
        {"name": "Sharing", "type": "string", "jsonPath": ".spec.gpu.sharing", "description": "GPU sharing mode."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{POOL_PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "caffe-serving"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": POOL_KIND, "listKind": f"{POOL_KIND}List", "plural": POOL_PLURAL,
                      "singular": POOL_SINGULAR, "shortNames": POOL_SHORT_NAMES, "categories": CATEGORIES},
            "versions": [{
                "name": VERSION, "served": True, "storage": True, "schema": {"openAPIV3Schema": schema},
                "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas",
                                                         "statusReplicasPath": ".status.replicas",
                                                         "labelSelectorPath": ".status.selector"}},
                "additionalPrinterColumns": column,
            }],
        },
    }


def crd_yaml(kind: str = KIND) -> str:
    """The CRD of `kind` (CaffeModelService or CaffeServingPool) as YAML."""
    header = ("# Generated by `caffeserve crd` (operator/caffe_operator/crd.py) from the types in "
              f"{'api.py' if kind == KIND else 'pool_api.py'}. Do not edit.\n")
    crd = custom_resource_definition() if kind == KIND else pool_custom_resource_definition()
    return header + yaml.safe_dump(crd, sort_keys=False, width=120, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="caffeserve crd", description="Print a CRD (YAML) generated from the operator's model."
    )
    p.add_argument("--kind", choices=[KIND, POOL_KIND], default=KIND, help="which CRD (default %(default)s)")
    add_logging_arguments(p, default_level="WARNING", access_log=False)
    args = p.parse_args(list(argv or []))
    configure_logging(args.log_level, args.log_format)
    sys.stdout.write(crd_yaml(args.kind))
    return 0

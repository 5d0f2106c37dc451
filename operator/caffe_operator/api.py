"""The CaffeModelService API: the CR's pydantic types and the CRD generated from them.

One source of truth: the operator validates specs with these types and `caffeserve crd` prints
the CRD (crds/caffemodelservices.yaml) built from their JSON schema, so the two cannot disagree
(tests/test_crd.py fails when the checked-in file drifts). The serving fields reuse
`inference_server.config` (TensorSpec, Preprocessing, Batching, Limits, ...): what a CR says is
what the server's config file says.

What a schema cannot say (GPUs asked for on a CPU device, `..` in a volume path, names that make
invalid child names) the model validators below say; the operator turns their message into
`Ready=False, reason InvalidSpec`.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import urllib.parse
from enum import Enum
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from inference_server.config import (
    Batching,
    CamelModel,
    Limits,
    ModelServing,
    OutputSpec,
    Preprocessing,
    Sha256,
    TensorSpec,
)

GROUP = "caffeserving.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CaffeModelService"
PLURAL = "caffemodelservices"
SINGULAR = "caffemodelservice"
SHORT_NAMES = ["cms"]
CATEGORIES = ["caffe-serving"]

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
MAX_NAME_LENGTH = 53  # so that "{name}-predictor" is still a valid Service name (63)

_DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_URL = r"^https?://[^\s/$.?#][^\s]*$"
_QUALIFIED_NAME = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"


def _serving_field(name: str, description: str | None = None) -> Any:
    """The server config's own field (type, default, limits, description), reused in the CR."""
    field = copy.copy(ModelServing.model_fields[name])
    if description:
        field.description = description
    return field


def _bad_path_reason(path: str) -> str | None:
    """Why a relative path inside a volume is unsafe, or None."""
    if path.startswith("/"):
        return "must be relative, not absolute"
    if ".." in path.split("/"):
        return "must not contain '..'"
    if "\\" in path or "\x00" in path:
        return "must not contain backslashes or NUL"
    return None


def is_url(name: str) -> bool:
    return bool(re.match(r"^https?://", name))


def local_name(name: str) -> str:
    """Where a model file lands under /models: its relative name, or a URL's last path segment."""
    if is_url(name):
        return urllib.parse.urlsplit(name).path.rstrip("/").rsplit("/", 1)[-1]
    return name


# --------------------------------------------------------------------------------------------
# spec.source
# --------------------------------------------------------------------------------------------
class PvcSource(CamelModel):
    """A PersistentVolumeClaim that holds the model files (mounted read-only at /models)."""

    claim_name: str = Field(pattern=_DNS_SUBDOMAIN, max_length=253, description="Name of the PersistentVolumeClaim, in the CR's namespace.")
    path: str = Field(
        default="", max_length=1024,
        description="Folder inside the volume that holds the files (mounted as a subPath). Empty: the volume's root.",
    )
    read_only: bool = Field(default=True, description="Mount the volume read-only.")

    @field_validator("path")
    @classmethod
    def _safe_path(cls, v: str) -> str:
        if v and (why := _bad_path_reason(v)):
            raise ValueError(f"path {v!r} {why}")
        return v


class ConfigMapSource(CamelModel):
    """A ConfigMap whose keys are the model files (binaryData for the weights); for tiny models (< 1 MiB)."""

    name: str = Field(pattern=_DNS_SUBDOMAIN, max_length=253, description="Name of the ConfigMap, in the CR's namespace.")


class ModelSource(CamelModel):
    """Where the model files come from. Set exactly one of pvc, url, configMap."""

    model_config = CamelModel.model_config | {
        "json_schema_extra": {"oneOf": [{"required": ["pvc"]}, {"required": ["url"]}, {"required": ["configMap"]}]}
    }

    pvc: PvcSource | None = Field(default=None, description="Files on a PersistentVolumeClaim.")
    url: str | None = Field(
        default=None, pattern=_URL, max_length=2048,
        description="Base http(s) URL: each file in spec.model is downloaded from this URL joined with its name "
        "by an init container (`caffeserve fetch`) that checks its sha256. Files named by a full URL are "
        "downloaded from there instead.",
    )
    config_map: ConfigMapSource | None = Field(default=None, description="Files stored as keys of a ConfigMap.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ModelSource":
        chosen = [k for k in ("pvc", "url", "config_map") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError("set exactly one of source.pvc, source.url, source.configMap")
        return self

    @property
    def kind(self) -> str:
        return "pvc" if self.pvc else "url" if self.url else "configMap"


# --------------------------------------------------------------------------------------------
# spec.model
# --------------------------------------------------------------------------------------------
FileName = Annotated[str, Field(min_length=1, max_length=2048)]


class ModelSpec(CamelModel):
    """The Caffe model: its files (names relative to spec.source) and how clients see its tensors."""

    prototxt: FileName = Field(description="The deploy prototxt: a file name relative to the source (or, with source.url, a full URL).")
    weights: FileName = Field(description="The .caffemodel weights: a file name relative to the source (or, with source.url, a full URL).")
    prototxt_sha256: Sha256 | None = Field(default=None, description="Expected sha256 (hex) of the prototxt; checked before loading.")
    weights_sha256: Sha256 | None = Field(default=None, description="Expected sha256 (hex) of the weights; checked before loading.")
    labels: FileName | None = Field(
        default=None, description="Class labels, one per line (classification models): a file name relative to the source, or a URL."
    )
    version: str = Field(default="1", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Model version reported to clients.")
    inputs: list[TensorSpec] | None = _serving_field(
        "inputs", "The model's inputs as clients see them. Default: the net's Input layers."
    )
    outputs: list[OutputSpec] | None = _serving_field(
        "outputs", "The blobs returned to clients: any blob of the net (e.g. one that feeds a Silence layer). "
        "Default: Caffe's net outputs."
    )
    preprocessing: Preprocessing | None = _serving_field(
        "preprocessing", "How an encoded image (a BYTES input) becomes the input blob, as caffe.io.Transformer does it."
    )

    def files(self) -> dict[str, str]:
        """Every model file by role (prototxt, weights, labels, meanFile) as the spec names it."""
        out = {"prototxt": self.prototxt, "weights": self.weights}
        if self.labels:
            out["labels"] = self.labels
        if self.preprocessing and self.preprocessing.mean_file:
            out["meanFile"] = self.preprocessing.mean_file
        return out

    def sha256s(self) -> dict[str, str]:
        return {k: v for k, v in {"prototxt": self.prototxt_sha256, "weights": self.weights_sha256}.items() if v}


# --------------------------------------------------------------------------------------------
# spec.runtime
# --------------------------------------------------------------------------------------------
class RuntimeDevice(str, Enum):
    gpu = "gpu"
    cpu = "cpu"


class RuntimeSpec(CamelModel):
    """How each replica runs the model: the server image, the device, and the server's own settings."""

    image: str | None = Field(
        default=None, min_length=1,
        description="Inference server image. Default: the operator's CAFFESERVE_SERVER_IMAGE (the chart's server image).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Image pull policy of the server and init containers. Default: Kubernetes' default."
    )
    device: RuntimeDevice = Field(
        default=RuntimeDevice.gpu,
        description="gpu: each replica asks for `gpus` of `gpuResource` and Caffe runs in GPU mode; cpu: no GPU is requested.",
    )
    gpus: int | None = Field(
        default=None, ge=1, le=16,
        description="GPUs per replica (with device gpu; the server uses the first it sees). Default: 1. Must be unset with device cpu.",
    )
    gpu_resource: str = Field(
        default=DEFAULT_GPU_RESOURCE, pattern=_QUALIFIED_NAME, max_length=253,
        description="Extended resource that counts GPUs, e.g. nvidia.com/gpu, a MIG profile such as "
        "nvidia.com/mig-1g.10gb, or a time-sliced nvidia.com/gpu.shared.",
    )
    instances: int = _serving_field("instances")
    batching: Batching = Field(default_factory=Batching, description="Dynamic batching inside each replica.")
    backend: Literal["pycaffe", "onnxruntime", "auto"] = _serving_field("backend")
    parity_tolerance: float = _serving_field("parity_tolerance")
    limits: Limits = Field(default_factory=Limits, description="Per-request limits inside each replica.")
    startup_timeout_seconds: int = Field(
        default=600, ge=10, le=86400,
        description="How long a replica may take to load the model before the kubelet restarts it (its startup probe budget).",
    )

    @property
    def gpu_count(self) -> int:
        return (self.gpus or 1) if self.device == RuntimeDevice.gpu else 0


# --------------------------------------------------------------------------------------------
# spec
# --------------------------------------------------------------------------------------------
class LocalObjectReference(CamelModel):
    """A reference to an object in the same namespace."""

    name: str = Field(pattern=_DNS_SUBDOMAIN, max_length=253, description="Name of the object.")


_ANY_OBJECT = {"x-kubernetes-preserve-unknown-fields": True}


class CaffeModelServiceSpec(CamelModel):
    """What the user wants: a Caffe model served over the Open Inference Protocol by `replicas` pods."""

    source: ModelSource
    model: ModelSpec
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, description="How each replica runs the model.")
    replicas: int = Field(default=1, ge=0, le=1000, description="Number of server pods. 0 stops serving (Ready=False).")
    resources: dict[str, Any] | None = Field(
        default=None, json_schema_extra=_ANY_OBJECT,
        description="Kubernetes ResourceRequirements of the server container (requests/limits for cpu, memory, ...). "
        "The GPU limit comes from runtime.gpus and runtime.gpuResource.",
    )
    node_selector: dict[str, str] | None = Field(default=None, description="Node labels the pods must match.")
    tolerations: list[dict[str, Any]] | None = Field(
        default=None, json_schema_extra={"items": {"type": "object", "description": "A Kubernetes Toleration.", **_ANY_OBJECT}},
        description="Kubernetes Tolerations of the pods. With device gpu, one for the nvidia.com/gpu taint is added.",
    )
    affinity: dict[str, Any] | None = Field(default=None, json_schema_extra=_ANY_OBJECT, description="Kubernetes Affinity of the pods.")
    runtime_class_name: str | None = Field(default=None, pattern=_DNS_SUBDOMAIN, description="RuntimeClass of the pods (e.g. nvidia).")
    priority_class_name: str | None = Field(default=None, pattern=_DNS_SUBDOMAIN, description="PriorityClass of the pods.")
    image_pull_secrets: list[LocalObjectReference] | None = Field(default=None, description="Secrets for pulling the images.")
    service_account_name: str | None = Field(
        default=None, pattern=_DNS_SUBDOMAIN,
        description="ServiceAccount the pods run as (its token is not mounted). Default: the namespace's default.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "CaffeModelServiceSpec":
        rt = self.runtime
        if rt.device == RuntimeDevice.cpu and rt.gpus is not None:
            raise ValueError(f"runtime.gpus is {rt.gpus} but runtime.device is cpu: remove gpus or set device: gpu")
        limits = (self.resources or {}).get("limits") or {}
        requests = (self.resources or {}).get("requests") or {}
        for where in (limits, requests):
            if rt.gpu_resource in where:
                raise ValueError(
                    f"resources must not set {rt.gpu_resource}: runtime.gpus and runtime.device decide the GPUs"
                )
        seen: dict[str, str] = {}
        for role, name in self.model.files().items():
            if is_url(name):
                if self.source.url is None:
                    raise ValueError(f"model.{role} is a URL ({name}); only a source.url model may name files by URL")
                if not local_name(name) or _bad_path_reason(local_name(name)) or local_name(name) in (".", ".."):
                    raise ValueError(f"model.{role} URL {name} does not end in a file name")
            elif why := _bad_path_reason(name):
                raise ValueError(f"model.{role} {name!r} {why}")
            elif self.source.config_map is not None and "/" in name:
                raise ValueError(f"model.{role} {name!r}: ConfigMap keys cannot contain '/'")
            if (other := seen.get(local_name(name))) is not None:
                raise ValueError(f"model.{role} and model.{other} would both be /models/{local_name(name)}")
            seen[local_name(name)] = role
        return self


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------
class Condition(CamelModel):
    """A Kubernetes condition (type, status, reason, message, lastTransitionTime)."""

    model_config = CamelModel.model_config | {"extra": "ignore"}

    type: str = Field(description="Condition type; Ready says whether clients can use the model.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str | None = Field(default=None, description="One CamelCase word for why, e.g. InvalidSpec, Progressing, ReplicasReady.")
    message: str | None = Field(default=None, description="What happened, for humans.")
    last_transition_time: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="When the status last changed."
    )
    observed_generation: int | None = Field(default=None, description="metadata.generation this condition was computed for.")


class BackendStatus(CamelModel):
    """Which backend serves the model and why, as a ready pod's server reports it (its model metadata)."""

    model_config = CamelModel.model_config | {"extra": "ignore"}

    name: str = Field(description="The backend the asked pod's server chose: pycaffe or onnxruntime "
                      "(runtime.backend auto serves with onnxruntime only where its parity check with pycaffe passes).")
    reason: str = Field(description="Why, in the server's words: the parity figures, or why it "
                        "fell back to pycaffe (an unsupported layer, a failed parity check, ...).")
    max_abs_diff: float | None = Field(
        default=None, description="Largest |difference| the parity check measured between ONNX Runtime's and "
        "pycaffe's outputs, where the check ran.",
    )


class CaffeModelServiceStatus(CamelModel):
    """What the operator observed. Written by the operator only."""

    model_config = CamelModel.model_config | {"extra": "ignore"}

    observed_generation: int | None = Field(default=None, description="The metadata.generation last reconciled.")
    conditions: list[Condition] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="Current state; Ready is True when every desired replica runs the current spec and is ready.",
    )
    replicas: int | None = Field(default=None, description="Server pods that exist (the scale subresource's status.replicas).")
    ready_replicas: int | None = Field(default=None, description="Server pods that are ready.")
    url: str | None = Field(default=None, description="Where clients reach this model: its Open Inference Protocol URL "
                                     "(.../v2/models/NAME), through the gateway when there is one, else its Service.")
    selector: str | None = Field(default=None, description="Label selector of the server pods (for the scale subresource).")
    backend: BackendStatus | None = Field(
        default=None, description="The backend serving the model, as one ready pod reports it (during a rollout, "
        "what the asked pod says). Asked again when the pod template or the spec changes.",
    )


class InvalidSpec(Exception):
    """A spec the operator cannot act on; the message says which field and why."""


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in e["loc"]).replace(".[", "[")
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"spec.{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_spec(name: str, spec: dict[str, Any] | None) -> CaffeModelServiceSpec:
    """Validate a CR's name and spec, raising InvalidSpec with a readable message."""
    if len(name) > MAX_NAME_LENGTH or not re.match(_DNS_LABEL, name):
        raise InvalidSpec(
            f"metadata.name {name!r} must be a DNS label (lowercase letters, digits, '-', starting with a letter) "
            f"of at most {MAX_NAME_LENGTH} characters: it names the Service {name}-predictor"
        )
    try:
        parsed = CaffeModelServiceSpec.model_validate(spec or {})
    except ValidationError as e:
        raise InvalidSpec(_format_errors(e)) from None
    return parsed


# --------------------------------------------------------------------------------------------
# CRD generation
# --------------------------------------------------------------------------------------------
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
                "kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                "shortNames": SHORT_NAMES, "categories": CATEGORIES,
            },
            "versions": [{
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
                    {"name": "Ready", "type": "string", "jsonPath": f"{ready}.status", "description": "Whether clients can use the model."},
                    {"name": "Reason", "type": "string", "jsonPath": f"{ready}.reason", "priority": 1, "description": "Why (not) ready."},
                    {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas", "description": "Desired server pods."},
                    {"name": "Ready Replicas", "type": "integer", "jsonPath": ".status.readyReplicas", "description": "Ready server pods."},
                    {"name": "Device", "type": "string", "jsonPath": ".spec.runtime.device", "description": "gpu or cpu."},
                    {"name": "Backend", "type": "string", "jsonPath": ".status.backend.name",
                     "description": "pycaffe or onnxruntime, as a ready pod reports it."},
                    {"name": "URL", "type": "string", "jsonPath": ".status.url", "description": "Where clients reach the model."},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
            }],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `caffeserve crd` from operator/caffe_operator/api.py. Do not edit.\n"
    return header + yaml.safe_dump(custom_resource_definition(), sort_keys=False, width=120, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if argv and argv[0] in ("-h", "--help"):
        print("usage: caffeserve crd\n\nPrint the CaffeModelService CRD (YAML) generated from the operator's model.")
        return 0
    sys.stdout.write(crd_yaml())
    return 0

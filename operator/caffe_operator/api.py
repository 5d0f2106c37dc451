"""The CaffeModelService API: the CR's pydantic types, and what a spec says about its model files.

One source of truth: the operator validates specs with these types and `caffeserve crd` prints
the CRD (crds/caffemodelservices.yaml) that crd.py builds from their JSON schema, so the two cannot
disagree (tests/operator_tests/test_crd.py fails when the checked-in file drifts). The serving fields reuse
`inference_server.config` (TensorSpec, Preprocessing, Batching, Limits, ...): what a CR says is
what the server's config file says.

What a schema cannot say (GPUs asked for on a CPU device, `..` in a volume path, names that make
invalid child names) the model validators below say; the operator turns their message into
`Ready=False, reason InvalidSpec`.
"""

from __future__ import annotations

import copy
import posixpath
import re
import urllib.parse
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from inference_server.config import (
    Batching,
    CamelModel,
    Limits,
    ModelServing,
    OutputSpec,
    Preprocessing,
    Sha256,
    TensorSpec,
    Tracing,
    format_validation_error,
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
_QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)


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


@dataclass(frozen=True)
class ModelFile:
    """One model file as the spec names it, and everything that follows from that: the only place
    that knows how a file's name becomes a local name, a download URL and a path."""

    role: str  # prototxt, weights, labels, meanFile (the spec's own field names)
    name: str  # relative to the source, or a full URL
    sha256: str | None = None  # expected, where the spec gives one
    url: str | None = None  # where it is downloaded from (source.url models; a file named by URL)

    @property
    def local_name(self) -> str:
        """Its name in the model folder: the relative name, or a URL's last path segment."""
        return local_name(self.name)

    def path(self, model_dir: str) -> str:
        """Where it is in `model_dir` (/models in a pod, a local folder in local mode)."""
        return posixpath.join(model_dir, self.local_name)


# --------------------------------------------------------------------------------------------
# spec.source
# --------------------------------------------------------------------------------------------
class PvcSource(CamelModel):
    """A PersistentVolumeClaim that holds the model files (mounted read-only at /models)."""

    claim_name: str = Field(
        pattern=_DNS_SUBDOMAIN, max_length=253, description="Name of the PersistentVolumeClaim, in the CR's namespace."
    )
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

    name: str = Field(
        pattern=_DNS_SUBDOMAIN, max_length=253, description="Name of the ConfigMap, in the CR's namespace."
    )


class LocalObjectReference(CamelModel):
    """A reference to an object in the same namespace."""

    name: str = Field(pattern=_DNS_SUBDOMAIN, max_length=253, description="Name of the object.")


class S3Source(CamelModel):
    """A bucket in S3 or an S3-compatible store (MinIO, Ceph RGW, ...) that holds the model files."""

    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", description="The bucket's name.")
    prefix: str = Field(
        default="", max_length=1024,
        description="Key prefix (folder) of the files: each file in spec.model is downloaded from PREFIX/NAME.",
    )
    endpoint: str | None = Field(
        default=None, pattern=_URL, max_length=2048,
        description="http(s) URL of an S3-compatible store (path-style addressing). Default: AWS S3.",
    )
    region: str | None = Field(default=None, pattern=r"^[a-z0-9-]{1,64}$", description="The bucket's region.")
    secret_ref: LocalObjectReference | None = Field(
        default=None,
        description="A Secret in the CR's namespace with the keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(and AWS_SESSION_TOKEN), mounted as files in the fetch init containers only. Default: the pods' own "
        "identity (IRSA, Pod Identity), through spec.serviceAccountName.",
    )

    @field_validator("prefix")
    @classmethod
    def _safe_prefix(cls, v: str) -> str:
        if v and ".." in v.split("/"):
            raise ValueError(f"prefix {v!r} must not contain '..'")
        return v

    def url(self, name: str) -> str:
        """The s3:// URL of a file named `name`."""
        key = f"{self.prefix.strip('/')}/{name}" if self.prefix.strip("/") else name
        return f"s3://{self.bucket}/{key}"


class ModelSource(CamelModel):
    """Where the model files come from. Set exactly one of pvc, url, s3, configMap."""

    model_config = CamelModel.model_config | {
        "json_schema_extra": {"oneOf": [{"required": ["pvc"]}, {"required": ["url"]}, {"required": ["s3"]},
                                        {"required": ["configMap"]}]}
    }

    pvc: PvcSource | None = Field(default=None, description="Files on a PersistentVolumeClaim.")
    url: str | None = Field(
        default=None, pattern=_URL, max_length=2048,
        description="Base http(s) URL: each file in spec.model is downloaded from this URL joined with its name "
        "by an init container (`caffeserve fetch`) that checks its sha256. Files named by a full URL are "
        "downloaded from there instead.",
    )
    s3: S3Source | None = Field(
        default=None,
        description="Files in an S3 (or S3-compatible) bucket, downloaded by init containers (`caffeserve fetch`) "
        "that check each file's sha256 and rename it into place only when it matches.",
    )
    config_map: ConfigMapSource | None = Field(default=None, description="Files stored as keys of a ConfigMap.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        chosen = [k for k in ("pvc", "url", "s3", "config_map") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError("set exactly one of source.pvc, source.url, source.s3, source.configMap")
        return self

    @property
    def kind(self) -> str:
        return "pvc" if self.pvc else "url" if self.url else "s3" if self.s3 else "configMap"

    @property
    def downloaded(self) -> bool:
        """Whether init containers download the files (url, s3) into an emptyDir."""
        return self.url is not None or self.s3 is not None


# --------------------------------------------------------------------------------------------
# spec.model
# --------------------------------------------------------------------------------------------
FileName = Annotated[str, Field(min_length=1, max_length=2048)]


class PythonLayersSpec(CamelModel):
    """The folder of the model's Caffe Python layer modules, inside the model's own source."""

    path: str = Field(
        min_length=1, max_length=1024,
        description="Folder inside spec.source (relative; '.' for its root) holding the modules that the net's "
        "`type: \"Python\"` layers name. Their code runs in the model server when the model loads: only a "
        "source.pvc or source.configMap model can set it, so the code comes from the model's own files.",
    )


class ModelSpec(CamelModel):
    """The Caffe model: its files (names relative to spec.source) and how clients see its tensors."""

    prototxt: FileName = Field(
        description="The deploy prototxt: a file name relative to the source (or, with source.url, a full URL)."
    )
    weights: FileName = Field(
        description="The .caffemodel weights: a file name relative to the source (or, with source.url, a full URL)."
    )
    prototxt_sha256: Sha256 | None = Field(
        default=None, description="Expected sha256 (hex) of the prototxt; checked before loading."
    )
    weights_sha256: Sha256 | None = Field(
        default=None, description="Expected sha256 (hex) of the weights; checked before loading."
    )
    labels: FileName | None = Field(
        default=None,
        description="Class labels, one per line (classification models): a file name relative to the source, or a URL.",
    )
    version: str = Field(
        default="1", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Model version reported to clients."
    )
    python_layers: PythonLayersSpec | None = Field(
        default=None,
        description="Off by default: a net with Caffe Python layers is refused unless this names the folder of "
        "their modules in the model's own source (their code runs in the server).",
    )
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

    def files(self, base_url: str | None = None, s3: S3Source | None = None) -> list[ModelFile]:
        """Every model file (prototxt, weights, labels, meanFile), downloaded from `base_url`
        joined with its name (source.url), or from the bucket (source.s3), unless the file is itself a URL."""
        named = {"prototxt": (self.prototxt, self.prototxt_sha256), "weights": (self.weights, self.weights_sha256)}
        if self.labels:
            named["labels"] = (self.labels, None)
        if self.preprocessing and self.preprocessing.mean_file:
            named["meanFile"] = (self.preprocessing.mean_file, None)
        out = []
        for role, (name, sha256) in named.items():
            url: str | None
            if is_url(name):
                url = name
            elif s3 is not None:
                url = s3.url(name)
            else:
                url = base_url.rstrip("/") + "/" + name if base_url else None
            out.append(ModelFile(role, name, sha256, url))
        return out


# --------------------------------------------------------------------------------------------
# spec.runtime
# --------------------------------------------------------------------------------------------
class RuntimeDevice(str, Enum):
    gpu = "gpu"
    cpu = "cpu"


class GrpcSpec(CamelModel):
    """The Open Inference Protocol over gRPC beside REST, from the same server process."""

    enabled: bool = Field(
        default=True,
        description="Serve gRPC (inference.GRPCInferenceService) on each pod's port 8081, named grpc: the "
        "Service exposes it (appProtocol grpc) and the gateway forwards gRPC calls to it. Its message size "
        "limit is limits.maxRequestBytes.",
    )


class RuntimeSpec(CamelModel):
    """How each replica runs the model: the server image, the device, and the server's own settings."""

    image: str | None = Field(
        default=None,
        min_length=1,
        description="Inference server image. Default: the operator's CAFFESERVE_SERVER_IMAGE "
        "(the chart's server image).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Image pull policy of the server and init containers. Default: Kubernetes' default."
    )
    device: RuntimeDevice = Field(
        default=RuntimeDevice.gpu,
        description="gpu: each replica asks for `gpus` of `gpuResource` and Caffe runs in GPU mode; "
        "cpu: no GPU is requested.",
    )
    gpus: int | None = Field(
        default=None,
        ge=1,
        le=16,
        description="GPUs per replica (with device gpu; the server uses the first it sees). Default: 1. "
        "Must be unset with device cpu.",
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
    grpc: GrpcSpec = Field(default_factory=GrpcSpec, description="gRPC beside REST (on by default).")
    tracing: Tracing = _serving_field(
        "tracing", "OpenTelemetry traces of infer requests (docs/tracing.md). Default: the operator's "
        "CAFFESERVE_OTLP_ENDPOINT (the chart's tracing.endpoint), else none.")
    startup_timeout_seconds: int = Field(
        default=600,
        ge=10,
        le=86400,
        description="How long a replica may take to load the model before the kubelet restarts it "
        "(its startup probe budget).",
    )

    @property
    def gpu_count(self) -> int:
        return (self.gpus or 1) if self.device == RuntimeDevice.gpu else 0


# --------------------------------------------------------------------------------------------
# spec
# --------------------------------------------------------------------------------------------
_ANY_OBJECT: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}


class AutoscalingSpec(CamelModel):
    """Scale the predictor on load: in-flight + queued requests per replica, as the gateway counts them
    (the signal KEDA's HTTP add-on and Knative's KPA use). In a cluster a KEDA ScaledObject scales the
    predictor Deployment on the gateway's signal; `caffeserve up` scales its server processes itself."""

    min_replicas: int = Field(
        default=1, ge=0, le=1000,
        description="Fewest server pods. 0: scale to zero when idle; the gateway holds a request while no pod is "
        "ready (up to coldStartTimeoutSeconds), and held requests wake the model.",
    )
    max_replicas: int = Field(ge=1, le=1000, description="Most server pods.")
    target: int = Field(
        default=4, ge=1, le=100000,
        description="In-flight + queued requests per replica the autoscaler aims at (replicas = ceil(load / target)).",
    )
    cold_start_timeout_seconds: int = Field(
        default=300, ge=1, le=3600,
        description="With minReplicas 0: how long the gateway holds a request while no pod is ready; past it, 503 "
        "with Retry-After.",
    )
    scale_down_delay_seconds: int = Field(
        default=60, ge=0, le=3600,
        description="How long the load must stay lower before replicas are removed (and before the last goes, with "
        "minReplicas 0): KEDA's cooldownPeriod and the HPA's scale-down stabilization window.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"autoscaling.minReplicas ({self.min_replicas}) is above maxReplicas ({self.max_replicas})"
            )
        return self


class CanarySpec(CamelModel):
    """A second version of the model beside the first, given a share of the requests. Promote it by
    moving its model (and source) into spec.model (spec.source) and removing spec.canary; roll it back
    by removing spec.canary."""

    model: ModelSpec = Field(description="The canary's model files and tensors (as spec.model).")
    source: ModelSource | None = Field(default=None, description="Where its files come from. Default: spec.source.")
    traffic_percent: int = Field(ge=0, le=100, description="Share of the model's requests the canary gets (0-100); "
                                 "a request that names a version in its URL goes to the variant serving it.")
    replicas: int = Field(default=1, ge=0, le=1000, description="Server pods of the canary. With spec.autoscaling the "
                          "canary is autoscaled like the primary, between the same bounds, and this is ignored.")


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
        default=None,
        json_schema_extra={"items": {"type": "object", "description": "A Kubernetes Toleration.", **_ANY_OBJECT}},
        description="Kubernetes Tolerations of the pods. With device gpu, one for the nvidia.com/gpu taint is added.",
    )
    affinity: dict[str, Any] | None = Field(
        default=None, json_schema_extra=_ANY_OBJECT, description="Kubernetes Affinity of the pods."
    )
    runtime_class_name: str | None = Field(
        default=None, pattern=_DNS_SUBDOMAIN, description="RuntimeClass of the pods (e.g. nvidia)."
    )
    priority_class_name: str | None = Field(
        default=None, pattern=_DNS_SUBDOMAIN, description="PriorityClass of the pods."
    )
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        default=None, description="Secrets for pulling the images."
    )
    service_account_name: str | None = Field(
        default=None, pattern=_DNS_SUBDOMAIN,
        description="ServiceAccount the pods run as (its token is not mounted). Default: the namespace's default.",
    )
    autoscaling: AutoscalingSpec | None = Field(
        default=None, description="Scale on load between minReplicas and maxReplicas (spec.replicas is then ignored).",
    )
    canary: CanarySpec | None = Field(default=None, description="A canary version with a share of the requests.")
    pool: str | None = Field(
        default=None, pattern=_DNS_LABEL, max_length=47,
        description="A CaffeServingPool in this namespace to serve the model from, instead of pods of its own: the "
        "operator places it on pool pods by its memory and loads it there. replicas (or the autoscaler's count) is "
        "then how many pool pods hold it. Its files come from source.pvc, a claim the pool mounts "
        "(spec.modelClaims). A canary still runs in pods of its own.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> CaffeModelServiceSpec:
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
        for f in self.model_files():
            role, name, local = f.role, f.name, f.local_name
            if is_url(name):
                if self.source.url is None:
                    raise ValueError(f"model.{role} is a URL ({name}); only a source.url model may name files by URL")
                if not local or _bad_path_reason(local) or local in (".", ".."):
                    raise ValueError(f"model.{role} URL {name} does not end in a file name")
            elif why := _bad_path_reason(name):
                raise ValueError(f"model.{role} {name!r} {why}")
            elif self.source.config_map is not None and "/" in name:
                raise ValueError(f"model.{role} {name!r}: ConfigMap keys cannot contain '/'")
            if (other := seen.get(local)) is not None:
                raise ValueError(f"model.{role} and model.{other} would both be /models/{local}")
            seen[local] = role
        if self.model.python_layers is not None:
            path = self.model.python_layers.path
            if self.source.downloaded:
                raise ValueError("model.pythonLayers needs source.pvc or source.configMap: a downloaded model "
                                 "(source.url, source.s3) brings single files, not a folder of Python modules")
            if why := _bad_path_reason(path):
                raise ValueError(f"model.pythonLayers.path {path!r} {why}")
            if self.source.config_map is not None and path.strip("/") not in ("", "."):
                raise ValueError(f"model.pythonLayers.path {path!r}: a ConfigMap's keys are one folder: use '.'")
        if self.pool is not None:
            if self.source.pvc is None:
                raise ValueError(f"pool {self.pool}: a pool model's files must come from source.pvc (a claim the pool "
                                 f"mounts), not source.{self.source.kind}")
            if rt.gpus is not None:
                raise ValueError(f"runtime.gpus is set but the model is in pool {self.pool}, whose spec.gpu decides")
        if self.canary is not None:
            try:
                CaffeModelServiceSpec.model_validate(self.canary_spec().model_dump(by_alias=True, exclude_none=True))
            except ValidationError as e:
                raise ValueError("canary: " + format_validation_error(e, prefix="canary.")) from None
        return self

    def canary_spec(self) -> CaffeModelServiceSpec:
        """The canary as a spec of its own: this one with the canary's model, source and replicas (its
        autoscaling is the primary's: a canary gets the same bounds, and scale to zero, as the primary)."""
        c = self.canary
        assert c is not None
        return self.model_copy(update={"model": c.model, "source": c.source or self.source, "replicas": c.replicas,
                                       "canary": None, "pool": None})

    def model_files(self) -> list[ModelFile]:
        """Every model file with its download URL (see ModelSpec.files)."""
        return self.model.files(self.source.url, self.source.s3)


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------
class Condition(CamelModel):
    """A Kubernetes condition (type, status, reason, message, lastTransitionTime)."""

    model_config = CamelModel.model_config | {"extra": "ignore"}

    type: str = Field(description="Condition type; Ready says whether clients can use the model.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str | None = Field(
        default=None, description="One CamelCase word for why, e.g. InvalidSpec, Progressing, ReplicasReady."
    )
    message: str | None = Field(default=None, description="What happened, for humans.")
    last_transition_time: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="When the status last changed."
    )
    observed_generation: int | None = Field(
        default=None, description="metadata.generation this condition was computed for."
    )


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
    replicas: int | None = Field(
        default=None, description="Server pods that exist (the scale subresource's status.replicas)."
    )
    ready_replicas: int | None = Field(default=None, description="Server pods that are ready.")
    url: str | None = Field(default=None, description="Where clients reach this model: its Open Inference Protocol URL "
                                     "(.../v2/models/NAME), through the gateway when there is one, else its Service.")
    grpc_address: str | None = Field(
        default=None,
        description="Where gRPC clients reach this model (host:port; the request names the model): "
        "the gateway's gRPC address when there is one, else its Service's port grpc. "
        "Unset with runtime.grpc.enabled false.",
    )
    selector: str | None = Field(
        default=None, description="Label selector of the server pods (for the scale subresource)."
    )
    backend: BackendStatus | None = Field(
        default=None, description="The backend serving the model, as one ready pod reports it (during a rollout, "
        "what the asked pod says). Asked again when the pod template or the spec changes.",
    )
    variants: list[VariantStatus] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="With a canary: each variant, its version, share of the requests and readiness.",
    )
    placement: PlacementStatus | None = Field(
        default=None, description="With spec.pool: the pool pods that hold the model, and its memory.",
    )


class PlacementStatus(CamelModel):
    """Where a pool model is loaded (spec.pool)."""

    model_config = CamelModel.model_config | {"extra": "ignore"}

    pool: str = Field(description="The CaffeServingPool.")
    pods: list[str] = Field(default_factory=list, description="Pool pods that hold the model (loaded).")
    memory_bytes: int | None = Field(default=None, description="Memory one copy takes, as a pod measured it at load "
                                     "(an estimate until one has).")
    measured: bool = Field(default=False, description="Whether memoryBytes was measured by a pod.")


class VariantStatus(CamelModel):
    """One variant of the model (primary, canary) as the cluster shows it."""

    model_config = CamelModel.model_config | {"extra": "ignore"}

    name: Literal["primary", "canary"] = Field(description="primary, or canary.")
    version: str = Field(description="The model version it serves.")
    traffic_percent: int = Field(description="Its share of the model's requests.")
    replicas: int = Field(default=0, description="Its server pods.")
    ready_replicas: int = Field(default=0, description="Its ready server pods.")
    ready: bool = Field(description="Whether every desired pod of it runs the current spec and is ready.")


class InvalidSpec(Exception):
    """A spec the operator cannot act on; the message says which field and why."""


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
        raise InvalidSpec(format_validation_error(e, prefix="spec.")) from None
    return parsed

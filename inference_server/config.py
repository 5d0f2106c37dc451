"""The server's configuration: one pydantic model, reused by the operator's CR spec.

Field names are snake_case in Python and camelCase on the wire (CR, YAML written by the
operator); both spellings are accepted when reading, so a hand-written `server.yaml` may use
either. Relative file paths are resolved against the config file's folder.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, overload

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

ENV_PREFIX = "CAFFESERVE__"
MiB = 1024 * 1024


class CamelModel(BaseModel):
    """Base for every config/CR type: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_enum_values=True
    )


class Datatype(StrEnum):  # StrEnum: str() and f-strings give the value ("FP32"), not "Datatype.FP32"
    """Open Inference Protocol tensor datatypes."""

    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"
    BYTES = "BYTES"


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$", description="Expected sha256 (hex) of the file.")]


class TensorSpec(CamelModel):
    """A model input as clients see it."""

    name: str = Field(description="Blob name in the Caffe net.")
    shape: list[int] | None = Field(
        default=None,
        description="Shape of one request's tensor, batch dimension first (e.g. [1, 3, 224, 224]). "
        "Default: the net's input shape. The batch dimension is reported as -1.",
    )
    datatype: Datatype = Field(
        default=Datatype.FP32,
        description="Datatype clients send; the server converts to the net's float32. "
        "An input with image preprocessing also accepts BYTES (encoded JPEG/PNG).",
    )


class OutputSpec(CamelModel):
    """A model output: any blob of the net, not only the ones Caffe calls net outputs."""

    name: str = Field(description="Blob name in the Caffe net: any blob, e.g. one that feeds a Silence layer.")


class Preprocessing(CamelModel):
    """How an encoded image (a BYTES input) becomes the Caffe input blob, as caffe.io.Transformer does it.

    Order, as in Caffe's classifier: decode to float pixels in [0, 1] (caffe.io.load_image) → resize
    to `image_size` (caffe.io.resize_image) → HWC→CHW → `channel_swap` → × `raw_scale` → subtract
    mean → × `scale`.
    """

    image_size: list[int] | None = Field(
        default=None, min_length=2, max_length=2,
        description="[height, width] the decoded image is resized to. Default: the input blob's H and W.",
    )
    color: bool = Field(default=True, description="Decode as RGB (true) or grayscale (false).")
    raw_scale: float = Field(default=255.0, gt=0, description="Multiply [0,1] pixels by this (Caffe's raw_scale).")
    channel_swap: list[int] | None = Field(
        default=None, description="Channel order after decoding RGB, e.g. [2, 1, 0] for BGR (Caffe's reference nets)."
    )
    mean_values: list[float] | None = Field(default=None, description="Per-channel mean subtracted after raw_scale.")
    mean_file: str | None = Field(
        default=None,
        description="A mean.binaryproto subtracted pixel by pixel (resized to the input's H×W as caffe.io does "
        "where its size differs); for a per-channel mean, use meanValues.",
    )
    scale: float = Field(default=1.0, gt=0, description="Multiply after mean subtraction (Caffe's input_scale).")
    resize: Literal["caffe", "fast"] = Field(
        default="caffe",
        description="caffe: decode and resize exactly as caffe.io does (float pixels, scikit-image's anti-aliased "
        "linear resize); fast: Pillow's bilinear resize on 8-bit pixels, several times faster, off by a few "
        "grey levels.",
    )

    @model_validator(mode="after")
    def _one_mean(self) -> Preprocessing:
        if self.mean_values is not None and self.mean_file is not None:
            raise ValueError("set at most one of meanValues and meanFile")
        return self


class DeviceKind(StrEnum):  # str() gives "cpu"/"gpu", as metadata and the CR status show it
    cpu = "cpu"
    gpu = "gpu"


class Device(CamelModel):
    """Where the Net runs."""

    kind: DeviceKind = Field(default=DeviceKind.cpu, description="cpu, or gpu (without a GPU or a CUDA build the model "
                             "fails to load: the server stays live, readiness 503 says why).")
    id: int = Field(default=0, ge=0, description="GPU device id (with kind: gpu).")


class Batching(CamelModel):
    """Dynamic batching: requests queued together are stacked into one forward pass."""

    enabled: bool | Literal["auto"] = Field(
        default=False,
        description="true, false, or auto. Only a batch-separable net is batched (checked at load: every output "
        "keeps the batch on axis 0 and a stacked forward equals the items' own); true on any other net refuses to "
        "start, auto leaves batching off and says why in the metadata. auto also times forward passes at load and "
        "batches only where it raises throughput.",
    )
    max_batch_size: int = Field(default=8, ge=1, le=4096, description="Largest stacked batch.")
    max_queue_delay_ms: float = Field(
        default=2.0, ge=0, le=10_000, description="How long the first queued request waits for others to join."
    )
    latency_budget_ms: float = Field(
        default=100.0,
        gt=0,
        description="With enabled: auto, the largest forward time (plus queue delay) a batch may take.",
    )
    min_gain: float = Field(
        default=1.1, ge=1.0, description="With enabled: auto, batch only when items/s improve at least this factor."
    )


class Limits(CamelModel):
    """Request limits; every one answers a clear 4xx/5xx when exceeded."""

    max_request_bytes: int = Field(default=64 * MiB, ge=1024, description="Largest request body (413 beyond).")
    max_batch: int = Field(default=64, ge=1, description="Largest batch dimension one request may carry.")
    max_image_pixels: int = Field(
        default=4096 * 4096, ge=1, description="Largest decoded image (width × height); larger is a 400."
    )
    request_timeout_s: float = Field(default=30.0, gt=0, description="Deadline from arrival to answer (504 beyond).")
    max_queue: int = Field(default=256, ge=1, description="Requests waiting per model before 503 + Retry-After.")
    header_timeout_s: float = Field(default=10.0, gt=0, description="Deadline to receive a request's headers.")
    body_timeout_s: float = Field(default=30.0, gt=0, description="Deadline to receive a request's whole body.")
    max_inflight_bytes: int = Field(
        default=128 * MiB, ge=0,
        description="Request bodies held at once (being received, decoded or served); past it a request is "
        "answered 503 + Retry-After before its body is read (a request alone always fits). 0: no limit. "
        "One request's memory stays within about 4x its body, so this bounds the server's request memory.",
    )


class PythonLayers(CamelModel):
    """Where a net's Caffe Python layers (`type: "Python"`) come from. Loading such a net imports and runs
    their code in the server, so a net with a Python layer is refused unless this is set."""

    path: str = Field(
        description="Folder holding the layers' Python modules (each layer's python_param.module), put first on "
        "sys.path; relative paths resolve against the config file's folder. Its code runs when the model loads."
    )


class ModelFiles(CamelModel):
    """The Caffe model files."""

    prototxt: str = Field(description="Path of the deploy prototxt.")
    weights: str = Field(description="Path of the .caffemodel.")
    prototxt_sha256: Sha256 | None = None
    weights_sha256: Sha256 | None = None
    labels: str | None = Field(default=None, description="Text file, one class label per line (classification).")
    python_layers: PythonLayers | None = Field(
        default=None,
        description="Off by default: a net with a Python layer is refused unless this names the folder of its "
        "layer modules (their code runs in the server).",
    )


class Grpc(CamelModel):
    """The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), served beside REST by the
    same process, data plane and workers. Its message size limit is `limits.maxRequestBytes`."""

    enabled: bool = Field(
        default=True,
        description="Serve gRPC on `port` as well as REST (as Triton, KServe and MLServer do by default). Several "
        "servers on one host need a port each (`--grpc-port`, or 0 for any free port).",
    )
    port: int = Field(default=8081, ge=0, le=65535, description="gRPC port (0: any free port, printed in the log).")


class Tracing(CamelModel):
    """OpenTelemetry traces of infer requests, exported over OTLP/HTTP (protobuf). Off unless an endpoint is
    set here or in the standard OTEL_EXPORTER_OTLP_ENDPOINT; needs the `tracing` extra (docs/tracing.md)."""

    endpoint: str | None = Field(
        default=None, pattern=r"^https?://[^\s/$.?#][^\s]*$", max_length=2048,
        description="OTLP/HTTP base URL, e.g. http://otel-collector.observability:4318 (spans are posted to "
        "ENDPOINT/v1/traces). Default: OTEL_EXPORTER_OTLP_ENDPOINT if set, else no tracing.",
    )
    sample_ratio: float = Field(
        default=1.0, ge=0, le=1,
        description="Share of new traces recorded; a request whose traceparent says sampled (or not) follows it.",
    )


class OnnxCache(CamelModel):
    """Where converted ONNX graphs and their parity/speed verdicts are kept for the next server (another pod,
    another node): with them, `backend: auto` serves ONNX Runtime from the start instead of converting again.
    This machine's own cache is CAFFESERVE_CACHE_DIR (docs/onnx.md)."""

    shared_dir: str | None = Field(
        default=None, max_length=4096,
        description="A folder every server of the model can read and write (e.g. a ReadWriteMany volume; the "
        "chart's modelCache value mounts one): graphs and verdicts are published there and looked for there. "
        "Relative paths resolve against the config file's folder.",
    )
    model_folder: bool = Field(
        default=True,
        description="Without sharedDir, publish to the model's own folder (.caffeserve-onnx/ beside the prototxt) "
        "where it can be written.",
    )


Backend = Literal["pycaffe", "onnxruntime", "auto"]


class ModelServing(CamelModel):
    """How a model is served: the part of the config the operator's CR spec shares."""

    inputs: list[TensorSpec] | None = Field(default=None, description="Default: the net's Input layers.")
    outputs: list[OutputSpec] | None = Field(
        default=None, description="Blobs to serve, any blob of the net. Default: Caffe's net outputs."
    )
    preprocessing: Preprocessing | None = Field(default=None, description="For BYTES (encoded image) inputs.")
    device: Device = Field(default_factory=Device)
    instances: int = Field(default=1, ge=1, le=64, description="Net copies, each owned by one worker thread.")
    batching: Batching = Field(default_factory=Batching)
    backend: Backend = Field(
        default="auto",
        description="pycaffe, onnxruntime, or auto: convert to ONNX at load and serve with ONNX Runtime only where "
        "the parity check against pycaffe passes, else pycaffe.",
    )
    parity_tolerance: float = Field(
        default=1e-5,
        gt=0,
        le=1e-2,
        description="The ONNX Runtime graph serves only if max |Δ| ≤ this × max(1, max |pycaffe|) on every output "
        "and on the logits feeding a final Softmax, and the top-5 classes agree "
        "(1e-5 catches a BatchNorm off by 1e-5).",
    )
    limits: Limits = Field(default_factory=Limits)
    tracing: Tracing = Field(default_factory=Tracing)


class ServerConfig(ModelServing):
    """The whole `caffeserve serve --config FILE` file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", description="Model name in URLs.")
    version: str = Field(default="1", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    model: ModelFiles
    # the process's own listener, like --port (not a ModelServing field: the operator will choose the pod's ports)
    grpc: Grpc = Field(default_factory=Grpc)
    # where the operator (or a user) keeps converted graphs for the next pod: the process's, not the CR's
    onnx_cache: OnnxCache = Field(default_factory=OnnxCache)
    base_dir: str | None = Field(default=None, exclude=True, description="Folder relative paths resolve against.")

    @overload
    def path(self, p: str) -> Path: ...
    @overload
    def path(self, p: None) -> None: ...
    def path(self, p: str | None) -> Path | None:
        """A model file's path, resolved against the config file's folder. A folder that does not exist (a
        model pushed with its config to a repository that has no folder of its name) cannot be walked through
        by the kernel, so `..` is taken lexically there: `../shared/w.caffemodel` is the repository's `shared/`."""
        if p is None:
            return None
        q = Path(p)
        if q.is_absolute() or self.base_dir is None:
            return q
        base = Path(self.base_dir)
        return base / q if base.is_dir() else Path(os.path.normpath(base / q))


class ConfigError(Exception):
    """An invalid config; the message names the field."""


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """`CAFFESERVE__DEVICE__KIND=gpu` → {"device": {"kind": "gpu"}}; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__") if p]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        # env keys are snake_case; accept the camelCase spelling already in the file
        target = k if k in merged else next((m for m in merged if m.replace("_", "").lower() == k.replace("_", "")), k)
        if isinstance(v, dict) and isinstance(merged.get(target), dict):
            merged[target] = _merge(merged[target], v)
        else:
            merged[target] = v
    return merged


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One part per problem, naming the field by its path (`prefix` + `inputs[0].name`); also the
    operator's message for a bad CR spec (prefix `spec.`)."""
    parts = []
    for e in err.errors():
        loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in e["loc"]).replace(".[", "[")
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{prefix}{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_config(
    data: dict[str, Any], base_dir: str | None = None, environ: dict[str, str] | None = None
) -> ServerConfig:
    data = _merge(data or {}, _env_overrides(dict(os.environ) if environ is None else environ))
    try:
        cfg = ServerConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid config: {format_validation_error(e)}") from None
    cfg.base_dir = base_dir
    return cfg


def load_config(path: str | os.PathLike, environ: dict[str, str] | None = None) -> ServerConfig:
    """Read and validate a YAML config file; environment variables `CAFFESERVE__…` override fields."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {p} must be a YAML mapping")
    return parse_config(data, base_dir=str(p.resolve().parent), environ=environ)

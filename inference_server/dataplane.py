"""What a request means, without HTTP: model state, metadata, and the infer path.

The model loads in the background after the server starts listening: liveness is true at once,
readiness only once every worker holds a Net, and it stays false (with the loader's message) after
a failed load.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time

import numpy as np
import orjson

from . import __version__
from .backends import BackendChoice, choose_backend
from .codecs import InferRequest, decode_request, encode_response
from .config import ServerConfig, TensorSpec
from .errors import BadRequest, ModelLoadError, NotFound, Unavailable
from .executor import Executor
from .hashing import file_sha256
from .metrics import ServerMetrics
from .preprocess import ImagePreprocessor

log = logging.getLogger(__name__)
SERVER_NAME = "caffe-serving"
EXTENSIONS = ["binary_tensor_data", "classification"]


def check_model_files(cfg: ServerConfig) -> None:
    """Files exist and match their sha256 when one is given; otherwise a ModelLoadError saying which."""
    m = cfg.model
    for label, rel, want in (("prototxt", m.prototxt, m.prototxt_sha256), ("weights", m.weights, m.weights_sha256),
                             ("labels", m.labels, None)):
        if rel is None:
            continue
        path = str(cfg.path(rel))
        if not os.path.isfile(path):
            raise ModelLoadError(f"model {label} file {path} does not exist")
        if want is not None:
            got = file_sha256(path)
            if got.lower() != want.lower():
                raise ModelLoadError(f"model {label} file {path} has sha256 {got}, the config expects {want}")


class InputBinding:
    """One model input: what clients send and how it becomes a float32 blob."""

    __slots__ = ("name", "datatype", "item_shape", "image")

    def __init__(self, name: str, datatype: str, item_shape: tuple[int, ...], image: ImagePreprocessor | None):
        self.name, self.datatype, self.item_shape, self.image = name, datatype, item_shape, image

    def to_blob(self, t, max_batch: int) -> np.ndarray:
        if t.datatype == "BYTES" and self.image is not None:
            if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1):
                raise BadRequest(f"input '{self.name}': images are sent as a BYTES tensor of shape [N] or [N, 1], got {t.shape}")
            self._check_batch(t.shape[0], max_batch)
            return functools.partial(self.image, self.name, t.array)  # decoded off the event loop
        if t.datatype != self.datatype:
            accepted = self.datatype + (" or BYTES (encoded images)" if self.image is not None else "")
            raise BadRequest(f"input '{self.name}': datatype {t.datatype} does not match the model's {accepted}")
        if tuple(t.shape[1:]) != self.item_shape or len(t.shape) != len(self.item_shape) + 1:
            raise BadRequest(
                f"input '{self.name}': shape {t.shape} does not match the model's {[-1, *self.item_shape]}"
            )
        self._check_batch(t.shape[0], max_batch)
        arr = t.array
        return arr if arr.dtype == np.float32 else arr.astype(np.float32)

    def _check_batch(self, n: int, max_batch: int) -> None:
        if n < 1 or n > max_batch:
            raise BadRequest(f"input '{self.name}': batch size {n} is outside 1..{max_batch}")


class Model:
    """One served model: its config, state, executor and precomputed metadata."""

    def __init__(self, cfg: ServerConfig, metrics: ServerMetrics):
        self.cfg = cfg
        self.name, self.version = cfg.name, cfg.version
        self.metrics = metrics
        self.state = "loading"
        self.error: str | None = None
        self.executor: Executor | None = None
        self.choice: BackendChoice | None = None
        self.inputs: dict[str, InputBinding] = {}
        self.outputs: list[str] = []
        self.labels: list[str] | None = None
        self.metadata: bytes = b""
        self.max_elements = cfg.limits.max_request_bytes
        self.max_batch = cfg.limits.max_batch
        self.timeout = cfg.limits.request_timeout_s

    # --- loading (runs in a background thread)
    def load(self) -> None:
        try:
            self._load()
        except ModelLoadError as e:
            self.state, self.error = "failed", str(e)
            log.error("model %s failed to load: %s", self.name, e)
        except Exception as e:  # anything else from a loader is still a load failure, not a crash
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            log.exception("model %s failed to load", self.name)
        if self.state == "failed" and self.executor is not None:
            self.executor.stop()  # a check after the Nets were built failed: free them (and their memory)

    def _load(self) -> None:
        cfg = self.cfg
        check_model_files(cfg)
        self.choice = choose_backend(cfg)
        log.info("model %s: serving with %s (%s)", self.name, self.choice.name, self.choice.reason)
        self.executor = Executor(cfg, self.choice, on_batch=self.metrics.observe_batch)
        desc = self.executor.start()
        net_inputs = {b.name: b.shape for b in desc.inputs}
        specs = cfg.inputs or [TensorSpec(name=n) for n in net_inputs]
        for spec in specs:
            if spec.name not in net_inputs:
                raise ModelLoadError(f"config input '{spec.name}' is not an input of the net (it has {list(net_inputs)})")
            shape = tuple(spec.shape) if spec.shape else net_inputs[spec.name]
            image = None
            if cfg.preprocessing is not None and len(shape) == 4:
                mean_path = str(cfg.path(cfg.preprocessing.mean_file)) if cfg.preprocessing.mean_file else None
                image = ImagePreprocessor(cfg.preprocessing, shape, cfg.limits.max_image_pixels, mean_path)
            self.inputs[spec.name] = InputBinding(spec.name, spec.datatype, tuple(shape[1:]), image)
        net_outputs = [b.name for b in desc.outputs]
        self.outputs = [o.name for o in cfg.outputs] if cfg.outputs else net_outputs
        for o in self.outputs:
            if o not in net_outputs:
                raise ModelLoadError(f"config output '{o}' is not an output of the net (it has {net_outputs})")
        self.output_shapes = {b.name: b.shape for b in desc.outputs}
        if cfg.model.labels:
            with open(cfg.path(cfg.model.labels)) as f:
                self.labels = [line.rstrip("\n") for line in f if line.strip()]
        self.metadata = orjson.dumps(self._metadata(desc))
        self.metrics.set_backend(self.choice.name, self.choice.reason)
        self.metrics.set_batching(self.executor.batching, self.executor.max_batch if self.executor.batching else 1,
                                  self.executor.decision.curve if self.executor.decision else [])
        self.state = "ready"
        self.metrics.ready.set(1)
        log.info("model %s version %s is ready", self.name, self.version)

    def _metadata(self, desc) -> dict:
        ex = self.executor
        params = {"backend": self.choice.name, "backend_reason": self.choice.reason, **self.choice.details,
                  "device": str(self.cfg.device.kind), "instances": self.cfg.instances, "batching": ex.batching,
                  "max_request_batch": self.max_batch}
        if self.cfg.device.kind == "gpu":
            params["device_id"] = self.cfg.device.id
        if ex.batching:
            params["batching_max_batch_size"] = ex.max_batch
        if ex.decision is not None:
            params["batching_decision"] = ex.decision.reason
            params["batching_curve"] = ex.decision.curve
        if self.labels:
            params["labels"] = len(self.labels)
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "caffe",
            "inputs": [{"name": b.name, "datatype": b.datatype, "shape": [-1, *b.item_shape],
                        **({"parameters": {"image": True}} if b.image else {})} for b in self.inputs.values()],
            "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, *self.output_shapes[n][1:]]} for n in self.outputs],
            "parameters": params,
        }

    def close(self, timeout: float = 30.0) -> bool:
        """Stop the workers; False when a forward pass was still running after `timeout`."""
        return self.executor.stop(timeout) if self.executor is not None else True

    # --- serving
    def check_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "failed":
            raise Unavailable(f"model '{self.name}' failed to load: {self.error}", retry_after_s=30)
        raise Unavailable(f"model '{self.name}' is loading", retry_after_s=2)

    async def infer(self, body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        self.check_ready()
        req = decode_request(body, headers, self.max_elements)
        requested = req.outputs
        names = self.outputs if requested is None else [o.name for o in requested]
        for n in names:  # before any image is decoded: a bad request costs nothing
            if n not in self.output_shapes or n not in self.outputs:
                raise BadRequest(f"unknown output '{n}'; the model's outputs are: {', '.join(self.outputs)}")
        blobs = await self._blobs(req)
        batch = next(iter(blobs.values())).shape[0]
        result, timing = await self.executor.submit(blobs, list(dict.fromkeys(names)), batch,
                                                    time.monotonic() + self.timeout)
        self.metrics.queue_seconds.observe(timing.queue_s)
        outs = []
        if requested is None:
            outs = [(n, "FP32", result[n], req.binary_output) for n in names]
        else:
            for o in requested:
                arr = result[o.name]
                if o.classification:
                    outs.append((o.name, "BYTES", self._classify(o.name, arr, o.classification), o.binary))
                else:
                    outs.append((o.name, "FP32", arr, o.binary))
        return encode_response(self.name, self.version, req.id, outs)

    async def _blobs(self, req: InferRequest) -> dict[str, np.ndarray]:
        blobs = {}
        for t in req.inputs:
            binding = self.inputs.get(t.name)
            if binding is None:
                raise BadRequest(f"unknown input '{t.name}'; the model's inputs are: {', '.join(self.inputs)}")
            if t.name in blobs:
                raise BadRequest(f"input '{t.name}' is given more than once")
            blobs[t.name] = binding.to_blob(t, self.max_batch)
        missing = [n for n in self.inputs if n not in blobs]
        if missing:
            raise BadRequest(f"missing input(s): {', '.join(missing)}")
        for name, blob in blobs.items():
            if callable(blob):  # encoded images: a large one must not stall every other connection
                blobs[name] = await asyncio.to_thread(blob)
        sizes = {a.shape[0] for a in blobs.values()}
        if len(sizes) > 1:
            raise BadRequest(f"inputs disagree on the batch size: {sorted(sizes)}")
        return blobs

    def _classify(self, name: str, arr: np.ndarray, k: int) -> np.ndarray:
        """Triton's classification extension: top-k per batch item as "score:index[:label]"."""
        flat = arr.reshape(arr.shape[0], -1)
        k = min(k, flat.shape[1])
        idx = np.argsort(-flat, axis=1, kind="stable")[:, :k]
        out = np.empty((flat.shape[0], k), dtype=object)
        for r in range(flat.shape[0]):
            for c, i in enumerate(idx[r]):
                label = f":{self.labels[i]}" if self.labels and i < len(self.labels) else ""
                out[r, c] = f"{flat[r, i]:f}:{i}{label}".encode()
        return out


class DataPlane:
    """The server's view of its models (one per process today; the routes are per model already)."""

    def __init__(self, model: Model):
        self.models = {model.name: model}
        self.model = model
        self.server_metadata = orjson.dumps({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})
        self.draining = False

    def get(self, name: str, version: str | None = None) -> Model:
        m = self.models.get(name)
        if m is None:
            raise NotFound(f"model '{name}' is not served here (known: {', '.join(self.models)})")
        if version is not None and version != m.version:
            raise NotFound(f"model '{name}' has no version '{version}' (it serves version '{m.version}')")
        return m

    def ready(self) -> bool:
        return not self.draining and all(m.state == "ready" for m in self.models.values())

    def not_ready_reason(self) -> str:
        if self.draining:
            return "the server is shutting down"
        for m in self.models.values():
            if m.state != "ready":
                return f"model '{m.name}' failed to load: {m.error}" if m.state == "failed" else f"model '{m.name}' is loading"
        return ""


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
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from .. import __version__
from ..backends import BackendChoice, choose_backend
from ..config import ServerConfig, TensorSpec
from ..errors import BadRequest, DeadlineExceeded, InferenceError, ModelLoadError, NotFound, Unavailable
from ..hashing import file_sha256
from ..loading.child_load import probe_load
from .codecs import HEADER_LENGTH, STREAM_MIN_BYTES, InferRequest, Plans, decode_request, encode_response
from .executor import Executor
from .inline_path import InlinePlan, PlanKey
from .memory import ModelMemory, gpu_used_bytes, release_freed_memory, rss_bytes
from .metrics import ServerMetrics
from .preprocess import ImagePreprocessor
from .stats import ModelStats, model_config
from .tracing import RequestTrace, ServerTracing

if TYPE_CHECKING:
    from .switch import BackendSwitch

log = logging.getLogger(__name__)
_decoder_pool: ThreadPoolExecutor | None = None


def _decoders() -> ThreadPoolExecutor:
    """The threads that decode large JSON bodies: two, as many as the CPU they may usefully share
    with the event loop (how many bodies are held at once is limits.maxInflightBytes' job)."""
    global _decoder_pool
    if _decoder_pool is None:
        _decoder_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="json-decode")
    return _decoder_pool


SERVER_NAME = "caffe-serving"
Outputs = list[tuple[str, str, np.ndarray, bool]]  # (name, datatype, array, as binary) of an answer
EXTENSIONS = ["binary_tensor_data", "classification", "statistics", "model_configuration"]


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

    def check(self, datatype: str, shape: list[int], max_batch: int) -> None:
        """What the model accepts, from the request's fields alone (before any tensor is built)."""
        if datatype == "BYTES" and self.image is not None:
            if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
                raise BadRequest(
                    f"input '{self.name}': images are sent as a BYTES tensor of shape [N] or [N, 1], got {shape}"
                )
            self._check_batch(shape[0], max_batch)
            return
        if datatype != self.datatype:
            accepted = self.datatype + (" or BYTES (encoded images)" if self.image is not None else "")
            raise BadRequest(f"input '{self.name}': datatype {datatype} does not match the model's {accepted}")
        if tuple(shape[1:]) != self.item_shape or len(shape) != len(self.item_shape) + 1:
            raise BadRequest(
                f"input '{self.name}': shape {shape} does not match the model's {[-1, *self.item_shape]}"
            )
        self._check_batch(shape[0], max_batch)

    def to_blob(self, t, max_batch: int, checked: bool = False) -> np.ndarray | Callable[[], np.ndarray]:
        """`t` as the blob (a callable for encoded images, decoded off the loop); `checked`: `check` passed."""
        if not checked:
            self.check(t.datatype, t.shape, max_batch)
        if t.datatype == "BYTES" and self.image is not None:
            return functools.partial(self.image, self.name, t.array)  # decoded off the event loop
        arr = t.array
        return arr if arr.dtype == np.float32 else arr.astype(np.float32)

    def _check_batch(self, n: int, max_batch: int) -> None:
        if n < 1 or n > max_batch:
            raise BadRequest(f"input '{self.name}': batch size {n} is outside 1..{max_batch}")


class Model:
    """One served model: its config, state (loading, ready, failed, unloading), executor and precomputed
    metadata, and the memory its load took."""

    def __init__(self, cfg: ServerConfig, metrics: ServerMetrics):
        self.cfg = cfg
        self.name, self.version = cfg.name, cfg.version
        self.metrics = metrics
        self.state = "loading"
        self.error: str | None = None
        # None only until load() sets them: requests reach a model only once it is ready
        self.executor: Executor = None  # type: ignore[assignment]
        self.choice: BackendChoice = None  # type: ignore[assignment]
        self.inputs: dict[str, InputBinding] = {}
        self.outputs: list[str] = []
        self.output_shapes: dict[str, tuple[int, ...]] = {}
        self.labels: list[str] | None = None
        self.metadata: bytes = b""
        self.load_times: dict[str, float] = {}  # load_seconds (start to ready), load_probe_seconds
        self.config_json: bytes = b""  # Triton's model configuration (stats.model_config)
        self.answer_headers: dict[str, str] = {}  # on every infer answer: which backend answered
        self.stats = ModelStats()
        self.plans: Plans = {}  # binary requests' headers decoded before (codecs.decode_request; loop only)
        # what those headers mean on the inline path (inline_path.py; loop only; emptied when the backend changes)
        self.inline_plans: dict[PlanKey, InlinePlan | None] = {}
        self.max_elements = cfg.limits.max_request_bytes
        self.max_batch = cfg.limits.max_batch
        self.timeout = cfg.limits.request_timeout_s
        self.memory = ModelMemory()
        # called with the measured memory before the model turns ready; raises to refuse it (the budget)
        self.admit: Callable[[ModelMemory], None] | None = None
        # held while this model's memory is measured (the repository's load lock: one load at a time), so
        # that `auto`'s switch (switch.py) and another model's load do not count each other's growth
        self.memory_lock: threading.Lock | None = None
        self.failure: InferenceError | None = None  # why a load failed, with the code a load call answers
        self.inflight = 0  # requests inside infer/run (event loop only): an unload waits for 0
        self.tracing: ServerTracing | None = None  # set when tracing is on (commands/serve.py)
        # the event loop requests run on (set by the repository before the load): with it, `auto` serves
        # pycaffe at once and switches once its onnxruntime check beside serving says so (switch.py)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.switch: BackendSwitch | None = None
        self.backend_since = 0.0  # time.time() when the serving backend began to serve
        self._desc = None  # the NetDescription of the serving backend

    # --- loading (runs in a background thread)
    def load(self) -> None:
        try:
            self._load()
        except ModelLoadError as e:
            self.state, self.error = "failed", str(e)
            self.failure = BadRequest(f"failed to load model '{self.name}': {e}")
            log.error("model %s failed to load: %s", self.name, e)
        except InferenceError as e:  # refused (the memory budget): the code says why
            self.state, self.error, self.failure = "failed", e.message, e
            log.error("model %s was not loaded: %s", self.name, e.message)
        except Exception as e:  # anything else from a loader is still a load failure, not a crash
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            self.failure = BadRequest(f"failed to load model '{self.name}': {self.error}")
            log.exception("model %s failed to load", self.name)
        if self.state == "failed" and self.executor is not None:
            self.executor.stop()  # a check after the Nets were built failed: free them (and their memory)

    def _load(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        check_model_files(cfg)
        rss0, gpu0 = rss_bytes(), self._gpu_used()
        probed = probe_load(cfg)  # a child process: a Caffe abort (CHECK, FATAL) becomes a ModelLoadError
        self.load_times["load_probe_seconds"] = round(probed.seconds, 3)
        self.choice = choose_backend(cfg, probed, defer=self.loop is not None)
        log.info("model %s: serving with %s (%s)", self.name, self.choice.name, self.choice.reason)
        self.executor = Executor(cfg, self.choice, on_batch=self._on_batch)
        desc = self.executor.start()
        net_inputs = {b.name: b.shape for b in desc.inputs}
        specs = cfg.inputs or [TensorSpec(name=n) for n in net_inputs]
        for spec in specs:
            if spec.name not in net_inputs:
                raise ModelLoadError(
                    f"config input '{spec.name}' is not an input of the net (it has {list(net_inputs)})"
                )
            shape = tuple(spec.shape) if spec.shape else net_inputs[spec.name]
            image = None
            if cfg.preprocessing is not None and len(shape) == 4:
                mean_path = str(cfg.path(cfg.preprocessing.mean_file)) if cfg.preprocessing.mean_file else None
                image = ImagePreprocessor(cfg.preprocessing, shape, cfg.limits.max_image_pixels, mean_path)
            self.inputs[spec.name] = InputBinding(spec.name, spec.datatype, tuple(shape[1:]), image)
        self.outputs = [b.name for b in desc.outputs]  # the config's (any blobs), checked by the backend
        self.output_shapes = dict(self.executor.probe.shapes)  # -1 on axis 0 and where the data decides
        if cfg.model.labels:
            with open(cfg.path(cfg.model.labels)) as f:
                self.labels = [line.rstrip("\n") for line in f if line.strip()]
        gpu1 = self._gpu_used()
        # what the load freed (the protobuf read of the weights, conversion buffers) goes back first: glibc
        # would keep it resident, and it would count as this model's (up to 3x its weights, measured)
        release_freed_memory()
        self.memory.host_bytes = max(0, rss_bytes() - rss0)
        self.memory.gpu_bytes = None if gpu0 is None or gpu1 is None else max(0, gpu1 - gpu0)
        if self.admit is not None:
            self.admit(self.memory)  # InsufficientMemory: load() frees the Nets and reports it
        self.load_times["load_seconds"] = round(time.perf_counter() - t0, 3)
        self.metrics.load_seconds.set(self.load_times["load_seconds"])
        self._describe(desc)
        self.metrics.set_memory(self.memory.host_bytes, self.memory.gpu_bytes)
        self.state = "ready"
        self.metrics.ready.set(1)
        log.info("model %s version %s is ready", self.name, self.version)
        if self.choice.pending:
            from .switch import BackendSwitch

            self.switch = BackendSwitch(self, probed)
            self.switch.start()

    def _describe(self, desc) -> None:
        """Metadata, configuration, answer headers and metrics for the serving backend."""
        self._desc = desc
        self.inline_plans = {}  # their answer headers name the backend
        self.backend_since = time.time()
        self.metadata = orjson.dumps(self._metadata(desc))
        self.config_json = orjson.dumps(model_config(self))
        self.answer_headers = {"X-Caffeserve-Backend": self.choice.name}
        self.metrics.set_backend(self.choice.name, self.choice.reason, self.backend_since)
        self.metrics.set_batching(self.executor.batching, self.executor.max_batch if self.executor.batching else 1,
                                  self.executor.decision.curve if self.executor.decision else [])

    def adopt_backend(self, choice: BackendChoice, executor: Executor | None = None, desc=None) -> Executor | None:
        """The swap point (on the event loop, so that no request is between reading the executor and queueing
        on it): `choice` serves from now on, on `executor` where given. Returns the executor it replaced (its
        queued requests still run there; the caller stops it), None where the model no longer serves."""
        if self.state != "ready":
            return None
        old = self.executor
        if executor is not None:
            self.executor = executor
            self.output_shapes = dict(executor.probe.shapes)
        self.choice = choice
        self._describe(desc if desc is not None else self._desc)
        log.info("model %s: serving with %s (%s)", self.name, choice.name, choice.reason)
        return old if executor is not None else None

    def _gpu_used(self) -> int | None:
        return gpu_used_bytes(self.cfg.device.id) if self.cfg.device.kind == "gpu" else None

    def _metadata(self, desc) -> dict:
        ex = self.executor
        params = {"backend": self.choice.name, "backend_reason": self.choice.reason,
                  "backend_since": round(self.backend_since, 3), **self.choice.details,
                  "device": str(self.cfg.device.kind), "instances": self.cfg.instances, "batching": ex.batching,
                  "batch_separable": ex.probe.separable, "batch_separable_reason": ex.probe.reason,
                  "max_request_batch": self.max_batch, **self.load_times, **self.memory.parameters()}
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
            "outputs": [{"name": n, "datatype": "FP32", "shape": list(self.output_shapes[n])} for n in self.outputs],
            "parameters": params,
        }

    def _on_batch(self, size: int, compute_s: float) -> None:
        """A worker finished a forward pass (called in its thread)."""
        self.metrics.observe_batch(size, compute_s)
        self.stats.execution(size, int(compute_s * 1e9))

    def stats_json(self) -> dict:
        """Triton's ModelStatistics, with the memory measured at load (`memory_usage`) once loaded."""
        usage = self.memory.usage(self.cfg.device.id) if self.state in ("ready", "unloading") else []
        return self.stats.as_json(self.name, self.version, usage)

    def close(self, timeout: float = 30.0) -> bool:
        """Stop the workers (and an `auto` check beside serving); False when a forward pass was still running
        after `timeout`."""
        if self.switch is not None:
            self.switch.cancel()
        return self.executor.stop(timeout) if self.executor is not None else True

    # --- serving
    def check_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "unloading":
            raise Unavailable(f"model '{self.name}' is being unloaded", retry_after_s=1, not_run=True)
        if self.state == "failed":
            raise Unavailable(f"model '{self.name}' failed to load: {self.error}", retry_after_s=30, not_run=True)
        raise Unavailable(f"model '{self.name}' is loading", retry_after_s=2, not_run=True)

    def _check_input(self, name: str, datatype: str, shape: list[int]) -> None:
        binding = self.inputs.get(name)
        if binding is None:
            raise BadRequest(f"unknown input '{name}'; the model's inputs are: {', '.join(self.inputs)}")
        binding.check(datatype, shape, self.max_batch)

    async def infer(self, body: bytes | bytearray, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        """REST: an infer request body (JSON or binary extension) to the response body and extra headers."""
        self.check_ready()
        started = time.perf_counter_ns()
        trace = None if self.tracing is None else self.tracing.rest(self, headers)
        self.inflight += 1
        try:
            header_len = headers.get(HEADER_LENGTH)
            json_len = int(header_len) if header_len is not None and header_len.isdecimal() else len(body)
            if json_len >= STREAM_MIN_BYTES:
                # a large JSON body: decoded in a thread, in short steps that give the event loop the
                # GIL back every few milliseconds (health probes and small requests keep being answered)
                req = await asyncio.get_running_loop().run_in_executor(
                    _decoders(), decode_request, body, headers, self.max_elements, self._check_input)
            else:
                req = decode_request(body, headers, self.max_elements, self._check_input, STREAM_MIN_BYTES,
                                     self.plans)
            outs, phases = await self._run_timed(req, None, started, trace)
            t = time.perf_counter_ns()
            answer = encode_response(self.name, self.version, req.id, outs)
        except BaseException as e:
            self.stats.failure(time.perf_counter_ns() - started)
            if trace is not None:
                trace.end(e)
            raise
        finally:
            self.inflight -= 1
        output_ns = time.perf_counter_ns() - t
        total, queue_ns, input_ns, infer_ns, rows, batch_size = phases
        self.stats.success(total + output_ns, queue_ns, input_ns, infer_ns, output_ns, rows, batch_size)
        if trace is not None:
            trace.end()
        return answer

    async def run(self, req: InferRequest, deadline: float | None = None,
                  trace: RequestTrace | None = None) -> Outputs:
        """A decoded request's outputs as (name, datatype, array, as_binary), whatever the protocol.

        `deadline` (time.monotonic()) is the client's own, if it gave one; `requestTimeoutS` bounds it.
        A request whose deadline has passed is never run. `trace` (tracing on) gets the phase times.
        """
        self.check_ready()
        started = time.perf_counter_ns()
        self.inflight += 1
        try:
            outs, phases = await self._run_timed(req, deadline, started, trace)
        except BaseException:
            self.stats.failure(time.perf_counter_ns() - started)
            raise
        finally:
            self.inflight -= 1
        total, queue_ns, input_ns, infer_ns, rows, batch_size = phases
        self.stats.success(total, queue_ns, input_ns, infer_ns, 0, rows, batch_size)
        return outs

    def run_now(self, req: InferRequest, deadline: float | None = None) -> Outputs | None:
        """`run` for a request answered without a wait: its inputs are numbers and its forward pass runs here, on
        the event loop (executor.py's inline path). None where `run` must serve it (nothing is counted then)."""
        if self.state != "ready" or self.tracing is not None or self.executor.inline_backend is None:
            return None
        started = time.perf_counter_ns()
        try:
            inputs = req.inputs
            if len(inputs) == 1 and not req.outputs and inputs[0].datatype != "BYTES" and len(self.inputs) == 1:
                # the usual request: one tensor of numbers, every output (no outputs to check, one batch size)
                deadline, run_names, blobs = self.bounded_deadline(deadline), self.outputs, self._blobs(req)
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded("the request's deadline passed before it reached the model")
                batch = blobs[inputs[0].name].shape[0]
            else:
                deadline, run_names, blobs = self._plan_run(req, deadline)
                for blob in blobs.values():
                    if callable(blob):
                        return None  # an encoded image: decoded off the loop by `run`
                batch = self._checked_batch(blobs, deadline)
            submitted = time.perf_counter_ns()
            done = self.executor.run_inline(blobs, run_names, batch, deadline)
            if done is None:
                return None
            outs, phases = self._ran(req, done[0], done[1], started, submitted, batch)
        except BaseException:
            self.stats.failure(time.perf_counter_ns() - started)
            raise
        total, queue_ns, input_ns, infer_ns, rows, batch_size = phases
        self.stats.success(total, queue_ns, input_ns, infer_ns, 0, rows, batch_size)
        return outs

    async def _run_timed(self, req: InferRequest, deadline: float | None, started: int,
                         trace: RequestTrace | None = None):
        """The request's outputs, and its phases for `stats` (ns since `started`, a perf_counter_ns())."""
        deadline, run_names, blobs = self._plan_run(req, deadline)
        for name, blob in blobs.items():
            if callable(blob):  # encoded images: a large one must not stall every other connection
                blobs[name] = await asyncio.to_thread(blob)
        batch = self._checked_batch(blobs, deadline)
        submitted = time.perf_counter_ns()
        ex = self.executor
        # a short forward runs here when the worker is idle (executor.py), without a coroutine for it
        done = ex.run_inline(blobs, run_names, batch, deadline)
        result, timing = done if done is not None else await ex.submit(blobs, run_names, batch, deadline)
        return self._ran(req, result, timing, started, submitted, batch, trace)

    def _plan_run(self, req: InferRequest, deadline: float | None) -> tuple[float, list[str], dict[str, Any]]:
        """(the deadline, the outputs to run, each input's blob): the request's own deadline bounded by
        `requestTimeoutS`, its outputs checked before any image is decoded (a bad request costs nothing)."""
        deadline = self.bounded_deadline(deadline)
        # an empty `outputs` list means every output, as an absent one does (Triton answers it so;
        # an empty answer would be a silent surprise)
        if not req.outputs:
            run_names = self.outputs  # the model's own: known, no repeats
        else:
            names = [o.name for o in req.outputs]
            for n in names:
                if n not in self.output_shapes:
                    raise BadRequest(f"unknown output '{n}'; the model's outputs are: {', '.join(self.outputs)}")
            run_names = list(dict.fromkeys(names))
        return deadline, run_names, self._blobs(req)

    def bounded_deadline(self, deadline: float | None) -> float:
        """The client's deadline (time.monotonic()), if it gave one, bounded by `requestTimeoutS` from now."""
        limit = time.monotonic() + self.timeout
        return limit if deadline is None else min(deadline, limit)

    @staticmethod
    def _checked_batch(blobs: dict[str, np.ndarray], deadline: float) -> int:
        """The batch size the inputs agree on; a request whose deadline passed is not run."""
        if len(blobs) > 1:
            sizes = {a.shape[0] for a in blobs.values()}
            if len(sizes) > 1:
                raise BadRequest(f"inputs disagree on the batch size: {sorted(sizes)}")
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("the request's deadline passed before it reached the model")
        return next(iter(blobs.values())).shape[0]

    def _ran(self, req: InferRequest, result: dict[str, np.ndarray], timing, started: int, submitted: int,
             batch: int, trace: RequestTrace | None = None):
        """(outputs as (name, datatype, array, as_binary), phases) of a forward pass's result."""
        self.metrics.queue_seconds.observe(timing.queue_s)
        if not req.outputs:
            binary = req.binary_output
            outs = [(n, "FP32", result[n], binary) for n in self.outputs]
        else:
            outs = []
            for o in req.outputs:
                arr = result[o.name]
                if o.classification:
                    outs.append((o.name, "BYTES", self._classify(o.name, arr, o.classification), o.binary))
                else:
                    outs.append((o.name, "FP32", arr, o.binary))
        phases = (time.perf_counter_ns() - started, int(timing.queue_s * 1e9), submitted - started,
                  int(timing.compute_s * 1e9), batch, timing.batch_size)
        if trace is not None:
            trace.ran(started, phases)
        return outs, phases

    def _blobs(self, req: InferRequest) -> dict[str, Any]:
        """Each input's blob; an encoded image's is a callable until it is decoded (off the loop)."""
        inputs, checked = req.inputs, req.checked
        if len(inputs) == 1 and len(self.inputs) == 1:  # the usual model: one input, as numbers
            t = inputs[0]
            binding = self.inputs.get(t.name)
            if binding is not None and (binding.image is None or t.datatype != "BYTES"):  # not an encoded image
                return {t.name: binding.to_blob(t, self.max_batch, checked)}
        blobs: dict[str, Any] = {}
        for t in inputs:
            binding = self.inputs.get(t.name)
            if binding is None:
                raise BadRequest(f"unknown input '{t.name}'; the model's inputs are: {', '.join(self.inputs)}")
            if t.name in blobs:
                raise BadRequest(f"input '{t.name}' is given more than once")
            blobs[t.name] = binding.to_blob(t, self.max_batch, checked)
        missing = [n for n in self.inputs if n not in blobs]
        if missing:
            raise BadRequest(f"missing input(s): {', '.join(missing)}")
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
    """The server's view of its models: those it serves (loading, ready, failed or unloading) and those it
    knows but does not hold (`absent`: in the repository and not loaded, or unloaded, with the reason).

    `strict` (a `--config` server): ready only when every model is; a repository server is ready once its
    start-up loads are done (`starting` false), whatever one model's state: each model has its own readiness.
    """

    def __init__(self, models: Model | list[Model], metrics: ServerMetrics | None = None, strict: bool = True):
        models = [models] if isinstance(models, Model) else list(models)
        self.models: dict[str, Model] = {m.name: m for m in models}
        self.absent: dict[str, tuple[str, str]] = {}  # name -> (version, reason)
        fallback = metrics or (models[0].metrics if models else None)
        if fallback is None:
            raise ValueError("a DataPlane without models needs the metrics to count unknown models' requests in")
        self.fallback_metrics = fallback
        self.server_metadata = orjson.dumps({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})
        self.draining = False
        self.strict = strict
        self.starting = False

    def get(self, name: str, version: str | None = None) -> Model:
        m = self.models.get(name)
        if m is None:
            absent = self.absent.get(name)
            if absent is not None:  # another replica may hold it: a gateway may send the request there
                raise Unavailable(f"model '{name}' is not loaded on this server ({absent[1]})", retry_after_s=1,
                                  not_run=True)
            raise NotFound(f"model '{name}' is not served here (known: {', '.join(self.models) or 'none'})")
        if version is not None and version != m.version:
            raise NotFound(f"model '{name}' has no version '{version}' (it serves version '{m.version}')")
        return m

    def metrics_of(self, name: str) -> ServerMetrics:
        """The metrics a request for model `name` counts in (an unknown model's: the server's fallback)."""
        m = self.models.get(name)
        return self.fallback_metrics if m is None else m.metrics

    def ready(self) -> bool:
        if self.draining or self.starting:
            return False
        return not self.strict or (not self.absent and all(m.state == "ready" for m in self.models.values()))

    def not_ready_reason(self) -> str:
        if self.draining:
            return "the server is shutting down"
        for m in self.models.values() if self.strict else ():
            if m.state != "ready":
                return (
                    f"model '{m.name}' failed to load: {m.error}"
                    if m.state == "failed"
                    else f"model '{m.name}' is {m.state}"
                )
        for name, (_, reason) in self.absent.items() if self.strict else ():
            return f"model '{name}' is not loaded ({reason})"
        if self.starting:
            return "the server is loading its models"
        return ""

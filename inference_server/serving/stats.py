"""Triton's statistics and model-configuration extensions: what a model has done, and how it is set up.

`GET /v2/models/{m}[/versions/{v}]/stats` (and `/v2/models/stats` for every model) answers Triton's
`ModelStatistics` JSON, which `tritonclient`'s `get_inference_statistics` reads:

- `inference_stats`: `{count, ns}` for `success` (whole request, arrival to encoded answer), `fail`,
  `queue` (waiting for a worker), `compute_input` (decoding the body and preparing the input blobs:
  images are decoded here), `compute_infer` (the forward pass, the whole batch's for a batched request)
  and `compute_output` (encoding the answer). `cache_hit`/`cache_miss` are always zero (no cache).
- `batch_stats`: per executed batch size, the number of executions and their summed input, forward
  and output times.
- `inference_count` (batch rows inferred) and `execution_count` (forward passes; a stacked batch is one).

Counters are cumulative since the server started, in nanoseconds, as Triton's are; the event loop and the
worker threads hand each request's and each forward pass's figures over as one tuple, added to the counters
when they are read (ModelStats).

`GET /v2/models/{m}[/versions/{v}]/config` answers Triton's model configuration JSON (`get_model_config`):
`name`, `platform`, `backend`, `max_batch_size`, `input`/`output` (`data_type` TYPE_*, `dims` without the
batch axis when `max_batch_size` > 0), `dynamic_batching` (only when requests are stacked),
`instance_group` (KIND_GPU/KIND_CPU × instances) and our own `parameters`.
"""

from __future__ import annotations

import threading
import time
from collections import deque

# Triton's config data types for OIP datatypes (BYTES is TYPE_STRING there).
TRITON_TYPES = {
    "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64", "BYTES": "TYPE_STRING",
}

_PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


FOLD_AT = 4096  # records held before they are folded into the counters on the request's path


def drain(records: deque) -> list:
    """Every record in `records`, taken out (safe while other threads append: they only add at the right)."""
    items = list(records)  # one C call: no other thread runs meanwhile
    pop = records.popleft
    for _ in range(len(items)):
        pop()
    return items


class ModelStats:
    """One model version's cumulative counters (thread-safe).

    A request's and a forward pass's figures are appended as one tuple each and added to the counters when
    the counters are read (`as_json`, `inference_count`) or every FOLD_AT records: a request's own path pays an
    append (the counters' two dozen adds under a lock had cost a small net's request ~4% of its CPU).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held while folding, and by failure()
        # phase -> [count, ns]
        self._phases: dict[str, list[int]] = {p: [0, 0] for p in _PHASES}
        # executed batch size -> [executions, input ns, infer ns, output ns]
        self._batches: dict[int, list[int]] = {}
        self._inference_count = 0
        self._execution_count = 0
        self._last_inference_s = 0.0
        # (total, queue, input, infer, output ns, rows, batch size) of each answered request, not folded yet
        self._answered: deque[tuple[int, int, int, int, int, int, int]] = deque()
        self._executed: deque[tuple[int, int]] = deque()  # (batch size, infer ns) of each forward pass

    def execution(self, batch_size: int, infer_ns: int) -> None:
        """One forward pass of `batch_size` rows (a worker thread calls this, or the event loop's inline path)."""
        executed = self._executed
        executed.append((batch_size, infer_ns))
        if len(executed) > FOLD_AT:
            self._fold()

    def success(self, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int,
                rows: int, batch_size: int) -> None:
        """One request answered: its phases; `batch_size` is the executed batch it rode in."""
        answered = self._answered
        answered.append((total_ns, queue_ns, input_ns, infer_ns, output_ns, rows, batch_size))
        self._last_inference_s = time.time()
        if len(answered) > FOLD_AT:
            self._fold()

    def failure(self, total_ns: int) -> None:
        with self._lock:
            c = self._phases["fail"]
            c[0] += 1
            c[1] += total_ns

    @property
    def inference_count(self) -> int:
        """Batch rows inferred so far."""
        self._fold()
        return self._inference_count

    def _fold(self) -> None:
        """Add the records held to the counters."""
        with self._lock:
            answered, executed = drain(self._answered), drain(self._executed)
            batches = self._batches
            for size, infer_ns in executed:
                b = batches.get(size)
                if b is None:
                    b = batches[size] = [0, 0, 0, 0]
                b[0] += 1
                b[2] += infer_ns
            self._execution_count += len(executed)
            if not answered:
                return
            n = len(answered)
            total, queue, input_, infer, output, rows, sizes = zip(*answered, strict=True)
            for phase, ns in (("success", total), ("queue", queue), ("compute_input", input_),
                              ("compute_infer", infer), ("compute_output", output)):
                c = self._phases[phase]
                c[0] += n
                c[1] += sum(ns)
            self._inference_count += sum(rows)
            for size, input_ns, output_ns in zip(sizes, input_, output, strict=True):
                b = batches.get(size)
                if b is None:
                    b = batches[size] = [0, 0, 0, 0]
                b[1] += input_ns
                b[3] += output_ns

    def as_json(self, name: str, version: str, memory_usage: list[dict] | None = None) -> dict:
        """Triton's `ModelStatistics` for this model version (`memory_usage`: what its load took)."""
        self._fold()
        with self._lock:
            phases = {p: {"count": c, "ns": ns} for p, (c, ns) in self._phases.items()}
            batches = sorted(self._batches.items())
            counts = (int(self._last_inference_s * 1000), self._inference_count, self._execution_count)
        phases["cache_hit"] = {"count": 0, "ns": 0}
        phases["cache_miss"] = {"count": 0, "ns": 0}
        return {
            "name": name,
            "version": version,
            "last_inference": counts[0],
            "inference_count": counts[1],
            "execution_count": counts[2],
            "inference_stats": phases,
            "batch_stats": [
                {"batch_size": size,
                 "compute_input": {"count": n, "ns": input_ns},
                 "compute_infer": {"count": n, "ns": infer_ns},
                 "compute_output": {"count": n, "ns": output_ns}}
                for size, (n, input_ns, infer_ns, output_ns) in batches
            ],
            "memory_usage": memory_usage or [],
        }


def add_stats(into: dict, other: dict) -> dict:
    """Sum two `ModelStatistics` of the same model (replicas behind the gateway); `into` is changed."""
    into["last_inference"] = max(into.get("last_inference", 0), other.get("last_inference", 0))
    for key in ("inference_count", "execution_count"):
        into[key] = into.get(key, 0) + other.get(key, 0)
    phases = into.setdefault("inference_stats", {})
    for phase, d in (other.get("inference_stats") or {}).items():
        mine = phases.setdefault(phase, {"count": 0, "ns": 0})
        mine["count"] = mine.get("count", 0) + d.get("count", 0)
        mine["ns"] = mine.get("ns", 0) + d.get("ns", 0)
    by_size = {b["batch_size"]: b for b in into.get("batch_stats") or []}
    for b in other.get("batch_stats") or []:
        mine = by_size.setdefault(b["batch_size"], {"batch_size": b["batch_size"]})
        for phase in ("compute_input", "compute_infer", "compute_output"):
            d = b.get(phase) or {}
            m = mine.setdefault(phase, {"count": 0, "ns": 0})
            m["count"] += d.get("count", 0)
            m["ns"] += d.get("ns", 0)
    into["batch_stats"] = [by_size[k] for k in sorted(by_size)]
    into.setdefault("memory_usage", [])
    return into


def model_config(model) -> dict:
    """Triton's model configuration JSON for a loaded `dataplane.Model`."""
    ex, cfg = model.executor, model.cfg
    separable = bool(ex.probe and ex.probe.separable)
    # Triton's max_batch_size > 0 says every input and output has a leading batch axis (then left out of
    # `dims`); a net whose outputs have no batch axis is served with 0 and its full shapes.
    max_batch = model.max_batch if separable else 0

    def dims(shape) -> list[int]:
        return [int(d) for d in (shape[1:] if max_batch else shape)]

    inputs = []
    for b in model.inputs.values():
        item = list(b.item_shape)
        entry = {"name": b.name, "data_type": TRITON_TYPES.get(b.datatype, "TYPE_FP32"),
                 "format": "FORMAT_NCHW" if len(item) == 3 else "FORMAT_NONE",
                 "dims": item if max_batch else [-1, *item]}
        if b.image is not None:
            entry["allow_ragged_batch"] = False
            entry["optional"] = False
        inputs.append(entry)
    outputs = []
    for name in model.outputs:
        entry = {"name": name, "data_type": "TYPE_FP32", "dims": dims(model.output_shapes[name])}
        if model.labels and cfg.model.labels:
            entry["label_filename"] = str(cfg.path(cfg.model.labels).name)
        outputs.append(entry)
    gpu = cfg.device.kind == "gpu"
    out = {
        "name": model.name,
        "platform": "caffe",
        "backend": model.choice.name,
        "version_policy": {"specific": {"versions": [model.version]}},
        "max_batch_size": max_batch,
        "input": inputs,
        "output": outputs,
        "instance_group": [{"name": model.name, "kind": "KIND_GPU" if gpu else "KIND_CPU", "count": cfg.instances,
                            "gpus": [cfg.device.id] if gpu else []}],
        "parameters": {k: {"string_value": str(v)} for k, v in (
            ("backend_reason", model.choice.reason), ("batch_separable", separable),
            ("max_request_batch", model.max_batch), ("request_timeout_s", model.timeout),
            ("max_queue", cfg.limits.max_queue),
            ("batching_max_batch_size", ex.max_batch if ex.batching else 1),
        )},
    }
    if ex.batching:
        out["dynamic_batching"] = {
            "max_queue_delay_microseconds": int(cfg.batching.max_queue_delay_ms * 1000),
            "default_queue_policy": {"max_queue_size": cfg.limits.max_queue,
                                     "default_timeout_microseconds": int(model.timeout * 1e6)},
        }
    return out

"""The common infer request in one step: a binary request whose JSON header the model has seen before, on a
model whose forward pass runs on the event loop (executor.py's inline path).

Why: for a small net the general path (decode_request, Model._run_timed, encode_response: some forty Python
calls) costs more CPU than the forward pass. A client sends the same JSON header with every request (only the
tensor bytes change), so what the header means was worked out and checked when it was first seen
(codecs.decode_request keeps it in the model's `plans`). Here it becomes an `InlinePlan`: where the one input
lies in the body, which outputs to run, and the answer's JSON header by output shapes. Anything else (JSON
bodies, images, several inputs, classification, tracing, a busy or slow worker) gets None, and the general
path answers it; both give the same bytes, statistics and metrics (tests/server/test_inline_path.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .codecs import DTYPES, HEADER_LENGTH, PLANS_KEPT, encode_response

if TYPE_CHECKING:
    from .dataplane import Model

PlanKey = tuple[bytes, int]  # the JSON header's bytes and the binary part's length (codecs.Plans' key)


@dataclass(slots=True)
class InlinePlan:
    """What one binary request header means for one model: its one input and the answer's shape."""

    name: str  # the input
    dtype: np.dtype
    shape: tuple[int, ...]
    count: int
    offset: int  # of the input's bytes in the binary part
    cast: bool  # not FP32: converted as InputBinding.to_blob does
    run: list[str]  # the outputs the forward pass reads, no repeats
    answer: list[tuple[str, bool]]  # (name, as binary) in the answer's order, repeats as requested
    rid: str | None
    binary: bool  # every output as binary: the answer's JSON header depends on their shapes alone
    # by the output's shape (one output) or the outputs' shapes: (the answer's JSON header, its HTTP headers)
    heads: dict[tuple, tuple[bytes, dict[str, str]]] = field(default_factory=dict)


def inline_plan(model: Model, key: PlanKey) -> InlinePlan | None:
    """The header `key` as an InlinePlan, None where the general path must serve it (or has not seen it yet)."""
    known = model.plans.get(key)
    if known is None or len(known[0]) != 1 or len(model.inputs) != 1:
        return None
    (p,), outputs, binary_output, rid, _ = known
    binding = model.inputs.get(p.name)
    if binding is None or p.binary is None or p.datatype == "BYTES":  # BYTES: encoded images, decoded off the loop
        return None
    if not outputs:  # absent or empty: every output of the model (Model._run_timed)
        answer = [(n, binary_output) for n in model.outputs]
    elif any(o.classification or o.name not in model.output_shapes for o in outputs):
        return None  # classification, or an unknown output's 400: the general path
    else:
        answer = [(o.name, o.binary) for o in outputs]
    dtype = DTYPES[p.datatype]
    return InlinePlan(p.name, dtype, tuple(p.shape), p.count, p.binary[0], dtype != np.float32,
                      list(dict.fromkeys(n for n, _ in answer)), answer, rid, all(b for _, b in answer))


def answer_inline(model: Model, body: bytes | bytearray, headers: dict[str, str]) -> tuple[bytes, dict] | None:
    """(the answer's body, its HTTP headers) of a request served here, or None where the general path must."""
    ex = model.executor
    if model.state != "ready" or model.tracing is not None or ex.inline_backend is None:
        return None
    header_len = headers.get(HEADER_LENGTH)
    if header_len is None or not header_len.isdecimal():
        return None
    started = time.perf_counter_ns()
    n = int(header_len)
    json_part = body[:n]
    if len(json_part) < n or type(json_part) is not bytes:  # past the body (the general path's 400), or a large body
        return None
    key = (json_part, len(body) - n)
    plans = model.inline_plans
    plan = plans.get(key)
    if plan is None and key not in plans:
        plan = inline_plan(model, key)
        if plan is None and key not in model.plans:
            return None  # not seen yet: the general path decodes it (and keeps its plan for the next one)
        if len(plans) >= PLANS_KEPT:
            plans.clear()
        plans[key] = plan
    if plan is None:
        return None
    blob = np.frombuffer(body, plan.dtype, plan.count, n + plan.offset).reshape(plan.shape)
    if plan.cast:
        blob = blob.astype(np.float32)
    batch = plan.shape[0]
    submitted = time.perf_counter_ns()
    try:
        done = ex.run_inline({plan.name: blob}, plan.run, batch, time.monotonic() + model.timeout)
        if done is None:
            return None  # the worker is busy or the forward grew slow: the general path queues it
        result, timing = done
        ran = time.perf_counter_ns()
        if plan.binary:
            if len(plan.answer) == 1:  # the usual request: one output
                out = result[plan.run[0]]
                head = plan.heads.get(out.shape) or _head(model, plan, result, out.shape)
                answer = head[0] + out.tobytes()
            else:
                shapes = tuple(result[name].shape for name in plan.run)
                head = plan.heads.get(shapes) or _head(model, plan, result, shapes)
                answer = head[0] + b"".join([result[name].tobytes() for name, _ in plan.answer])
            http_headers = head[1]
        else:
            outs = [(n, "FP32", result[n], binary) for n, binary in plan.answer]
            answer, extra = encode_response(model.name, model.version, plan.rid, outs)
            http_headers = {**extra, **model.answer_headers}
    except BaseException:
        model.stats.failure(time.perf_counter_ns() - started)
        raise
    ended = time.perf_counter_ns()
    model.metrics.queue_seconds.observe(0.0)
    model.stats.success(ended - started, 0, submitted - started, int(timing.compute_s * 1e9), ended - ran, batch,
                        timing.batch_size)
    return answer, http_headers


def _head(model: Model, plan: InlinePlan, result: dict[str, np.ndarray], key: tuple) -> tuple[bytes, dict[str, str]]:
    """The answer's JSON header for these output shapes (`key`: their shape, or their shapes), made by the
    general encoder (so it is the same), and kept in the plan."""
    outs = [(n, "FP32", result[n], True) for n, _ in plan.answer]
    answer, extra = encode_response(model.name, model.version, plan.rid, outs)
    head = answer[: int(extra["Inference-Header-Content-Length"])]
    plan.heads[key] = head, {**extra, **model.answer_headers}
    return plan.heads[key]

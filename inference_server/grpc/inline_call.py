"""The common ModelInfer call in one step: a message laid out as one seen before (codec.laid_out), one tensor of
numbers, on a model of one input and one output whose forward pass runs on the event loop.

Why: as serving/inline_path.py for REST. The general path (decode_laid_out, Model.run_now, encode_infer_response:
some twenty Python calls) costs more CPU than a small net's forward pass, and a client sends the same message
but for its tensor's bytes. Once the general path has answered a layout on a model, an `InlineCall` keeps what
the message meant: where the tensor lies, its dtype and shape, and the answer's bytes ahead of the output's by
its shape (made once by the general encoder). Anything else returns None and the general path answers; both
give the same bytes and statistics (tests/server/grpc_protocol/test_grpc_inline_call.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..serving.codecs import DTYPES, InferRequest
from .codec import Layout, encode_infer_response

if TYPE_CHECKING:
    from ..serving.dataplane import Model, Outputs


@dataclass(slots=True)
class InlineCall:
    """What messages of one layout mean for one model."""

    model: Model
    input: str
    dtype: np.dtype
    shape: tuple[int, ...]
    count: int
    offset: int  # of the tensor's bytes in the message
    output: str
    request_id: str | None
    # by the output's shape: the serialized answer up to the output's bytes (they come last)
    heads: dict[tuple[int, ...], bytes] = field(default_factory=dict)

    def answer(self, data: bytes | memoryview, deadline: float | None) -> bytes | None:
        """The serialized answer to `data`, or None where the general path must serve it (nothing counted)."""
        model = self.model
        if model.state != "ready" or model.tracing is not None:
            return None
        started = time.perf_counter_ns()
        try:
            blob = np.frombuffer(data, self.dtype, self.count, self.offset).reshape(self.shape)
            if blob.dtype != np.float32:
                blob = blob.astype(np.float32)
            elif not blob.flags.aligned:  # where the tensor sits in the message: backends need aligned data
                blob = blob.copy()
            batch = self.shape[0]
            submitted = time.perf_counter_ns()
            # a deadline already passed is run_inline's DeadlineExceeded (or, the worker busy, the general path's)
            done = model.executor.run_inline({self.input: blob}, [self.output], batch,
                                             model.bounded_deadline(deadline))
            if done is None:
                return None
            result, timing = done
            out = result[self.output]
            model.metrics.queue_seconds.observe(timing.queue_s)
            head = self.heads.get(out.shape) or self._head(out)
            answer = head + out.tobytes()
        except BaseException:
            model.stats.failure(time.perf_counter_ns() - started)
            raise
        model.stats.success(time.perf_counter_ns() - started, int(timing.queue_s * 1e9), submitted - started,
                            int(timing.compute_s * 1e9), 0, batch, timing.batch_size)
        return answer

    def _head(self, out: np.ndarray) -> bytes:
        """The general encoder's answer for an output of this shape, less the output's bytes, kept."""
        whole = encode_infer_response(self.model.name, self.model.version, self.request_id,
                                      [(self.output, "FP32", out, True)], True)
        head = self.heads[out.shape] = whole[: len(whole) - out.nbytes]
        return head


def learn_call(lay: Layout, model: Model, req: InferRequest, outs: Outputs) -> None:
    """After the general path answered `req` (laid out as `lay`) on `model`: keep what such a message means,
    where the inline call can answer it."""
    if (len(req.inputs) != 1 or req.outputs or len(lay.heads) != 1 or len(model.inputs) != 1
            or len(model.outputs) != 1 or len(outs) != 1 or outs[0][1] != "FP32"):
        return
    t = req.inputs[0]
    name, datatype, shape, count = lay.known[0]
    if datatype == "BYTES" or t.name != name or name not in model.inputs or datatype not in DTYPES:
        return
    pos, head = lay.heads[0]
    lay.call = InlineCall(model, name, np.dtype(DTYPES[datatype]), tuple(shape), count, pos + len(head),
                          model.outputs[0], lay.id or None)

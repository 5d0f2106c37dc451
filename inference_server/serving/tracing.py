"""The server's spans of one infer request, made after its answer from the phase times the statistics
already take (stats.py): no span is open while the request runs, so the hot path pays nothing more
than creating a `RequestTrace` when tracing is on, and one `is None` test when it is off.

One trace per request: the span `POST /v2/models/{m}/infer` (REST) or `inference.GRPCInferenceService/
ModelInfer` (gRPC), kind SERVER, whose parent is the `traceparent` the client or the gateway sent (a new
trace without one), and its children, one per phase:

- `decode`: the body parsed and the input blobs built (images decoded);
- `queue`: waiting for a worker (and for a batch to fill);
- `forward`: the forward pass (the whole batch's, which other requests may share);
- `encode`: the answer written.

Attributes: `caffeserve.model`, `caffeserve.model_version`, `caffeserve.protocol` (rest, grpc),
`caffeserve.backend` (pycaffe, onnxruntime), `caffeserve.batch_size` (the executed batch this request rode
in), `caffeserve.request_rows` (its own rows), the status code, and the request id of the access log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping

from caffe_http.tracing import Tracer, trace_headers

from ..errors import InferenceError

SERVICE_NAME = "caffeserve-server"
GRPC_SPAN = "inference.GRPCInferenceService/ModelInfer"


def status_of(error: BaseException | None) -> tuple[int, str]:
    """(HTTP-like status, message) of how a request ended: 200, an InferenceError's code, 499 when the
    client went away, 500 for anything else."""
    if error is None:
        return 200, ""
    if isinstance(error, InferenceError):
        return error.status_code, error.message
    if isinstance(error, asyncio.CancelledError):
        return 499, "the client went away"
    return 500, f"{type(error).__name__}: {error}"


class RequestTrace:
    """One request's times, turned into spans by `end`."""

    __slots__ = ("tracer", "model", "protocol", "carrier", "start_ns", "run_ns", "phases")

    def __init__(self, tracer: Tracer, model, protocol: str, carrier: Mapping[str, str], start_ns: int):
        self.tracer, self.model, self.protocol, self.carrier = tracer, model, protocol, carrier
        self.start_ns = start_ns  # time.time_ns() when the request arrived
        self.run_ns = 0  # time.time_ns() when the data plane took the decoded request (Model._run_timed)
        self.phases: tuple | None = None  # Model._run_timed's phases, once the model answered

    def ran(self, started_perf_ns: int, phases: tuple) -> None:
        """The model answered: its phases, in ns since `started_perf_ns` (a perf_counter_ns())."""
        self.run_ns = started_perf_ns + time.time_ns() - time.perf_counter_ns()
        self.phases = phases

    def end(self, error: BaseException | None = None) -> None:
        """Make and hand over the spans (the SDK's exporter thread sends them)."""
        end_ns = time.time_ns()
        code, message = status_of(error)
        m, tracer = self.model, self.tracer
        rest = self.protocol == "rest"
        attrs: dict = {"caffeserve.model": m.name, "caffeserve.model_version": m.version,
                       "caffeserve.protocol": self.protocol}
        if m.choice is not None:
            attrs["caffeserve.backend"] = m.choice.name
        if rest:
            attrs.update({"http.request.method": "POST", "http.response.status_code": code})
        else:
            attrs.update({"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
                          "rpc.method": "ModelInfer", "caffeserve.status_code": code})
        if rid := self.carrier.get("x-request-id"):
            attrs["caffeserve.request_id"] = rid
        phases = self.phases
        if phases is not None:
            attrs["caffeserve.batch_size"] = phases[5]
            attrs["caffeserve.request_rows"] = phases[4]
        name = f"POST /v2/models/{m.name}/infer" if rest else GRPC_SPAN
        root = tracer.tracer.start_span(name, context=tracer.extract(self.carrier), kind=tracer.server_kind,
                                        attributes=attrs, start_time=self.start_ns)
        if code >= 500:
            root.set_status(tracer.error(message))
        if phases is not None and root.is_recording():
            total, queue_ns, input_ns, infer_ns = phases[:4]
            submitted = self.run_ns + input_ns
            forwarded = submitted + queue_ns
            parent = tracer.in_context(root)
            spans = (("decode", self.start_ns, submitted, None),
                     ("queue", submitted, forwarded, None),
                     ("forward", forwarded, forwarded + infer_ns,
                      {"caffeserve.batch_size": phases[5], "caffeserve.backend": attrs.get("caffeserve.backend", "")}),
                     ("encode", self.run_ns + total, end_ns, None))
            for span_name, start, stop, span_attrs in spans:
                tracer.tracer.start_span(span_name, context=parent, attributes=span_attrs,
                                         start_time=start).end(end_time=max(start, stop))
        root.end(end_time=end_ns)


class ServerTracing:
    """The model server's tracer: a `RequestTrace` per infer request."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer

    def rest(self, model, headers: Mapping[str, str]) -> RequestTrace:
        """A REST request arriving now; `headers` (lower-case names) carry its trace context."""
        return RequestTrace(self.tracer, model, "rest", headers, time.time_ns())

    def grpc(self, model, metadata: Iterable[tuple[str, str]] | None, arrived_monotonic: float) -> RequestTrace:
        """A gRPC call that arrived at `arrived_monotonic` (time.monotonic()); its metadata carries the context."""
        md = list(metadata or ())
        carrier = trace_headers(md)
        rid = next((v for k, v in md if k == "x-request-id"), None)
        if rid:
            carrier["x-request-id"] = rid
        start = time.time_ns() - int((time.monotonic() - arrived_monotonic) * 1e9)
        return RequestTrace(self.tracer, model, "grpc", carrier, start)

    def shutdown(self) -> None:
        self.tracer.shutdown()

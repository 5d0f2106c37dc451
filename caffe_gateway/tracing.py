"""The gateway's spans: one trace per forwarded request, continued in the pod that runs it.

With tracing on (an OTLP endpoint: `--otlp-endpoint` or OTEL_EXPORTER_OTLP_ENDPOINT), a request under
`/v2/models/{m}` (REST) or a forwarded RPC (gRPC) gets a span kind SERVER whose parent is the client's
`traceparent` (a new trace without one), and two kinds of children:

- `queue`: from arrival until the first attempt is sent (choosing the variant, waiting for a free endpoint);
- `forward` (kind CLIENT), one per attempt: the call to one server. Its context replaces the client's
  `traceparent` (and `tracestate`) on that call, as a header (REST) or as metadata (gRPC), so the server's
  spans are its children: one linked trace across the gateway and the pod.

How, without touching the forwarding loop (forward.py): a `TracedTransport` wraps the request's transport
for that one request; `send` is where an attempt starts, which is all the spans need. Off, the proxies
use their transport as it is and nothing here is imported beyond this module.

Attributes: `caffeserve.model`, `caffeserve.protocol`, the status (HTTP code, or the gRPC code name),
and on each `forward` the endpoint (`server.address`), the variant, the attempt number and, over REST,
the backend the server answered with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Any

from caffe_http.tracing import TRACEPARENT, TRACESTATE, Tracer, endpoint, start, trace_headers

SERVICE_NAME = "caffeserve-gateway"
_TRACE_KEYS = (TRACEPARENT, TRACESTATE)


def with_trace_context(pairs: Iterable[tuple[str, str]], context: Mapping[str, str]) -> list[tuple[str, str]]:
    """Header or metadata pairs with their trace context replaced by `context`."""
    return [(k, v) for k, v in pairs if k not in _TRACE_KEYS] + list(context.items())


class TracedTransport:
    """One request's transport (proxy.HTTPTransport, grpc_proxy.GRPCTransport) with its spans around it."""

    def __init__(self, tracing: GatewayTracing, inner, name: str, carrier: Mapping[str, str], model: str,
                 protocol: str, arrived: float):
        self.inner = inner
        self.needs_grpc = inner.needs_grpc
        self.cancelled_code = inner.cancelled_code
        self.tracer = tracing.tracer
        self.attempts = 0
        start = time.time_ns() - int((asyncio.get_running_loop().time() - arrived) * 1e9)
        self.root = self.tracer.tracer.start_span(
            name, context=self.tracer.extract(carrier), kind=self.tracer.server_kind, start_time=start,
            attributes={"caffeserve.model": model, "caffeserve.protocol": protocol})
        self.queue_start = start

    # --- forward.Transport
    async def send(self, route, ep, request, deadline: float):
        tracer, parent = self.tracer.tracer, self.tracer.in_context(self.root)
        if self.attempts == 0 and self.root.is_recording():
            tracer.start_span("queue", context=parent, start_time=self.queue_start).end()
        self.attempts += 1
        span = tracer.start_span("forward", context=parent, kind=self.tracer.client_kind, attributes={
            "server.address": ep.address, "caffeserve.variant": route.variant, "caffeserve.attempt": self.attempts})
        try:
            answer = await self.inner.send(route, ep, self.inner.with_trace_context(request, self.tracer.inject(span)),
                                           deadline)
        except BaseException as e:
            span.set_status(self.tracer.error(str(e) or type(e).__name__))
            span.end()
            raise
        code = self.inner.code(answer)
        span.set_attribute("caffeserve.status_code", str(code))
        if (backend := _backend(answer)) is not None:
            span.set_attribute("caffeserve.backend", backend)
        span.end()
        return answer

    def failed(self, answer) -> bool:
        return self.inner.failed(answer)

    def code(self, answer):
        return self.inner.code(answer)

    def refused_code(self, kind: str):
        return self.inner.refused_code(kind)

    # --- the request's end
    def end(self, code: Any, error: bool) -> None:
        """The request was answered with `code`; `error`: a failure of ours or a server's (5xx, INTERNAL...)."""
        root = self.root
        if self.attempts == 0 and root.is_recording():  # refused before any attempt: it only queued
            self.tracer.tracer.start_span("queue", context=self.tracer.in_context(root),
                                          start_time=self.queue_start).end()
        root.set_attribute("caffeserve.status_code", str(code))
        if isinstance(code, int):
            root.set_attribute("http.response.status_code", code)
        if error:
            root.set_status(self.tracer.error(str(code)))
        root.end()


def _backend(answer) -> str | None:
    """The backend a REST answer names (X-Caffeserve-Backend); None over gRPC."""
    for name, value in getattr(answer, "headers", None) or ():
        if name == "x-caffeserve-backend":
            return value
    return None


class GatewayTracing:
    """The gateway's tracer: a `TracedTransport` per forwarded request."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer

    def rest(self, inner, method: str, path: str, headers: Mapping[str, str], model: str,
             arrived: float) -> TracedTransport:
        return TracedTransport(self, inner, f"{method} {path}", headers, model, "rest", arrived)

    def grpc(self, inner, method: str, metadata, model: str, arrived: float) -> TracedTransport:
        return TracedTransport(self, inner, f"inference.GRPCInferenceService/{method}",
                               trace_headers(metadata or ()), model, "grpc", arrived)

    def shutdown(self) -> None:
        self.tracer.shutdown()


def start_tracing(flag: str | None, sample_ratio: float) -> GatewayTracing | None:
    """The gateway's tracer when an OTLP endpoint is set (`flag`, else the environment); None when tracing is
    off. The SDK is imported only then (TracingUnavailable without the `tracing` extra)."""
    url = endpoint(flag)
    if url is None:
        return None
    return GatewayTracing(start(url, SERVICE_NAME, sample_ratio))

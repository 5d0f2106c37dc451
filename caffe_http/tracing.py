"""OpenTelemetry set-up shared by the model server and the gateway: off unless an OTLP endpoint is given.

Why here: both programs read the same W3C `traceparent` and export the same way, and this is the layer
both build on. Nothing of OpenTelemetry is imported until `start()` runs, which only happens when tracing
is on: the server's startup imports no new distribution (tests/packaging/test_gpu_wheels.py), and a
request pays one `is None` test.

Where the endpoint comes from, first found wins: the program's own setting (`--otlp-endpoint`, the server
config's `tracing.endpoint`, the CR's `spec.runtime.tracing.endpoint`), then the standard environment
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full URL) and `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL, as ours:
`/v1/traces` is appended). `OTEL_SDK_DISABLED=true` turns tracing off whatever is set. Spans go over
OTLP/HTTP in protobuf (the OpenTelemetry Collector's port 4318), in batches from the SDK's exporter thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACES_PATH = "/v1/traces"
EXTRA_HINT = "tracing needs the `tracing` extra: pip install 'caffe-serving[tracing]'"


class TracingUnavailable(RuntimeError):
    """Tracing was asked for and the OpenTelemetry SDK is not installed."""


def traces_url(base: str) -> str:
    """An OTLP/HTTP base URL (http://collector:4318) → where traces are posted (…/v1/traces)."""
    base = base.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def endpoint(configured: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The traces URL to export to, or None when tracing is off."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if configured:
        return traces_url(configured)
    if url := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return url
    if url := env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return traces_url(url)
    return None


def trace_headers(pairs: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """The W3C trace-context headers among (name, value) pairs (gRPC metadata, header lists)."""
    return {k: v for k, v in pairs if k == TRACEPARENT or k == TRACESTATE}


@dataclass
class Tracer:
    """One process's tracer, W3C propagator and provider (to flush at exit), and the few API names the
    programs' span code uses (imported here, once, so that no other module imports OpenTelemetry)."""

    tracer: Any
    propagator: Any
    provider: Any
    url: str
    server_kind: Any  # SpanKind.SERVER
    client_kind: Any  # SpanKind.CLIENT
    in_context: Any  # set_span_in_context(span) → the context whose parent is `span`
    error: Any  # error(message) → an ERROR Status

    def extract(self, carrier: Mapping[str, str]) -> Any:
        """The parent context a `traceparent` (and `tracestate`) header carries; an empty one if none."""
        return self.propagator.extract(carrier)

    def inject(self, span: Any) -> dict[str, str]:
        """The `traceparent` (and `tracestate`) headers that make `span` the parent downstream."""
        out: dict[str, str] = {}
        self.propagator.inject(out, context=self.in_context(span))
        return out

    def shutdown(self) -> None:
        """Export the spans still queued (at exit)."""
        try:
            self.provider.shutdown()
        except Exception as e:  # an unreachable collector must not turn a clean exit into a crash
            log.warning("tracing: could not flush the last spans to %s: %s", self.url, e)


def start(url: str, service_name: str, sample_ratio: float = 1.0, environ: Mapping[str, str] | None = None) -> Tracer:
    """Import the SDK and the OTLP/HTTP exporter and make a tracer exporting to `url`.

    Sampling: the parent's decision when a request carries one, else `sample_ratio` of new traces;
    `OTEL_TRACES_SAMPLER` (the SDK's own setting) replaces that. `OTEL_SERVICE_NAME` replaces
    `service_name`; `OTEL_RESOURCE_ATTRIBUTES` adds attributes (the pod's name, say)."""
    env = os.environ if environ is None else environ
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as e:
        raise TracingUnavailable(f"{EXTRA_HINT} ({e})") from None
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    sampler = None if env.get("OTEL_TRACES_SAMPLER") else ParentBased(TraceIdRatioBased(sample_ratio))
    provider = TracerProvider(sampler=sampler, resource=Resource.create(attributes), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    log.info("tracing: spans of %s go to %s (OTLP/HTTP)", service_name, url)
    return Tracer(provider.get_tracer("caffe-serving"), TraceContextTextMapPropagator(), provider, url,
                  SpanKind.SERVER, SpanKind.CLIENT, set_span_in_context,
                  lambda message: Status(StatusCode.ERROR, message))

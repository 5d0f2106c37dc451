"""A real OTLP/HTTP receiver on loopback for tests and benchmarks: what an OpenTelemetry Collector's
`otlphttp` receiver does with traces, reduced to keeping them.

Why not the SDK's in-memory exporter: it would test our spans inside one process, not what leaves the
server and the gateway over the wire (the exporter, its protobuf, the propagated `traceparent`). The
receiver decodes each `POST /v1/traces` body with OpenTelemetry's own protobuf messages
(opentelemetry-proto's `ExportTraceServiceRequest`) and answers as a collector does.
"""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Span:
    """One received span, ids as lower-case hex (parent "" for a root)."""

    service: str
    name: str
    kind: str  # SERVER, CLIENT, INTERNAL, ...
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    status: str = "UNSET"


def _value(v) -> Any:
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


def decode_spans(body: bytes) -> list[Span]:
    """The spans of one OTLP/HTTP protobuf export request."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto, Status

    req = ExportTraceServiceRequest.FromString(body)
    out = []
    for rs in req.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(Span(
                    service=str(resource.get("service.name", "")), name=s.name,
                    kind=SpanProto.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(),
                    start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    attributes={a.key: _value(a.value) for a in s.attributes},
                    status=Status.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_")))
    return out


class OTLPReceiver:
    """`POST /v1/traces` on 127.0.0.1 (any free port); `endpoint` is the base URL to configure. Use as a
    context manager. `decode=False` (benchmarks) only counts what arrives, as a collector on another
    machine would cost the server nothing."""

    def __init__(self, decode: bool = True):
        self.spans: list[Span] = []
        self.bad: list[str] = []  # requests it could not decode (a test fails on any)
        self.posts = 0  # export requests received
        self.bytes = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                    receiver.bad.append(f"{self.path} {self.headers.get('Content-Type')}")
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.posts += 1
                receiver.bytes += len(body)
                try:
                    spans = decode_spans(body) if decode else []
                except Exception as e:  # a body that does not parse is the test's failure, not a crash here
                    receiver.bad.append(repr(e))
                    self.send_response(400)
                    self.end_headers()
                    return
                with receiver._lock:
                    receiver.spans.extend(spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")  # an empty ExportTraceServiceResponse: all accepted
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True)

    def __enter__(self) -> OTLPReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, predicate, timeout: float = 20.0) -> list[Span]:
        """The spans once `predicate(spans)` holds; AssertionError with what arrived after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans received in {timeout:g} s: {[(s.service, s.name) for s in spans]}")
            time.sleep(0.05)

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()

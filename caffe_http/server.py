"""A small HTTP/1.1 server on asyncio + httptools, shared by the inference server, the gateway and local mode.

Why not uvicorn: it has no deadline for receiving a whole request (its keep-alive timer resets on
every byte), so one slow client per connection ties a worker up; and the ASGI layers cost more per
request than the model's own forward pass for small nets. This server gives each request a header
deadline and a body deadline, refuses bodies over the limit before reading them (413), answers
`Expect: 100-continue`, keeps connections alive, and on shutdown stops accepting, finishes the
requests in flight and closes within a bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Awaitable, Callable

import httptools

from .lifecycle import stop_event

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    client: str = ""
    # loop.time() when the headers were complete: the start of the request's deadline
    arrived: float = 0.0


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]
# Called when the server itself refuses a request (too large, too slow, unparsable).
ErrorBody = Callable[[str], bytes]


def _json_error(message: str) -> bytes:
    import orjson

    return orjson.dumps({"error": message})


_REASONS = {s.value: s.phrase for s in HTTPStatus}


def encode_response(resp: Response, keep_alive: bool, with_body: bool = True) -> bytes:
    """The response bytes; `with_body` False for HEAD (same headers, no body, as HTTP/1.1 requires)."""
    head = [
        f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Unknown')}",
        f"content-length: {len(resp.body)}",
    ]
    if resp.content_type:
        head.append(f"content-type: {resp.content_type}")
    for k, v in resp.headers.items():
        head.append(f"{k}: {v}")
    if not keep_alive:
        head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (resp.body if with_body else b"")


@dataclass
class ServerLimits:
    max_body_bytes: int = 64 * 1024 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 15.0
    max_header_bytes: int = 64 * 1024


MAX_PIPELINED = 16  # requests read ahead on one connection before it stops reading


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, hands complete ones to the handler in order."""

    def __init__(self, server: "HTTPServer"):
        self.server = server
        self.loop = server.loop
        self.limits = server.limits
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.pending: deque[Request] = deque()
        self.worker: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.refused = False  # a refusal is queued behind earlier pipelined requests: read no more
        self.reading_paused = False  # too many pipelined requests waiting: read no more until they drain
        self.writable: asyncio.Event | None = None  # set while the transport's write buffer has room
        self.timer_kind: str | None = None
        self.arrived = 0.0
        self._reset_message()

    # --- connection lifecycle
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        self.server.connections.add(self)
        self._arm(self.limits.keepalive_timeout_s, None)

    def connection_lost(self, exc):
        self.closing = True
        self._disarm()
        if self.writable is not None:
            self.writable.set()  # a worker waiting to write sees the connection is gone
        self.server.connections.discard(self)
        # The parser refers back to this protocol: break the cycle so that the connection and the
        # body it last read are freed now, not at the next full garbage collection.
        self.parser = None
        self.body_parts = []
        if self.worker is not None and self.server.cancel_on_disconnect:
            # nobody will read the answer: stop waiting for it (queued inference work is dropped)
            self.worker.cancel()

    def pause_writing(self):
        if self.writable is None:
            self.writable = asyncio.Event()
        self.writable.clear()

    def resume_writing(self):
        if self.writable is not None:
            self.writable.set()

    def data_received(self, data: bytes):
        if self.closing or self.refused:
            return
        if not self.in_message and self.timer_kind != "header":
            # first bytes of a new request: the header deadline starts now
            self._arm(self.limits.header_timeout_s, "header")
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported", raise_=False)
        except httptools.HttpParserError as e:  # also a callback's _Refused, which httptools wraps
            self._refuse(400, f"malformed HTTP request: {e}", raise_=False)
        except _Refused:
            pass

    # --- parser callbacks
    def _reset_message(self):
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body_parts: list[bytes] = []
        self.body_len = 0
        self.header_bytes = 0
        self.in_message = False

    def on_message_begin(self):
        self._reset_message()
        self.in_message = True
        if self.timer_kind != "header":  # a pipelined request that began in the previous one's last packet
            self._arm(self.limits.header_timeout_s, "header")

    def on_url(self, url: bytes):
        self.url += url

    def on_header(self, name: bytes, value: bytes):
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > self.limits.max_header_bytes:
            self._refuse(431, "request headers too large")
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self):
        clen = self.headers.get("content-length")
        if clen is not None and clen.isdigit() and int(clen) > self.limits.max_body_bytes:
            self._refuse(413, f"request body of {clen} bytes exceeds the limit of {self.limits.max_body_bytes} bytes")
        if self.headers.get("expect", "").lower() == "100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.arrived = self.loop.time()
        self._arm(self.limits.body_timeout_s, "body")

    def on_body(self, chunk: bytes):
        self.body_len += len(chunk)
        if self.body_len > self.limits.max_body_bytes:
            self._refuse(413, f"request body exceeds the limit of {self.limits.max_body_bytes} bytes")
        self.body_parts.append(chunk)

    def on_message_complete(self):
        self._disarm()
        url = httptools.parse_url(self.url)
        body = self.body_parts[0] if len(self.body_parts) == 1 else b"".join(self.body_parts)
        req = Request(
            method=self.parser.get_method().decode("latin-1"),
            path=url.path.decode("latin-1"),
            query=(url.query or b"").decode("latin-1"),
            headers=self.headers,
            body=body,
            client=self.client,
            arrived=self.arrived,
        )
        self.pending.append((req, self.parser.should_keep_alive()))
        self.in_message = False
        self.timer_kind = None
        if len(self.pending) >= MAX_PIPELINED and not self.reading_paused:
            # a client that pipelines without reading answers must not grow our memory
            self.transport.pause_reading()
            self.reading_paused = True
        if self.worker is None:
            self.worker = self.loop.create_task(self._serve_pending())

    # --- request handling
    async def _serve_pending(self):
        try:
            while self.pending and not self.closing:
                req, keep_alive = self.pending.popleft()
                if self.reading_paused and not self.refused and len(self.pending) < MAX_PIPELINED // 2:
                    self.reading_paused = False
                    self.transport.resume_reading()
                if self.writable is not None:
                    await self.writable.wait()  # the client is not reading: answer no more until it does
                if isinstance(req, Response):  # a refusal queued by _refuse
                    resp = req
                else:
                    self.server.in_flight += 1
                    try:
                        resp = await self.server.handler(req)
                    except Exception:  # the handler maps its own errors; this is a bug guard
                        log.exception("unhandled error serving %s %s", req.method, req.path)
                        resp = Response(500, self.server.error_body("internal server error"))
                    finally:
                        self.server.in_flight -= 1
                keep_alive = keep_alive and not self.server.stopping
                if self.closing:
                    return
                head_only = not isinstance(req, Response) and req.method == "HEAD"
                self.transport.write(encode_response(resp, keep_alive, with_body=not head_only))
                if not keep_alive:
                    self._close()
                    return
        finally:
            self.worker = None
            self.server._maybe_drained()
        if not self.closing and not self.in_message:
            self._arm(self.limits.keepalive_timeout_s, None)

    # --- deadlines and refusals
    def _arm(self, seconds: float, kind: str | None):
        self._disarm()
        self.timer_kind = kind
        self.timer = self.loop.call_later(seconds, self._on_timeout, kind)

    def _disarm(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timeout(self, kind: str | None):
        self.timer = None
        if kind is None:
            if self.worker is None and not self.pending:
                self._close()  # idle keep-alive connection
            return
        what = "headers" if kind == "header" else "body"
        limit = self.limits.header_timeout_s if kind == "header" else self.limits.body_timeout_s
        self._refuse(408, f"request {what} not received within {limit:g} s", raise_=False)

    def _refuse(self, status: int, message: str, raise_: bool = True):
        """Answer an error the server decides on its own, then close the connection."""
        if not self.closing and not self.refused and self.transport is not None:
            if self.server.on_refuse is not None:  # the access log's line for answers no handler saw
                self.server.on_refuse(self.client, *self._request_line(), status, message)
            resp = Response(status, self.server.error_body(message))
            if self.worker is None:
                self.transport.write(encode_response(resp, False))
                self._close()
            else:  # earlier pipelined requests are answered first, in order
                self.refused = True
                self._disarm()
                self.transport.pause_reading()
                self.pending.append((resp, False))
        if raise_:
            raise _Refused()

    def _request_line(self) -> tuple[str, str]:
        """(method, path) of the request being read, as far as they are known."""
        try:
            method = self.parser.get_method().decode("latin-1") if self.parser is not None else ""
        except Exception:  # not parsed yet
            method = ""
        return method, self.url.split(b"?", 1)[0].decode("latin-1", "replace")

    def _close(self):
        self.closing = True
        self._disarm()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def close_if_idle(self):
        if self.worker is None and not self.pending and not self.in_message:
            self._close()


class _Refused(Exception):
    pass


class HTTPServer:
    """Serve `handler` on host:port until `stop()`."""

    def __init__(self, handler: Handler, limits: ServerLimits | None = None, error_body: ErrorBody = _json_error,
                 cancel_on_disconnect: bool = False):
        self.handler = handler
        # cancel a request's handler when its client disconnects (the handler must tolerate
        # CancelledError at any await: the inference server's does; a proxy must not reuse a half-read upstream)
        self.cancel_on_disconnect = cancel_on_disconnect
        self.limits = limits or ServerLimits()
        self.error_body = error_body
        # on_refuse(client, method, path, status, message): called for each answer the transport
        # itself gives (413, 408, 431, malformed HTTP), for the access log
        self.on_refuse: Callable[[str, str, str, int, str], None] | None = None
        self.connections: set[_Connection] = set()
        self.in_flight = 0
        self.stopping = False
        self._server: asyncio.base_events.Server | None = None
        self._drained: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self, host: str, port: int, sock=None) -> int:
        """Start listening; returns the bound port (useful with port 0)."""
        self.loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        if sock is not None:
            self._server = await self.loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024)
        else:
            self._server = await self.loop.create_server(
                lambda: _Connection(self), host, port, backlog=1024, reuse_address=True
            )
        return self._server.sockets[0].getsockname()[1]

    def _maybe_drained(self):
        if self.stopping and self.in_flight == 0 and self._drained is not None:
            self._drained.set()

    async def stop(self, grace_s: float = 30.0):
        """Stop accepting, let in-flight requests finish (up to `grace_s`), close every connection."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            c.close_if_idle()
        self._maybe_drained()
        if self.in_flight:
            try:
                await asyncio.wait_for(self._drained.wait(), grace_s)
            except asyncio.TimeoutError:
                log.warning("shutdown: %d requests still in flight after %g s", self.in_flight, grace_s)
        for c in list(self.connections):
            c._close()


async def serve_until_signalled(server: HTTPServer, host: str, port: int, on_listening=None,
                                grace_s: float = 30.0, before_stop=None) -> None:
    """Run until SIGTERM/SIGINT, then drain and stop. `on_listening(port)` is called once bound."""
    bound = await server.start(host, port)
    if on_listening is not None:
        on_listening(bound)
    await stop_event().wait()
    if before_stop is not None:
        before_stop()
    await server.stop(grace_s)

"""A small HTTP/1.1 server on asyncio + httptools, shared by the inference server, the gateway and local mode.

Why not uvicorn: it has no deadline for receiving a whole request (its keep-alive timer resets on
every byte), so one slow client per connection ties a worker up; and the ASGI layers cost more per
request than the model's own forward pass for small nets. This server gives each request a header
deadline and a body deadline, refuses bodies over the limit before reading them (413), answers
`Expect: 100-continue`, keeps connections alive, and on shutdown stops accepting, finishes the
requests in flight and closes within a bound. A request whose head the connection saw before (the same
header bytes, as clients send them, an X-Request-Id aside) skips the parser (`_Connection._learn`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING

import httptools

from .eager import start_eagerly
from .lifecycle import stop_event

if TYPE_CHECKING:
    import socket
    import ssl as ssl_

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names
    body: bytes | bytearray  # a bytearray for bodies over 1 MiB (grown in place as it arrives)
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

# A 503 with this header says the server did not start the request because of its own state
# (loading, failed, shutting down): a proxy may send it to another server, where it runs once.
NOT_RUN_HEADER = "Caffe-Not-Run"
# Called when the server itself refuses a request (too large, too slow, unparsable).
ErrorBody = Callable[[str], bytes]


def _json_error(message: str) -> bytes:
    import orjson

    return orjson.dumps({"error": message})


_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus}


def encode_response(resp: Response, keep_alive: bool, with_body: bool = True) -> bytes:
    """The response bytes; `with_body` False for HEAD (same headers, no body, as HTTP/1.1 requires)."""
    status = _STATUS_LINES.get(resp.status) or f"HTTP/1.1 {resp.status} Unknown\r\n"
    head = f"{status}content-length: {len(resp.body)}\r\n"
    if resp.content_type:
        head += f"content-type: {resp.content_type}\r\n"
    for k, v in resp.headers.items():
        head += f"{k}: {v}\r\n"
    if not keep_alive:
        head += "connection: close\r\n"
    raw = (head + "\r\n").encode("latin-1")
    return raw + resp.body if with_body and resp.body else raw


@dataclass
class ServerLimits:
    max_body_bytes: int = 64 * 1024 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 15.0
    max_header_bytes: int = 64 * 1024
    # Request bodies held at once (being received, decoded or served), summed over every connection;
    # past it a request is answered 503 + Retry-After before its body is read. 0: no limit.
    max_inflight_bytes: int = 0
    # A refused body (413, or 503 over max_inflight_bytes) that the client sends anyway is read and
    # dropped up to this many bytes (and within body_timeout_s) before the connection closes, so
    # that a client which sends the whole body before reading (Python's http.client) sees the answer
    # instead of a connection reset. A declared Content-Length above it is not drained at all.
    max_drain_bytes: int = 64 * 1024 * 1024
    drain_idle_s: float = 2.0  # ... and the drain ends when no byte of it arrives for this long
    retry_after_s: int = 1  # Retry-After on the 503 over max_inflight_bytes


_GROW_IN_PLACE_FROM = 1024 * 1024
_METHODS = {m.encode(): m for m in ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH")}
MAX_PIPELINED = 16  # requests read ahead on one connection before it stops reading


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, hands complete ones to the handler in order."""

    # the message being read (_reset_message)
    url: bytes
    headers: dict[str, str]
    body_parts: list[bytes]
    body_buf: bytearray | None
    body_len: int
    header_bytes: int
    in_message: bool

    def __init__(self, server: HTTPServer):
        self.server = server
        assert server.loop is not None  # connections are made only after start()
        self.loop: asyncio.AbstractEventLoop = server.loop
        self.limits = server.limits
        # None only once the connection is lost (connection_lost breaks the reference cycle)
        self.parser: httptools.HttpRequestParser = httptools.HttpRequestParser(self)
        # None only until connection_made, which runs before any other callback
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client = ""
        # (request, keep-alive, bytes reserved) in arrival order; a refusal queued in order is a Response
        self.pending: deque[tuple[Request | Response, bool, int]] = deque()
        self.worker: asyncio.Task[None] | _Eager | None = None
        # One timer per connection, not one per deadline (_arm): it fires at `timer_at`, at the latest
        # the current `deadline`, and then acts on the deadline set since, or sleeps again until it.
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.deadline: float | None = None  # loop.time() by which `timer_kind`'s wait ends; None: no deadline
        self.tick = max(0.05, min(server.limits.header_timeout_s, server.limits.body_timeout_s,
                                  server.limits.keepalive_timeout_s))
        self.closing = False
        self.refused = False  # a refusal is queued behind earlier pipelined requests: read no more
        self.reading_paused = False  # too many pipelined requests waiting: read no more until they drain
        self.writable: asyncio.Event | None = None  # set while the transport's write buffer has room
        self.timer_kind: str | None = None
        self.arrived = 0.0
        self.last_read = 0.0
        self.discarding = False  # the current body was refused: read it and drop it (see max_drain_bytes)
        self.discarded = 0
        self.drain_until = 0.0
        self.answer_written = False  # the refusal of the body being discarded has been written
        self.reserved = 0  # bytes of the current message counted in the server's in-flight bytes
        self.seen: _SeenHead | None = None  # the head of the last whole request data_received had (_learn)
        self.messages = 0  # requests parsed
        self.learning = False  # the parser reads a request from its first byte: what it means may be kept
        self.learned: tuple[str, str, str, dict[str, str]] | None = None  # that request: method, path, query, headers
        self._reset_message()

    # --- connection lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP connection's: an asyncio.Transport
        peer = transport.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        self.server.connections.add(self)
        self.last_read = self.loop.time()  # a connection made counts as activity: its first bytes may follow
        self._arm(self.limits.keepalive_timeout_s, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_timer()
        if self.writable is not None:
            self.writable.set()  # a worker waiting to write sees the connection is gone
        self.server.connections.discard(self)
        self._release(self.reserved)
        self.reserved = 0
        for item in self.pending:
            self._release(item[2])
        # The parser refers back to this protocol: break the cycle so that the connection and the
        # body it last read are freed now, not at the next full garbage collection.
        self.parser = None  # type: ignore[assignment]
        self.body_parts = []
        self.body_buf = None
        if self.worker is not None and self.server.cancel_on_disconnect:
            # nobody will read the answer: stop waiting for it (queued inference work is dropped)
            self.worker.cancel()

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = asyncio.Event()
        self.writable.clear()

    def resume_writing(self) -> None:
        if self.writable is not None:
            self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        if self.closing or self.refused:
            return
        starts, messages = not self.in_message, self.messages
        if starts:
            seen = self.seen
            if seen is not None and data.startswith(seen.head) and self._take_seen(seen, data):
                return
            if self.timer_kind != "header":  # first bytes of a new request: the header deadline starts now
                self._arm(self.limits.header_timeout_s, "header")
            self.learning = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported", raise_=False)
        except httptools.HttpParserError as e:  # also a callback's _Refused, which httptools wraps
            if self.discarding:  # a refused body that does not parse: it has been answered already
                self._end_discard()
            else:
                self._refuse(400, f"malformed HTTP request: {e}", raise_=False)
        except _Refused:
            pass
        else:
            if starts and self.messages == messages + 1:
                self._learn(data)
        self.learning = False
        self.learned = None

    # --- requests whose head was seen before on this connection
    def _learn(self, data: bytes) -> None:
        """Keep the head of `data`, one whole keep-alive request with a Content-Length (or no body) that
        parsed cleanly, so that the next request of the same head and length skips the parser: clients send
        the same header bytes with every request, and the same bytes parse the same way. One header may vary,
        X-Request-Id (a gateway sets one per request), where its value is a plain id (`_take_seen`)."""
        learned = self.learned
        if learned is None or self.in_message or self.closing or self.refused or self.discarding:
            return
        method, path, query, headers = learned
        head_len = data.find(b"\r\n\r\n") + 4
        clen = headers.get("content-length", "0")
        if (head_len < 4 or not clen.isdigit() or head_len + int(clen) != len(data)
                or "transfer-encoding" in headers or "expect" in headers):
            return
        head, tail = bytes(data[:head_len]), None
        request_id = headers.get("x-request-id")
        if request_id is not None:
            lowered = head.lower()
            line = lowered.find(_REQUEST_ID_LINE)
            if line < 0 or lowered.find(_REQUEST_ID_LINE, line + 2) >= 0:
                return  # repeated: left to the parser
            at = line + len(_REQUEST_ID_LINE)
            while head[at : at + 1] in (b" ", b"\t"):
                at += 1
            end = head.find(b"\r\n", at)
            if head[at:end] != request_id.encode("latin-1"):
                return  # trailing blanks, or folded: left to the parser
            head, tail = head[:at], head[end:]
        self.seen = _SeenHead(head, tail, int(clen), method, path, query, headers)

    def _take_seen(self, seen: _SeenHead, data: bytes) -> bool:
        """Queue `data`, a request that starts with `seen.head`, as the parser would have, if the rest of its
        head is `seen`'s too; False (nothing done) otherwise, or where its body does not fit the in-flight
        budget: the parser's path then reads or refuses it."""
        at = len(seen.head)
        size = seen.size
        if seen.tail is None:
            if len(data) != at + size:
                return False
            headers = seen.headers.copy()
        else:  # an X-Request-Id of its own: a plain id, then the same bytes as `seen`'s to the body
            end = data.find(b"\r\n", at, at + MAX_REQUEST_ID + 2)
            if (end <= at or not data.startswith(seen.tail, end) or len(data) != end + len(seen.tail) + size
                    or data[at:end].translate(None, _PLAIN_ID)):
                return False
            headers = seen.headers.copy()
            headers["x-request-id"] = data[at:end].decode("ascii")
            at = end + len(seen.tail)
        if size and not self._reserve(size):
            return False
        self.deadline = None  # _disarm()
        self.timer_kind = None
        self.arrived = self.last_read
        self._queue(Request(seen.method, seen.path, seen.query, headers, data[at:] if size else b"", self.client,
                            self.arrived), True)
        return True

    # --- parser callbacks
    def _reset_message(self) -> None:
        self.url = b""
        self.headers = {}
        self.body_parts = []
        self.body_buf = None
        self.body_len = 0
        self.header_bytes = 0
        self.in_message = False

    def on_message_begin(self) -> None:
        self._reset_message()
        self.in_message = True
        if self.timer_kind != "header":  # a pipelined request that began in the previous one's last packet
            self._arm(self.limits.header_timeout_s, "header")

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > self.limits.max_header_bytes:
            self._refuse(431, "request headers too large")
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        clen = self.headers.get("content-length")
        size = int(clen) if clen is not None and clen.isdigit() else None
        expect = self.headers.get("expect", "").lower() == "100-continue"
        self.arrived = self.loop.time()
        if size is not None and size > self.limits.max_body_bytes:
            limit = self.limits.max_body_bytes
            self._refuse_body(413, f"request body of {clen} bytes exceeds the limit of {limit} bytes", size, expect)
            return
        if size and not self._reserve(size):
            self._refuse_body(503, self._busy_message(size), size, expect)
            return
        if expect:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._arm(self.limits.body_timeout_s, "body")

    def on_body(self, chunk: bytes) -> None:
        if self.discarding:
            self.discarded += len(chunk)
            if self.discarded > self.limits.max_drain_bytes:
                self._close()
                raise _Refused()
            self._arm_drain()
            return
        self.body_len += len(chunk)
        if self.body_len > self.limits.max_body_bytes:
            self._refuse_body(413, f"request body exceeds the limit of {self.limits.max_body_bytes} bytes")
            return
        if self.body_len > self.reserved and not self._reserve(self.body_len - self.reserved):  # chunked
            self._refuse_body(503, self._busy_message(self.body_len))
            return
        if self.body_buf is not None:
            self.body_buf += chunk
        else:
            self.body_parts.append(chunk)
            if self.body_len > _GROW_IN_PLACE_FROM:
                # a large body grows one buffer (realloc, in place for large blocks) rather than a list
                # of chunks joined at the end, which would hold the body twice at that moment
                self.body_buf = bytearray().join(self.body_parts)
                self.body_parts = []

    def on_message_complete(self) -> None:
        self.deadline = None  # _disarm()
        if self.discarding:  # the refused body is all read: close now, or once the refusal is written
            self._end_discard()
            raise _Refused()
        raw_url = self.url
        if raw_url[:1] == b"/" and b"?" not in raw_url and b"#" not in raw_url:  # most requests: a bare path
            path, query = raw_url.decode("latin-1"), ""
        else:
            url = httptools.parse_url(raw_url)
            path, query = url.path.decode("latin-1"), (url.query or b"").decode("latin-1")
        body: bytes | bytearray
        if self.body_buf is not None:
            body, self.body_buf = self.body_buf, None
        else:
            body = self.body_parts[0] if len(self.body_parts) == 1 else b"".join(self.body_parts)
        method = self.parser.get_method()
        req = Request(_METHODS.get(method) or method.decode("latin-1"), path, query, self.headers, body, self.client,
                      self.arrived)
        keep_alive = self.parser.should_keep_alive()
        self.messages += 1
        if self.learning:  # the first request of the bytes data_received has: its head may be kept (_learn)
            self.learning = False
            if keep_alive:
                self.learned = (req.method, path, query, dict(self.headers))
        self.in_message = False
        self.timer_kind = None
        self._queue(req, keep_alive)

    def _queue(self, req: Request, keep_alive: bool) -> None:
        """Serve `req` after the requests before it on this connection."""
        self.pending.append((req, keep_alive, self.reserved))
        self.reserved = 0
        if len(self.pending) >= MAX_PIPELINED and not self.reading_paused:
            # a client that pipelines without reading answers must not grow our memory
            self.transport.pause_reading()
            self.reading_paused = True
        if self.worker is None:
            if self.server.eager:
                self._serve_eagerly()
            else:
                self.worker = self.loop.create_task(self._serve_pending())

    def _serve_eagerly(self) -> None:
        """Run `_serve_pending` here, in the parser's callback, up to its first real wait (eager.py): a request
        the handler answers without waiting (a short forward run inline) costs no task and no loop turn, and one
        that waits (the gateway's) starts its work a loop turn sooner. The handler must not need
        `asyncio.current_task()` before its first wait (`asyncio.timeout` does; eager.within does not)."""
        self.worker = _EAGER  # not None while the request is served: what is parsed meanwhile is queued
        try:
            self.worker = start_eagerly(self.loop, self._serve_pending())
        except BaseException:  # a bug guard, as a task's unretrieved exception would be logged
            self.worker = None
            log.exception("unhandled error serving a request")
            self._close()

    # --- request handling
    async def _serve_pending(self) -> None:
        server = self.server
        try:
            while self.pending and not self.closing:
                req, keep_alive, reserved = self.pending.popleft()
                if self.reading_paused and not self.refused and len(self.pending) < MAX_PIPELINED // 2:
                    self.reading_paused = False
                    self.transport.resume_reading()
                if self.writable is not None:
                    await self.writable.wait()  # the client is not reading: answer no more until it does
                if isinstance(req, Response):  # a refusal queued by _refuse
                    resp = req
                else:
                    server.in_flight += 1
                    try:
                        resp = await server.handler(req)
                    except Exception:  # the handler maps its own errors; this is a bug guard
                        log.exception("unhandled error serving %s %s", req.method, req.path)
                        resp = Response(500, server.error_body("internal server error"))
                    finally:
                        server.in_flight -= 1
                        if reserved:
                            server.inflight_bytes -= reserved  # _release(reserved)
                keep_alive = keep_alive and not server.stopping
                if self.closing:
                    return
                head_only = not isinstance(req, Response) and req.method == "HEAD"
                self.transport.write(encode_response(resp, keep_alive, with_body=not head_only))
                if not keep_alive:
                    if self.discarding:  # a refused body is still arriving: drop it, close at its end
                        self.answer_written = True
                        return
                    self._close()
                    return
        finally:
            self.worker = None
            if server.stopping:
                server._maybe_drained()
        if not self.closing and not self.in_message:
            self._arm(self.limits.keepalive_timeout_s, None)

    # --- deadlines and refusals
    def _arm(self, seconds: float, kind: str | None) -> None:
        """`kind`'s wait ends `seconds` from now. The timer is made again only when it would fire after
        that: each request moves the deadline three times, which costs attribute stores, not timers."""
        self.timer_kind = kind
        now = self.loop.time()
        self.deadline = now + seconds
        if self.timer is None or self.deadline < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            # no later than the shortest limit from now: a later, shorter wait (the next request's header
            # deadline after a keep-alive one) then still finds the timer early enough
            self.timer_at = now + min(seconds, self.tick)
            self.timer = self.loop.call_at(self.timer_at, self._on_timer)

    def _disarm(self) -> None:
        self.deadline = None  # the timer, if any, finds nothing to do when it fires

    def _cancel_timer(self) -> None:
        self.deadline = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        self.timer = None
        if self.deadline is None:
            return
        now = self.loop.time()
        if now < self.deadline:  # moved since the timer was made: wait on
            self.timer_at = min(self.deadline, now + self.tick)
            self.timer = self.loop.call_at(self.timer_at, self._on_timer)
            return
        self.deadline = None
        self._on_timeout(self.timer_kind)

    def _on_timeout(self, kind: str | None) -> None:
        if kind == "drain":  # a refused body was not all sent within the body deadline
            self._close()
            return
        if kind is None:
            if self.worker is None and not self.pending:
                self._close()  # idle keep-alive connection
            return
        what = "headers" if kind == "header" else "body"
        limit = self.limits.header_timeout_s if kind == "header" else self.limits.body_timeout_s
        self._refuse(408, f"request {what} not received within {limit:g} s", raise_=False)

    def _refuse(self, status: int, message: str, raise_: bool = True) -> None:
        """Answer an error the server decides on its own, then close the connection."""
        if not self.closing and not self.refused and self.transport is not None:
            if self.server.on_refuse is not None:  # the access log's line for answers no handler saw
                self.server.on_refuse(self.client, *self._request_line(), status, message)
            self._refuse_with(Response(status, self.server.error_body(message)))
        if raise_:
            raise _Refused()

    def _refuse_body(self, status: int, message: str, size: int | None = None, expect: bool = False) -> None:
        """Refuse a request whose body follows: answer now (in order), then read and drop the body.

        Closing at once with unread bytes makes the kernel send a reset, and a client that sends
        its whole body before reading (Python's http.client) then sees only the reset.
        """
        if self.server.on_refuse is not None and not (self.closing or self.refused or self.discarding):
            self.server.on_refuse(self.client, *self._request_line(), status, message)
        headers = {"Retry-After": str(self.limits.retry_after_s)} if status == 503 else {}
        resp = Response(status, self.server.error_body(message), headers=headers)
        if expect or (size is not None and size > self.limits.max_drain_bytes):
            # the client waits for 100 Continue before sending the body, or the body is too large to drain
            self._refuse_with(resp)
            raise _Refused()
        if self.closing or self.refused or self.discarding:
            return
        self._release(self.reserved)
        self.reserved = 0
        self.body_parts = []
        self.body_buf = None
        self.discarding = True
        self.discarded = 0
        self.answer_written = False
        self.drain_until = self.loop.time() + self.limits.body_timeout_s
        self._arm_drain()
        if self.worker is None:
            self.transport.write(encode_response(resp, False))
            self.answer_written = True
        else:  # earlier pipelined requests are answered first, in order
            self.pending.append((resp, False, 0))

    def _end_discard(self) -> None:
        self.discarding = False
        self.in_message = False
        self.refused = True
        self._disarm()
        if self.answer_written:
            self._close()
        elif not self.closing:
            self.transport.pause_reading()

    def _arm_drain(self) -> None:
        left = self.drain_until - self.loop.time()
        self._arm(max(0.0, min(left, self.limits.drain_idle_s)), "drain")

    def _refuse_with(self, resp: Response) -> None:
        if not self.closing and not self.refused and self.transport is not None:
            if self.worker is None:
                self.transport.write(encode_response(resp, False))
                self._close()
            else:
                self.refused = True
                self._disarm()
                self.transport.pause_reading()
                self.pending.append((resp, False, 0))

    def _reserve(self, n: int) -> bool:
        """Count `n` more body bytes against the server's budget; False if they do not fit.

        A request alone always fits (a body the size limit allows is never refused for the budget).
        """
        srv = self.server
        limit = self.limits.max_inflight_bytes
        if limit and srv.inflight_bytes and srv.inflight_bytes + n > limit:
            return False
        srv.inflight_bytes += n
        self.reserved += n
        return True

    def _release(self, n: int) -> None:
        if n:
            self.server.inflight_bytes -= n

    def _busy_message(self, size: int) -> str:
        return (f"the server is busy: {self.server.inflight_bytes} bytes of requests are in flight and "
                f"{size} more would exceed limits.maxInflightBytes ({self.limits.max_inflight_bytes}); retry later")

    def _request_line(self) -> tuple[str, str]:
        """(method, path) of the request being read, as far as they are known."""
        try:
            method = self.parser.get_method().decode("latin-1") if self.parser is not None else ""
        except Exception:  # not parsed yet
            method = ""
        return method, self.url.split(b"?", 1)[0].decode("latin-1", "replace")

    def _close(self) -> None:
        self.closing = True
        self._cancel_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def close_if_idle(self, idle_for_s: float = 0.0) -> None:
        """Close the connection if no request is on it, none has begun, and nothing arrived for
        `idle_for_s` (bytes a client sent just before may still be on their way to us)."""
        if (self.worker is None and not self.pending and not self.in_message
                and self.loop.time() - self.last_read >= idle_for_s):
            self._close()


class _Refused(Exception):
    pass


# X-Request-Id values a seen head takes without the parser: up to this long, of these bytes
MAX_REQUEST_ID = 128
_PLAIN_ID = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:+/=~"
_REQUEST_ID_LINE = b"\r\nx-request-id:"


@dataclass(slots=True, frozen=True)
class _SeenHead:
    """A request head parsed before on a connection, and what it meant (`_Connection._learn`)."""

    head: bytes  # through the blank line; or up to the X-Request-Id value, when `tail` is not None
    tail: bytes | None  # from the end of the X-Request-Id value through the blank line
    size: int  # the body's length (Content-Length)
    method: str
    path: str
    query: str
    headers: dict[str, str]  # copied into each request (handlers may add to theirs)


class _Eager:
    """`_Connection.worker` while `_serve_eagerly` runs the first step (nothing can cancel it then)."""

    def cancel(self) -> bool:
        return False


_EAGER = _Eager()




class HTTPServer:
    """Serve `handler` on host:port until `stop()`."""

    def __init__(self, handler: Handler, limits: ServerLimits | None = None, error_body: ErrorBody = _json_error,
                 cancel_on_disconnect: bool = False, eager: bool = False):
        self.handler = handler
        # start serving a request in the parser's callback (_Connection._serve_eagerly): for a handler
        # that often answers without waiting and never needs asyncio.current_task() before its first wait
        self.eager = eager
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
        self.inflight_bytes = 0  # request bodies held (see ServerLimits.max_inflight_bytes)
        self.stopping = False
        self._server: asyncio.base_events.Server | None = None
        self._drained: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self, host: str, port: int, sock: socket.socket | None = None,
                    ssl: ssl_.SSLContext | None = None) -> int:
        """Start listening (TLS with `ssl`); returns the bound port (useful with port 0)."""
        self.loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        if sock is not None:
            self._server = await self.loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024,
                                                         ssl=ssl)
        else:
            self._server = await self.loop.create_server(
                lambda: _Connection(self), host, port, backlog=1024, reuse_address=True, ssl=ssl
            )
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    def _maybe_drained(self) -> None:
        if self.stopping and self.in_flight == 0 and self._drained is not None:
            self._drained.set()

    def begin_drain(self) -> None:
        """From now on every response closes its connection (`Connection: close`): clients still
        sending here reconnect, and by then the listener is closed or routing has moved them."""
        self.stopping = True

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting, finish every request received (up to `grace_s`), close every connection.

        A request already received, or arriving on a connection still open, is served (with
        `Connection: close`); an idle keep-alive connection is closed once nothing has arrived on it
        for `IDLE_SETTLE_S` (bytes a client sent just before the listener closed are read first).
        """
        self.stopping = True
        if self._server is not None:
            self._server.close()
        loop = self.loop or asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while True:
            for c in list(self.connections):
                c.close_if_idle(IDLE_SETTLE_S)
            self._maybe_drained()
            if not self.connections or loop.time() >= deadline:
                break
            await asyncio.sleep(min(0.02, max(0.0, deadline - loop.time())))
        if self.connections and self.in_flight:
            log.warning("shutdown: %d requests still in flight after %g s", self.in_flight, grace_s)
        for c in list(self.connections):
            c._close()


# How long an idle connection must have been quiet before shutdown closes it: bytes a client sent
# just before are read (and served) first, instead of being met with a reset.
IDLE_SETTLE_S = 0.1


async def serve_until_signalled(server: HTTPServer, host: str, port: int,
                                on_listening: Callable[[int], object] | None = None, grace_s: float = 30.0,
                                before_stop: Callable[[], object] | None = None, drain_delay_s: float = 0.0,
                                ssl: ssl_.SSLContext | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain and stop. `on_listening(port)` is called once bound.

    On the signal: `before_stop()` (readiness turns false there), then the listener stays open for
    `drain_delay_s`, serving as before but closing each connection after its response, so that
    whoever routes here (Kubernetes endpoints, a gateway) stops before the listener closes; then
    `stop(grace_s)`. `ssl`: serve over TLS.
    """
    bound = await server.start(host, port, ssl=ssl)
    if on_listening is not None:
        on_listening(bound)
    await stop_event().wait()
    if before_stop is not None:
        before_stop()
    server.begin_drain()
    if drain_delay_s > 0:
        await asyncio.sleep(drain_delay_s)
    await server.stop(grace_s)

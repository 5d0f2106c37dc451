"""A keep-alive HTTP/1.1 client pool to one inference server (asyncio protocol + httptools).

Why not aiohttp's client: per request it builds several objects and tasks that cost more than
the forwarding itself. Here a request is one write and one parse into a future.

The distinction that matters to the proxy is *when* a request failed:
- `ConnectFailed`: the connection could not be made, or closed before any byte of the answer
  arrived. Nothing was processed that the client could see, so the proxy may retry elsewhere.
- `ResponseBroken`: the answer had begun and then the connection broke. Never retried.
- `UpstreamTimeout`: no complete answer before the request's deadline (or no connection by then: not sent).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httptools

from .eager import within

if TYPE_CHECKING:
    from .tls import ClientTLS


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    """No byte of a response was received: safe to retry on another endpoint."""


class ResponseBroken(UpstreamError):
    """The connection broke after the response began: not retryable."""


class UpstreamTimeout(UpstreamError):
    """No answer by the request's deadline; `sent` False when it passed while connecting (nothing was sent)."""

    def __init__(self, message: str, sent: bool = True):
        super().__init__(message)
        self.sent = sent


class EndpointLost(UpstreamError):
    """The endpoint was marked unresponsive (not ready, not draining) while the request waited on
    it: the request is abandoned there, and may be sent elsewhere (inference is idempotent)."""


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]  # lower-cased names, in order
    body: bytes


class _Connection(asyncio.Protocol):
    """One TCP connection; one request at a time (no pipelining)."""

    __slots__ = ("transport", "parser", "waiter", "started", "closed", "status", "headers",
                 "body", "keep_alive", "reused")

    def __init__(self) -> None:
        # None only until connection_made, which runs before the connection is handed out
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[UpstreamResponse] | None = None
        self.started = False
        self.closed = False
        self.reused = False
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.keep_alive = True

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP connection's: an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if not self.started:
            self.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ResponseBroken(f"malformed response from upstream: {e}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            if self.started:
                w.set_exception(ResponseBroken("upstream closed the connection mid-response"))
            else:
                reason = f": {exc}" if exc else ""
                w.set_exception(ConnectFailed(f"upstream closed the connection before answering{reason}"))

    # --- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, chunk: bytes) -> None:
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        w = self.waiter
        if w is not None and not w.done():
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            w.set_result(UpstreamResponse(self.parser.get_status_code(), self.headers, body))

    # --- use
    def send(self, data: bytes, body: bytes | None,
             loop: asyncio.AbstractEventLoop) -> asyncio.Future[UpstreamResponse]:
        self.waiter = loop.create_future()
        self.started = False
        self.headers = []
        self.body = []
        if body is None:
            self.transport.write(data)
        else:
            self.transport.writelines((data, body))
        return self.waiter

    def _fail(self, exc: Exception) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _expire(answer: asyncio.Future[UpstreamResponse], error: Callable[[], UpstreamTimeout]) -> None:
    if not answer.done():
        answer.set_exception(error())


# Bodies smaller than this are copied into the head's buffer (one write); larger ones are written
# after the head without a copy.
_COPY_BODY_BELOW = 64 * 1024


class EndpointPool:
    """Idle keep-alive connections to one `host:port`, reused most-recent-first."""

    def __init__(self, host: str, port: int, connect_timeout_s: float = 2.0, max_idle: int = 64,
                 tls: ClientTLS | None = None):
        self.host = host
        self.port = port
        self.tls = tls  # over TLS, the server's certificate checked against tls's CA and server name
        self.authority = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle
        self.idle: list[_Connection] = []
        self.busy: set[_Connection] = set()  # connections with a request on them
        self.closed = False

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        """A new connection, within the connect timeout and by the request's `deadline` (eager.within: the
        gateway starts a request before any task runs it)."""
        connect_by = loop.time() + self.connect_timeout_s
        if self.tls is None:
            connecting = loop.create_connection(_Connection, self.host, self.port)
        else:
            connecting = loop.create_connection(_Connection, self.host, self.port, ssl=self.tls.context(),
                                                server_hostname=self.tls.server_name)
        try:
            _, conn = await within(loop, connecting, min(connect_by, deadline))
        except TimeoutError:
            if deadline <= connect_by:
                raise UpstreamTimeout(f"the request's deadline passed while connecting to {self.authority}",
                                      sent=False) from None
            raise ConnectFailed(f"connect to {self.authority} timed out after {self.connect_timeout_s:g} s") from None
        except OSError as e:
            raise ConnectFailed(f"cannot connect to {self.authority}: {e.strerror or e}") from None
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as e:  # pragma: no cover - not a TCP socket
                if e.errno != errno.EOPNOTSUPP:
                    raise
        return conn

    def _take_idle(self) -> _Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes,
                      deadline: float) -> UpstreamResponse:
        """Send one request and read the whole response before loop time `deadline`."""
        loop = asyncio.get_running_loop()
        lines = [f"{method} {target} HTTP/1.1", f"host: {self.authority}"]
        if body or method == "POST":
            lines.append(f"content-length: {len(body)}")
        lines.extend(f"{k}: {v}" for k, v in headers)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if len(body) < _COPY_BODY_BELOW:
            head, rest = head + body, None
        else:
            rest = body
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, head, rest, loop, deadline)
            except ConnectFailed:
                pass  # a kept-alive connection the server had just closed: one fresh try
        conn = await self._connect(loop, deadline)
        conn.reused = False
        return await self._exchange(conn, head, rest, loop, deadline)

    def _timeout(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"{self.authority} did not answer before the request's deadline")

    async def _exchange(self, conn: _Connection, head: bytes, rest: bytes | None,
                        loop: asyncio.AbstractEventLoop, deadline: float) -> UpstreamResponse:
        """The answer to `head` (+ `rest`) on `conn`, by loop time `deadline`: a timer on the answer's future
        (an `asyncio.timeout` costs a task lookup and a reschedule per request)."""
        self.busy.add(conn)
        answer = conn.send(head, rest, loop)
        timer = loop.call_at(deadline, _expire, answer, self._timeout)
        try:
            resp = await answer
        except BaseException:
            conn.close()
            raise
        finally:
            timer.cancel()
            self.busy.discard(conn)
        if conn.keep_alive and not conn.closed and not self.closed and len(self.idle) < self.max_idle:
            conn.waiter = None
            self.idle.append(conn)
        else:
            conn.close()
        return resp

    def abort(self, reason: str) -> int:
        """Fail every request waiting on this endpoint with EndpointLost (and close its connection);
        returns how many there were."""
        conns = list(self.busy)
        for conn in conns:
            conn._fail(EndpointLost(reason))
            conn.close()
        return len(conns)

    def close(self) -> None:
        """Close the idle connections; connections in use close when their request ends."""
        self.closed = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()

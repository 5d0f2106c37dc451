"""The gateway's gRPC calls to a model server over HTTP/2 framing of our own (the server's transport.py, client side).

Why not a grpc.aio channel: each call on it cost the gateway about as much CPU as the grpc.aio server side
(grpc's core hands every call between its poller thread and the event loop); bench/gateway.py measures both
(`CAFFESERVE_GRPC_TRANSPORT=grpcio` puts the gateway back on grpc.aio). Here a call is one write (headers,
the message and END_STREAM, when the windows allow) and the answer's frames parsed as they arrive, on the
event loop.

One connection per server (HTTP/2 multiplexes the calls), opened on first use and again after it closes
(a restarted server is used again at once). What a call can end in, as forward.py wants it:
- an answer: (status code, message or details, initial metadata, trailing metadata), as grpc.aio gives it;
- Unreachable: the connection could not be made, or closed (or GOAWAY'd this stream) before the answer;
- Taken (forward.Lost at the gateway): `abort` took it back (the server stopped answering its probe);
- DEADLINE_EXCEEDED when the deadline passes (the stream is reset, the server drops the work);
- a cancelled task resets its stream too (the client went away).
Flow control both ways: the request's data waits for the server's windows (a grpc.aio server starts at
64 KiB); answers get large windows, topped up as they are read.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import zlib
from typing import TYPE_CHECKING

import grpc

from caffe_http.eager import within
from inference_server.grpc.hpack_decode import Fields, HeaderDecoder, HPACKError, encode_int, literal
from inference_server.grpc.messages import SERVICE
from inference_server.grpc.transport import (
    ACK,
    CANCEL,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    data_frames,
    frame,
    metadata_pairs,
)

from .forward import Unreachable

if TYPE_CHECKING:
    from caffe_http.tls import ClientTLS

log = logging.getLogger(__name__)

_HEAD = struct.Struct(">I")
WINDOW = (1 << 31) - 1  # what a server may send ahead, per answer and per connection: the gateway holds answers whole
MAX_FRAME = 1 << 20  # the largest frame we accept
MAX_STREAM_ID = (1 << 31) - 1
# HTTP status without grpc-status, as gRPC maps it (grpc/doc/http-grpc-status-mapping.md)
_HTTP_CODES = {400: grpc.StatusCode.INTERNAL, 401: grpc.StatusCode.UNAUTHENTICATED,
               403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.UNIMPLEMENTED,
               429: grpc.StatusCode.UNAVAILABLE, 502: grpc.StatusCode.UNAVAILABLE,
               503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.UNAVAILABLE}
_CODES = {c.value[0]: c for c in grpc.StatusCode}
# request headers every call carries: :method POST and :scheme http (static indexes 3 and 6), then ours
_FIXED = b"\x83\x86" + literal(b"content-type", b"application/grpc") + literal(b"te", b"trailers")
_SKIP_REPLY = frozenset({b"content-type", b"grpc-status", b"grpc-message"})


class _Call:
    __slots__ = ("id", "future", "head", "pending", "send_window", "headers", "trailers", "body", "received")

    def __init__(self, sid: int, window: int, future: asyncio.Future):
        self.id = sid
        self.future = future
        self.head = b""  # the request's message prefix, while not yet sent
        self.pending: memoryview | None = None  # request data waiting for window
        self.send_window = window
        self.headers: Fields | None = None
        self.trailers: Fields | None = None
        self.body = bytearray()
        self.received = 0  # answer bytes since this stream's last WINDOW_UPDATE


class _ConnectionClosed(Exception):
    pass


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection to a server; its calls are `_Call`s keyed by stream id."""

    def __init__(self, target: str):
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.decoder = HeaderDecoder(max_list_bytes=1 << 20)
        self.calls: dict[int, _Call] = {}
        self.next_id = 1
        self.peer_window = 65535  # the server's SETTINGS_INITIAL_WINDOW_SIZE
        self.conn_send_window = 65535
        self.peer_max_frame = 16384
        self.received = 0  # answer bytes since the last connection WINDOW_UPDATE
        self.continuing: tuple[int, int, bytearray] | None = None
        self.usable = True  # false after GOAWAY or loss: new calls open a new connection
        self.closed = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by connection_made
        # a call's header block but its grpc-timeout, by (path, metadata): the same for most calls
        self.blocks: dict[tuple[bytes, tuple] | None, tuple[bytes, bytes]] = {}
        # what an answer's header blocks say, by the blocks' identity (the decoder gives a repeated block's
        # fields as the same tuple): (headers, trailers, what _status found)
        self.statuses: dict[tuple[int, int], tuple[Fields, Fields, tuple]] = {}

    # --- lifecycle
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()  # once: on 3.11 each get_running_loop() is a getpid() system call
        settings = struct.pack(">HIHIHI", 0x2, 0, 0x4, WINDOW, 0x5, MAX_FRAME)  # no push, windows, frame size
        top_up = frame(WINDOW_UPDATE, 0, 0, _HEAD.pack(WINDOW - 65535))
        transport.write(PREFACE + frame(SETTINGS, 0, 0, settings) + top_up)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.usable = False
        why = f"Socket closed ({exc})" if exc else "Socket closed"
        for c in list(self.calls.values()):
            if not c.future.done():
                c.future.set_exception(_ConnectionClosed(why))
        self.calls.clear()

    def close(self) -> None:
        self.usable = False
        if self.transport is not None and not self.closed:
            if not self.calls:
                self.transport.write(frame(GOAWAY, 0, 0, struct.pack(">II", 0, NO_ERROR)))
            self.transport.close()

    # --- a call
    def start(self, path: bytes, message: bytes, metadata, timeout: float | None) -> _Call:
        sid = self.next_id
        self.next_id += 2
        if self.next_id > MAX_STREAM_ID:
            self.usable = False  # stream ids spent: the next call opens a new connection
        c = _Call(sid, self.peer_window, self.loop.create_future())
        self.calls[sid] = c
        key = (path, metadata) if type(metadata) is tuple else None  # a tuple of str/bytes pairs: hashable
        parts = self.blocks.get(key) if key is not None else None
        if parts is None:
            parts = self._block_parts(path, metadata)
            if key is not None:
                if len(self.blocks) >= 16:
                    self.blocks.clear()
                self.blocks[key] = parts
        fixed, md = parts
        block = fixed + md if timeout is None else b"".join((fixed, literal(b"grpc-timeout", _timeout(timeout)), md))
        head = _header_frames(sid, block, self.peer_max_frame)
        n = len(message) + 5
        t = self.transport
        assert t is not None
        if n <= self.peer_max_frame and n <= c.send_window and n <= self.conn_send_window:
            c.send_window -= n
            self.conn_send_window -= n
            data_head = _frame_head(DATA, END_STREAM, sid, n) + b"\0" + _HEAD.pack(n - 5)
            if n < 65536:
                t.write(b"".join((head, data_head, message)))
            else:
                t.writelines((head, data_head, message))
            return c
        t.write(head)
        c.head, c.pending = b"\0" + _HEAD.pack(n - 5), memoryview(message)
        self._flush(c)
        return c

    def _block_parts(self, path: bytes, metadata) -> tuple[bytes, bytes]:
        """A call's header block in two parts, around its grpc-timeout: the fixed fields, :path and :authority;
        then the metadata."""
        fixed = _FIXED + b"\x04" + encode_int(len(path), 7) + path  # :path, literal with name index 4
        fixed += b"\x01" + encode_int(len(self.target), 7) + self.target.encode()  # :authority
        md = b""
        for key, value in metadata:
            name = key.encode()
            if name.endswith(b"-bin"):
                raw = value if isinstance(value, bytes) else value.encode()
                md += literal(name, base64.b64encode(raw).rstrip(b"="))
            else:
                md += literal(name, value.encode() if isinstance(value, str) else value)
        return fixed, md

    def reset(self, c: _Call, code: int = CANCEL) -> None:
        """Stop a call (deadline, cancelled, taken back): the server drops its work."""
        if self.calls.pop(c.id, None) is not None and not self.closed and self.transport is not None:
            self.transport.write(frame(RST_STREAM, 0, c.id, _HEAD.pack(code)))

    def _flush(self, c: _Call) -> None:
        """Send what the windows allow of the request's data, in one write (END_STREAM with the last of it)."""
        if c.pending is None or self.transport is None:
            return
        room = min(c.send_window, self.conn_send_window)
        out, c.head, data, taken = data_frames(c.id, c.head, c.pending, room, self.peer_max_frame, END_STREAM)
        if out:
            self.transport.writelines(out)
        c.send_window -= taken
        self.conn_send_window -= taken
        c.pending = data if data or c.head else None

    def _flush_all(self) -> None:
        for c in [c for c in self.calls.values() if c.pending is not None]:
            self._flush(c)

    # --- reading
    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        try:
            with memoryview(buf) as view:
                pos = self._frames(buf, view)  # its slices of `view` are gone when it returns
        except (_ProtocolError, HPACKError) as e:
            log.warning("gRPC connection to %s closed: %s", self.target, e)
            if self.transport is not None:
                self.transport.write(frame(GOAWAY, 0, 0, struct.pack(">II", 0, PROTOCOL_ERROR)))
                self.transport.close()
            self.connection_lost(None)
            return
        del buf[:pos]

    def _frames(self, buf: bytearray, view: memoryview) -> int:
        pos, end = 0, len(buf)
        while end - pos >= 9:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            if length > MAX_FRAME:
                raise _ProtocolError(f"frame of {length} bytes")
            if end - pos - 9 < length:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            sid = _HEAD.unpack_from(buf, pos + 5)[0] & 0x7FFFFFFF
            if kind == DATA:
                self._on_data(sid, flags, view[pos + 9 : pos + 9 + length])
                pos += 9 + length
                continue
            payload = bytes(view[pos + 9 : pos + 9 + length])
            pos += 9 + length
            if self.continuing is not None and kind != CONTINUATION:
                raise _ProtocolError("a header block was interrupted")
            if kind == HEADERS:
                start, stop = 0, len(payload)
                if flags & PADDED:
                    start, stop = 1, stop - payload[0]
                if flags & PRIORITY_FLAG:
                    start += 5
                if flags & END_HEADERS:
                    self._header_block(sid, flags, payload[start:stop])
                else:
                    self.continuing = (sid, flags, bytearray(payload[start:stop]))
            elif kind == CONTINUATION:
                if self.continuing is None or self.continuing[0] != sid:
                    raise _ProtocolError("CONTINUATION without HEADERS")
                block = self.continuing[2]
                block += payload
                if flags & END_HEADERS:
                    first = self.continuing[1]
                    self.continuing = None
                    self._header_block(sid, first, bytes(block))
            elif kind == WINDOW_UPDATE:
                inc = _HEAD.unpack(payload)[0] & 0x7FFFFFFF
                if sid == 0:
                    self.conn_send_window += inc
                    self._flush_all()
                elif (c := self.calls.get(sid)) is not None:
                    c.send_window += inc
                    self._flush(c)
            elif kind == SETTINGS:
                if not flags & ACK:
                    self._on_settings(payload)
            elif kind == PING:
                if not flags & ACK and self.transport is not None:
                    self.transport.write(frame(PING, ACK, 0, payload))
            elif kind == RST_STREAM:
                c = self.calls.pop(sid, None)
                if c is not None and not c.future.done():
                    code = _HEAD.unpack(payload)[0]
                    if code == REFUSED_STREAM:  # not started there: another server may run it
                        c.future.set_exception(_ConnectionClosed("the server refused the stream (REFUSED_STREAM)"))
                    else:
                        status = grpc.StatusCode.UNAVAILABLE if code == CANCEL else grpc.StatusCode.INTERNAL
                        c.future.set_result((status, f"Stream reset by the server (HTTP/2 error {code})", (), ()))
            elif kind == GOAWAY:
                self.usable = False
                last = _HEAD.unpack_from(payload, 0)[0] & 0x7FFFFFFF
                for c in [c for c in self.calls.values() if c.id > last]:  # never started there
                    self.calls.pop(c.id, None)
                    if not c.future.done():
                        c.future.set_exception(_ConnectionClosed("GOAWAY received before the call started"))
                if not self.calls and self.transport is not None:
                    self.transport.close()
            elif kind == PUSH_PROMISE:
                raise _ProtocolError("PUSH_PROMISE, which we disabled")
        return pos

    def _on_settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - 5, 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == 0x4:
                delta, self.peer_window = value - self.peer_window, value
                for c in self.calls.values():
                    c.send_window += delta
            elif key == 0x5:
                self.peer_max_frame = value
        if self.transport is not None:
            self.transport.write(frame(SETTINGS, ACK, 0))
        self._flush_all()

    def _on_data(self, sid: int, flags: int, payload: memoryview) -> None:
        n = len(payload)
        self.received += n
        if self.received >= WINDOW // 2 and self.transport is not None:
            self.transport.write(frame(WINDOW_UPDATE, 0, 0, _HEAD.pack(self.received)))
            self.received = 0
        if self.continuing is not None:
            raise _ProtocolError("a header block was interrupted")
        c = self.calls.get(sid)
        if c is None:
            return  # a call reset by us
        if flags & PADDED:
            c.body += payload[1 : n - payload[0]]
        else:
            c.body += payload
        c.received += n
        if c.received >= WINDOW // 2 and self.transport is not None:
            self.transport.write(frame(WINDOW_UPDATE, 0, sid, _HEAD.pack(c.received)))
            c.received = 0
        if flags & END_STREAM:
            self._finish(c)

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        fields = self.decoder.decode(block)  # always: the decoder's table follows every block
        c = self.calls.get(sid)
        if c is None:
            return
        if c.headers is None:
            c.headers = fields
        else:
            c.trailers = fields
        if flags & END_STREAM:
            self._finish(c)

    def _finish(self, c: _Call) -> None:
        self.calls.pop(c.id, None)
        if not self.usable and not self.calls and self.transport is not None:
            self.transport.close()  # after GOAWAY: the last call is answered
        if not c.future.done():
            c.future.set_result(_answer(c, self.statuses))


class _ProtocolError(Exception):
    pass


def _frame_head(kind: int, flags: int, stream: int, n: int) -> bytes:
    return bytes((n >> 16, (n >> 8) & 0xFF, n & 0xFF, kind, flags)) + _HEAD.pack(stream)


def _header_frames(sid: int, block: bytes, size: int) -> bytes:
    if len(block) <= size:
        return frame(HEADERS, END_HEADERS, sid, block)
    parts = [block[i : i + size] for i in range(0, len(block), size)]
    out = [frame(HEADERS, 0, sid, parts[0])]
    out += [frame(CONTINUATION, 0, sid, p) for p in parts[1:-1]]
    out.append(frame(CONTINUATION, END_HEADERS, sid, parts[-1]))
    return b"".join(out)


def _timeout(seconds: float) -> bytes:
    """grpc-timeout: at most 8 digits, in the finest unit that fits."""
    us = max(int(seconds * 1e6), 1)
    if us < 100_000_000:
        return b"%du" % us
    ms = us // 1000
    return b"%dm" % ms if ms < 100_000_000 else b"%dS" % (ms // 1000)


def _unpercent(value: bytes) -> str:
    if b"%" not in value:
        return value.decode("utf-8", "replace")
    out, i = bytearray(), 0
    while i < len(value):
        if value[i] == 0x25 and i + 3 <= len(value):
            try:
                out.append(int(value[i + 1 : i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        out.append(value[i])
        i += 1
    return out.decode("utf-8", "replace")


def _status(headers: Fields, trailers: Fields, trailers_only: bool) -> tuple:
    """What an answer's header blocks say: (code, details, initial metadata, trailing metadata, grpc-encoding);
    the code is None for an OK status (the message is then the answer)."""
    status = grpc_status = message = None
    encoding = b""
    for name, value in headers:
        if name == b":status":
            status = value
        elif name == b"grpc-encoding":
            encoding = value
    for name, value in trailers:
        if name == b"grpc-status":
            grpc_status = value
        elif name == b"grpc-message":
            message = value
    initial = () if trailers_only else metadata_pairs(headers, _SKIP_REPLY)
    trailing = metadata_pairs(trailers, _SKIP_REPLY)
    if status != b"200":
        http = int(status) if status and status.isdigit() else 0
        return (_HTTP_CODES.get(http, grpc.StatusCode.UNKNOWN), f"Received http2 header with status: {http}",
                initial, trailing, encoding)
    if grpc_status is None:
        return grpc.StatusCode.INTERNAL, "the server's answer carried no grpc-status", initial, trailing, encoding
    code = _CODES.get(int(grpc_status) if grpc_status.isdigit() else -1, grpc.StatusCode.UNKNOWN)
    if code is not grpc.StatusCode.OK:
        return code, _unpercent(message) if message else "", initial, trailing, encoding
    return None, "", initial, trailing, encoding


def _answer(c: _Call, statuses: dict[tuple[int, int], tuple[Fields, Fields, tuple]]) -> tuple:
    """(code, message bytes or details, initial metadata, trailing metadata) of a finished call. What its
    header blocks say is kept in `statuses` (its connection's): a server answers most calls with the same
    blocks, which the decoder gives as the same tuples."""
    headers: Fields = c.headers or ()
    trailers_only = c.trailers is None
    trailers = headers if c.trailers is None else c.trailers  # trailers-only: one block
    key = (id(headers), id(trailers) if not trailers_only else 0)
    kept = statuses.get(key)
    if kept is not None and kept[0] is headers and (trailers_only or kept[1] is trailers):
        said = kept[2]
    else:
        said = _status(headers, trailers, trailers_only)
        if len(statuses) >= 16:
            statuses.clear()
        statuses[key] = (headers, trailers, said)
    code, details, initial, trailing, encoding = said
    if code is not None:
        return code, details, initial, trailing
    body = c.body
    if len(body) < 5 or len(body) != 5 + _HEAD.unpack_from(body, 1)[0]:
        return grpc.StatusCode.INTERNAL, "the server's answer is not one message", initial, trailing
    payload = bytes(memoryview(body)[5:])
    if body[0]:
        try:
            payload = zlib.decompress(payload, 16 + zlib.MAX_WBITS if encoding == b"gzip" else zlib.MAX_WBITS)
        except zlib.error as e:
            return grpc.StatusCode.INTERNAL, f"the server's answer does not decompress: {e}", initial, trailing
    return grpc.StatusCode.OK, payload, initial, trailing


class H2Upstream:
    """A server's gRPC port: one HTTP/2 connection at a time, reopened when it closes; the calls in flight."""

    def __init__(self, host: str, port: int, tls: ClientTLS | None = None):
        self.host, self.port = host, port
        self.tls = tls  # over TLS (ALPN h2), the server's certificate checked against tls's CA and server name
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future | None = None
        self.closed = False

    async def _connection(self, timeout_s: float) -> _Connection:
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        loop = asyncio.get_running_loop()
        try:  # not asyncio.wait_for: a call may start eagerly (caffe_http/eager.py), with no current task
            return await within(loop, asyncio.shield(self._connecting), loop.time() + max(timeout_s, 0.001))
        except TimeoutError:
            raise Unreachable(f"cannot connect to {self.target}: no connection within {timeout_s:.3g} s") from None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            if self.tls is None:
                _, conn = await loop.create_connection(lambda: _Connection(self.target), self.host, self.port)
            else:
                _, conn = await loop.create_connection(lambda: _Connection(self.target), self.host, self.port,
                                                       ssl=self.tls.context("h2"), server_hostname=self.tls.server_name)
        except OSError as e:
            raise Unreachable(f"cannot connect to {self.target}: {e.strerror or e}") from None
        finally:
            self._connecting = None
        if self.closed:
            conn.close()
            raise Unreachable(f"{self.target}: the endpoint was removed")
        self._conn = conn
        return conn

    async def call(self, method: str, message: bytes, metadata, deadline: float, connect_timeout_s: float) -> tuple:
        """The server's answer to one unary call (see the module's docstring for how else it ends)."""
        conn = self._conn
        if conn is None or not conn.usable:
            loop = asyncio.get_running_loop()
            conn = await self._connection(min(connect_timeout_s, deadline - loop.time()))
        loop = conn.loop
        path = _PATHS.get(method)
        if path is None:
            path = _PATHS[method] = f"/{SERVICE}/{method}".encode()
        c = conn.start(path, message, metadata, max(deadline - loop.time(), 0.001))
        timer = loop.call_at(deadline, _expire, c.future)  # cheaper than asyncio.timeout_at on this path
        try:
            return await c.future
        except _Expired:
            conn.reset(c)
            return grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", (), ()
        except asyncio.CancelledError:
            conn.reset(c)  # the client went away: the server drops the work
            raise
        except _ConnectionClosed as e:
            raise Unreachable(f"{self.target}: {e}") from None
        finally:
            timer.cancel()

    def abort(self, reason: str) -> int:
        """Take back every call in flight (the server stopped answering): each ends in forward.Lost."""
        conn = self._conn
        if conn is None:
            return 0
        calls = list(conn.calls.values())
        for c in calls:
            conn.reset(c)
            if not c.future.done():
                c.future.set_exception(Taken(reason))
        return len(calls)

    def close(self) -> None:
        self.closed = True
        if self._conn is not None:
            self._conn.close()


class _Expired(Exception):
    pass


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(_Expired())


_PATHS: dict[str, bytes] = {}  # method name -> its :path


class Taken(Exception):
    """A call `abort` took back; its message is the reason."""

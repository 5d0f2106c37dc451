"""Unary gRPC calls over HTTP/2 framing of our own, on the event loop's transports (as the REST server).

Why not grpc.aio: an empty grpc.aio handler cost 0.41–0.44 ms of server CPU per call here (uvloop,
h2load, load ~10), more than our whole REST binary request; grpc's core hands every call between its
own poller thread and the event loop. Here a call is: the frames parsed from one read, its header
block decoded (hpack_decode.py), the handler run where the message completes (a task only from its first
wait on: caffe_http/eager.py), and its answer written in one write
(headers, data and trailers); a read laid out as the last call's (the same frames but for the stream id and the
message) skips even the frame loop (`_Connection._learn`). bench/protocols.py keeps the comparison.

What it speaks: HTTP/2 without TLS (prior knowledge, as `add_insecure_port`), unary calls only (every
OIP and Triton RPC we serve is unary), request messages in identity, gzip or deflate, answers
uncompressed; flow control both ways; PING, SETTINGS, GOAWAY and RST_STREAM (a reset cancels the
call's task, where it waits). A handler gets the request bytes and a context with grpc.aio's `time_remaining()`,
`invocation_metadata()` and `abort()`, so the same service object runs on either server.
On stop: the listener closes (new connections are refused), every connection gets GOAWAY, calls in
flight finish within the grace period and are then cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from ssl import SSLContext
from typing import NoReturn

import grpc

from caffe_http.eager import start_eagerly

from .hpack_decode import Fields, HeaderDecoder, HPACKError, encode_int, literal

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x6, 0x7, 0x8, 0x9

MAX_STREAMS = 1024  # calls at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS)
MAX_FRAME = 1 << 20  # the largest frame we accept (fewer frames for a large tensor than the 16 KiB default)
CONN_WINDOW = 1 << 26  # what a client may send ahead on a connection; topped up once half is used
MAX_HEADER_LIST = 16384
POOL_MIN, POOL_MAX = 1 << 16, 1 << 22  # messages of these sizes are joined into a reused buffer
POOL_BUFFERS = 4  # at most this many idle (16 MiB at most)
KEPT_BLOCKS = 16  # header blocks whose scan and metadata a connection keeps (each holds its fields alive)
_TIMEOUT_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3, ord("u"): 1e-6, ord("n"): 1e-9}
_HEAD = struct.Struct(">I")

Handler = Callable[[bytes | memoryview, "CallContext"], Awaitable[bytes]]  # the request message as a buffer


def _frame_head(kind: int, flags: int, stream: int, n: int) -> bytes:
    return bytes((n >> 16, (n >> 8) & 0xFF, n & 0xFF, kind, flags)) + _HEAD.pack(stream)


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _frame_head(kind, flags, stream, len(payload)) + payload


def data_frames(sid: int, head: bytes, data: memoryview, room: int, max_frame: int, end: int = 0):
    """DATA frames carrying up to `room` bytes of `head` then `data` (a message's 5-byte prefix, then the
    message itself: never copied into one buffer), each at most `max_frame`; `end` (END_STREAM) on the last
    frame when everything is in. Returns (the buffers to write at once, head left, data left, bytes taken)."""
    out: list[bytes | memoryview] = []
    taken = 0
    while room > 0 and (head or data):
        n = min(room, max_frame, len(head) + len(data))
        k = min(len(head), n)
        parts = (head[:k], data[: n - k]) if k else (data[:n],)
        head, data = head[k:], data[n - k :]
        out.append(_frame_head(DATA, 0 if head or data else end, sid, n))
        out += parts
        room -= n
        taken += n
    return out, head, data, taken


# the answer's header block: `:status: 200` (static index 8) and the content type
_RESPONSE_HEADERS = b"\x88" + literal(b"content-type", b"application/grpc")
_OK_TRAILERS = literal(b"grpc-status", b"0")
# an OK answer's frames around its message: HEADERS (stream id), then DATA's head (length in two parts,
# stream id) and the message's prefix (uncompressed, length); after the message the trailers (stream id)
_OK_HEAD = struct.Struct(f">5sI{len(_RESPONSE_HEADERS)}sBHHIBI")
_OK_HEAD_FRAME = bytes((0, 0, len(_RESPONSE_HEADERS), HEADERS, END_HEADERS))
_OK_TAIL = struct.Struct(f">5sI{len(_OK_TRAILERS)}s")
_OK_TAIL_FRAME = bytes((0, 0, len(_OK_TRAILERS), HEADERS, END_HEADERS | END_STREAM))


def _percent(message: str) -> bytes:
    """grpc-message's encoding: printable ASCII but '%' as is, every other byte of UTF-8 as %XX."""
    out = bytearray()
    for b in message.encode("utf-8"):
        out += bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b
    return bytes(out)


_REQUEST_NOT_METADATA = frozenset({b"content-type", b"te", b"grpc-timeout", b"grpc-encoding"})


def metadata_pairs(fields, skip: frozenset[bytes]) -> tuple[tuple[str, str | bytes], ...]:
    """A header block's custom metadata as grpc gives it: pseudo-headers and `skip` left out, `-bin`
    values base64-decoded (padding restored), the others as text."""
    out: list[tuple[str, str | bytes]] = []
    for name, value in fields:
        if name[:1] == b":" or name in skip:
            continue
        key = name.decode("latin-1")
        if key.endswith("-bin"):
            out.append((key, base64.b64decode(value + b"=" * (-len(value) % 4))))
        else:
            out.append((key, value.decode("latin-1")))
    return tuple(out)


def metadata_block(metadata) -> bytes:
    """gRPC metadata ((key, str or bytes) pairs) as literal header fields; `-bin` values in unpadded base64."""
    block = b""
    for key, value in metadata:
        name = key.lower().encode()
        if name.endswith(b"-bin"):
            raw = value if isinstance(value, bytes) else value.encode()
            block += literal(name, base64.b64encode(raw).rstrip(b"="))
        else:
            block += literal(name, value.encode() if isinstance(value, str) else value)
    return block


def status_block(code: grpc.StatusCode, details: str, trailing=()) -> bytes:
    """The header block of a trailers-only answer: status, message and trailing metadata."""
    block = _RESPONSE_HEADERS + literal(b"grpc-status", str(code.value[0]).encode())
    if details:
        block += literal(b"grpc-message", _percent(details))
    return block + metadata_block(trailing) if trailing else block


class AbortError(Exception):
    """Raised by `CallContext.abort`: the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing=()):
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, trailing


class CallContext:
    """What a handler may ask of its call (the subset of grpc.aio's ServicerContext our services and the
    gateway's forwarder use): deadline, metadata both ways, the peer, abort."""

    __slots__ = ("deadline", "_headers", "_conn", "_metadata", "initial", "trailing")

    def __init__(self, deadline: float | None, headers: Fields, conn: _Connection | None = None):
        self.deadline = deadline  # time.monotonic(), from grpc-timeout
        self._headers = headers
        self._conn = conn
        self._metadata: tuple[tuple[str, str | bytes], ...] | None = None
        self.initial: tuple = ()  # metadata for the answer's headers (send_initial_metadata)
        self.trailing: tuple = ()  # metadata for an OK answer's trailers (set_trailing_metadata)

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The request's metadata; the same tuple for calls whose header blocks were the same (kept by the
        connection, as the decoder keeps their fields)."""
        if self._metadata is not None:
            return self._metadata
        headers, conn = self._headers, self._conn
        kept = conn.metadata.get(id(headers)) if conn is not None else None
        if kept is not None and kept[0] is headers:
            self._metadata = kept[1]
            return kept[1]
        self._metadata = md = metadata_pairs(headers, _REQUEST_NOT_METADATA)
        if conn is not None:
            if len(conn.metadata) >= KEPT_BLOCKS:
                conn.metadata.clear()
            conn.metadata[id(headers)] = (headers, md)
        return md

    def peer(self) -> str:
        """grpc's form of the client's address: `ipv4:10.0.0.1:5555`, `ipv6:[::1]:5555` ("" when unknown)."""
        return self._conn.peer if self._conn is not None else ""

    async def send_initial_metadata(self, metadata) -> None:
        self.initial = tuple(metadata)

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> NoReturn:
        raise AbortError(code, details, trailing_metadata)


class _Stream:
    __slots__ = ("id", "path", "headers", "deadline", "encoding", "chunks", "filled", "expect", "task", "send_window",
                 "head", "pending", "trailers", "answered", "pooled")

    def __init__(self, sid: int, path: bytes, headers, deadline: float | None, encoding: bytes, window: int):
        self.id = sid
        self.path = path
        self.headers = headers
        self.deadline = deadline
        self.encoding = encoding
        self.chunks: list[memoryview] = []  # the request's bytes as they arrived (slices of immutable reads)
        self.filled = 0  # bytes in `chunks`
        self.expect = 0  # 5 + the message's length once its prefix has arrived
        self.task: asyncio.Task | None = None
        self.send_window = window
        self.head = b""  # the answer's message prefix, while not yet sent
        self.pending: memoryview | None = None  # answer data waiting for flow-control window
        self.trailers = b""  # the frames that end the answer, once `pending` is sent
        self.answered = False  # its request is complete (or refused): DATA that still arrives is dropped
        self.pooled: bytearray | None = None  # the message's buffer, from the server's pool


class _SeenCall:
    """A read that was one whole unary call (`_Connection._learn`), and what its header block meant."""

    __slots__ = ("length", "headers_head", "block", "data_head", "prefix", "headers", "path", "encoding", "timeout",
                 "timeout_at", "before_timeout", "after_timeout", "after_at", "generation")

    def __init__(self, length: int, headers_head: bytes, block: bytes, data_head: bytes, prefix: bytes,
                 headers: Fields, timeout: bytes | None, timeout_at: tuple[int, int] | None, generation: int):
        self.length = length  # of the whole read
        self.headers_head = headers_head  # the HEADERS frame's length, type and flags
        self.block = block  # its header block
        self.data_head = data_head  # the DATA frame's length, type and flags
        self.prefix = prefix  # the message's: uncompressed, its length
        # the block's fields; where grpc-timeout may vary (`timeout_at`) they keep the first call's value of it,
        # which nothing reads (the deadline is each call's own, metadata leaves grpc-timeout out)
        self.headers = headers
        scan = _scan(headers)
        self.path, self.encoding = scan[0], scan[4]
        self.timeout = timeout  # grpc-timeout's value, made a deadline per call
        # where in `block` grpc-timeout's value lies, when it is plain and may differ per call (a client that
        # sends its remaining time, as the gateway does); None: the whole block must be the same
        self.timeout_at = timeout_at
        # the block around that value (all of it before, none after, when it may not vary), and where the part
        # after it starts in a read
        start, end = timeout_at or (len(block), len(block))
        self.before_timeout, self.after_timeout, self.after_at = block[:start], block[end:], 9 + end
        self.generation = generation  # the header table's, when the block was decoded


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Connection(asyncio.Protocol):
    def __init__(self, server: GRPCTransportServer):
        self.server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.buf = bytearray()
        self.preface = False
        self.decoder = HeaderDecoder(max_list_bytes=MAX_HEADER_LIST)
        # what a call needs of a header block the decoder gave before (the same tuple): id -> (fields, its scan)
        self.scanned: dict[int, tuple[Fields, tuple[bytes, bytes, bytes, bytes | None, bytes]]] = {}
        self.metadata: dict[int, tuple[Fields, tuple]] = {}  # the same, for CallContext.invocation_metadata
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by connection_made
        self.streams: dict[int, _Stream] = {}
        self.last_id = 0
        self.conn_send_window = 65535
        self.peer_window = 65535  # the client's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_max_frame = 16384
        self.received = 0  # bytes of DATA since the last connection WINDOW_UPDATE we sent
        self.continuing: tuple[int, int, bytearray] | None = None  # a header block awaiting CONTINUATION
        self.data_left: tuple[int, int, int] | None = None  # (stream, bytes, flags) of a DATA frame arriving
        self.goaway = False
        self.closed = False
        self.stream_window = min(2**31 - 1, server.max_message_bytes + 5 + MAX_FRAME)
        self._peer: str | None = None
        self.seen: _SeenCall | None = None  # the layout of the last whole call a read had (_learn)
        self.called: tuple[int, Fields, bytes | None] | None = None  # the call this read started: id, fields, timeout

    @property
    def peer(self) -> str:
        if self._peer is None:
            addr = self.transport.get_extra_info("peername")
            if isinstance(addr, tuple) and len(addr) >= 2:
                host = str(addr[0])
                self._peer = f"ipv6:[{host}]:{addr[1]}" if ":" in host else f"ipv4:{host}:{addr[1]}"
            else:
                self._peer = ""
        return self._peer

    # --- lifecycle
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()  # once: on 3.11 each get_running_loop() is a getpid() system call
        self.server.connections.add(self)
        settings = struct.pack(">HIHIHIHI", 0x3, MAX_STREAMS, 0x4, self.stream_window, 0x5, MAX_FRAME,
                               0x6, MAX_HEADER_LIST)
        transport.write(frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, _HEAD.pack(CONN_WINDOW - 65535)))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for s in self.streams.values():
            if s.task is not None:
                s.task.cancel()  # nobody reads the answer: the call's queued work is dropped
        self.streams.clear()
        self.server.stream_closed()

    def close_gracefully(self) -> None:
        """GOAWAY: the streams begun so far are served, no new one; the connection closes when they end."""
        if not self.goaway and not self.closed:
            self.goaway = True
            self.transport.write(frame(GOAWAY, 0, 0, struct.pack(">II", self.last_id, NO_ERROR)))
        if not self.streams:
            self.transport.close()

    # --- reading
    def data_received(self, data: bytes) -> None:
        """Frames are read where they arrived: a read is immutable bytes, so a DATA payload is kept as a
        slice of it until its message is whole and joined once (no copy into a connection buffer, no
        zero-filled buffer per message: those two cost more than the rest of a 600 kB call here). Only a
        frame cut by the end of a read waits in `buf`; a DATA frame cut so goes on as `data_left`."""
        if type(data) is not bytes:
            data = bytes(data)  # a read of our own to keep: another transport may reuse its buffer
        seen = self.seen
        if seen is not None and len(data) == seen.length and self._take_seen(seen, data):
            return
        view = memoryview(data)
        start = 0
        if self.data_left is not None:  # the rest of a large DATA frame: straight into its stream's body
            sid, left, flags = self.data_left
            n = min(left, len(data))
            try:
                self._data_chunk(sid, view[:n])
                if n < left:
                    self.data_left = (sid, left - n, flags)
                    return
                self.data_left = None
                if flags & END_STREAM:
                    self._data_end(sid)
            except _ConnectionError as e:
                self._fail(e.code, str(e))
                return
            if n == len(data):
                return
            start = n
        buf = self.buf
        if buf or not self.preface:  # a frame cut by the last read (or the preface) goes first
            buf += view[start:]
            if not self.preface:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        self.transport.close()  # not HTTP/2 with prior knowledge (an HTTP/1.1 client, say)
                    return
                if not buf.startswith(PREFACE):
                    self.transport.close()
                    return
                del buf[: len(PREFACE)]
                self.preface = True
            data = bytes(buf)
            buf.clear()
            view, start = memoryview(data), 0
        self.called = None
        try:
            pos = self._frames(data, view, start)
        except _ConnectionError as e:
            self._fail(e.code, str(e))
            return
        if pos < len(data):
            buf += view[pos:]
        elif self.called is not None and start == 0:
            self._learn(data)

    # --- calls whose frames, but for the stream id and the message, were seen before on this connection
    def _learn(self, data: bytes) -> None:
        """Keep the layout of `data` if it was one whole call (`self.called`): a HEADERS frame (END_HEADERS, no
        padding, no priority) whose block changed nothing in the header table, then one DATA frame (END_STREAM)
        carrying one uncompressed message. A client sends such a read for each call, the same bytes but for the
        stream id and the message: the next one of the same length and bytes skips the frame loop."""
        sid, headers, timeout = self.called  # type: ignore[misc]
        end = len(data)
        if end < 23 or data[3] != HEADERS or data[4] != END_HEADERS or _HEAD.unpack_from(data, 5)[0] != sid:
            return
        at = 9 + ((data[0] << 16) | (data[1] << 8) | data[2])  # the DATA frame
        if (end < at + 14 or data[at + 3] != DATA or data[at + 4] != END_STREAM
                or _HEAD.unpack_from(data, at + 5)[0] != sid
                or ((data[at] << 16) | (data[at + 1] << 8) | data[at + 2]) != end - at - 9 or data[at + 9]
                or _HEAD.unpack_from(data, at + 10)[0] != end - at - 14):
            return
        block = data[9:at]
        if not self.decoder.unchanged_by(block, headers):
            return
        timeout_at = None if timeout is None else self.decoder.plain_value_span(block, b"grpc-timeout")
        self.seen = _SeenCall(end, data[:5], block, data[at : at + 5], data[at + 9 : at + 14], headers, timeout,
                              timeout_at, self.decoder.generation)

    def _take_seen(self, seen: _SeenCall, data: bytes) -> bool:
        """Start the call in `data` as the frame loop would have, if `data` is `seen`'s layout with a new stream id
        and the header table is as it was; False (nothing done) for anything else."""
        if self.data_left is not None or self.buf or self.continuing is not None:
            return False
        sid = _HEAD.unpack_from(data, 5)[0] & 0x7FFFFFFF
        at = 9 + len(seen.block)
        if not (sid > self.last_id and sid & 1 and data.startswith(seen.headers_head)
                and data.startswith(seen.before_timeout, 9) and data.startswith(seen.after_timeout, seen.after_at)
                and data.startswith(seen.data_head, at) and data.startswith(seen.prefix, at + 9)
                and _HEAD.unpack_from(data, at + 5)[0] == sid and self.decoder.generation == seen.generation):
            return False
        if seen.timeout_at is None:
            deadline = None if seen.timeout is None else _deadline(seen.timeout)
        else:  # the same block around a grpc-timeout value of the same length: this call's own value
            deadline = _deadline(data[9 + seen.timeout_at[0] : seen.after_at])
            if deadline is None:
                return False  # not a timeout: the frame loop reads it as it reads any other
        if self.goaway or self.server.closing or len(self.streams) >= MAX_STREAMS:
            return False  # the frame loop refuses it
        handler = self.server.handlers.get(seen.path)
        if handler is None:
            return False
        self.last_id = sid
        n = len(data) - at - 9  # the DATA frame's payload: flow control counts it
        self.received += n
        if self.received >= CONN_WINDOW // 2:
            self.transport.write(frame(WINDOW_UPDATE, 0, 0, _HEAD.pack(self.received)))
            self.received = 0
        s = _Stream(sid, seen.path, seen.headers, deadline, seen.encoding, self.peer_window)
        s.filled = s.expect = n
        s.answered = True
        self.streams[sid] = s
        call = self._call(s, handler, memoryview(data)[at + 14 :])
        s.task = start_eagerly(self.loop, call) if self.server.eager else self.loop.create_task(call)
        return True

    def _frames(self, buf: bytes, view: memoryview, pos: int) -> int:
        """Handle every whole frame in `buf` from `pos`; returns where the first incomplete one starts."""
        end = len(buf)
        while end - pos >= 9:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            if length > MAX_FRAME:
                raise _ConnectionError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            if end - pos - 9 < length:
                if buf[pos + 3] == DATA and not buf[pos + 4] & PADDED and self.continuing is None:
                    # a large DATA frame: what has come goes to the stream now, the rest as it arrives
                    sid = _HEAD.unpack_from(buf, pos + 5)[0] & 0x7FFFFFFF
                    self._data_chunk(sid, view[pos + 9 : end])
                    self.data_left = (sid, length - (end - pos - 9), buf[pos + 4])
                    pos = end
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            sid = _HEAD.unpack_from(buf, pos + 5)[0] & 0x7FFFFFFF
            payload = view[pos + 9 : pos + 9 + length]
            pos += 9 + length
            if self.continuing is not None and kind != CONTINUATION:
                raise _ConnectionError(PROTOCOL_ERROR, "a header block was interrupted")
            if kind == DATA:
                self._on_data(sid, flags, payload)
            elif kind == HEADERS:
                self._on_headers(sid, flags, payload)
            elif kind == CONTINUATION:
                self._on_continuation(sid, flags, payload)
            elif kind == WINDOW_UPDATE:
                self._on_window_update(sid, payload)
            elif kind == SETTINGS:
                self._on_settings(flags, payload)
            elif kind == PING:
                if not flags & ACK:
                    self.transport.write(frame(PING, ACK, 0, bytes(payload)))
            elif kind == RST_STREAM:
                s = self.streams.pop(sid, None)
                if s is not None and s.task is not None:
                    s.task.cancel()
                self.server.stream_closed()
            elif kind == GOAWAY:
                self.goaway = True
                if not self.streams:
                    self.transport.close()
            elif kind == PUSH_PROMISE:
                raise _ConnectionError(PROTOCOL_ERROR, "a client may not push")
            # PRIORITY and unknown frame types are ignored (RFC 9113 5.5)
        return pos

    def _fail(self, code: int, message: str) -> None:
        log.info("gRPC connection closed: %s", message)
        self.transport.write(frame(GOAWAY, 0, 0, struct.pack(">II", self.last_id, code) + message.encode()[:200]))
        self.transport.close()

    def _on_data(self, sid: int, flags: int, payload: memoryview) -> None:
        if flags & PADDED:
            self.received += 1 + payload[0]  # the padding counts against the window
            payload = payload[1 : len(payload) - payload[0]]
        self._data_chunk(sid, payload)
        if flags & END_STREAM:
            self._data_end(sid)

    def _data_chunk(self, sid: int, payload: memoryview) -> None:
        """Bytes of a stream's request message, as they arrive (a slice of an immutable read, kept as is)."""
        self.received += len(payload)
        if self.received >= CONN_WINDOW // 2:
            self.transport.write(frame(WINDOW_UPDATE, 0, 0, _HEAD.pack(self.received)))
            self.received = 0
        s = self.streams.get(sid)
        if s is None or s.answered:
            if sid > self.last_id:
                raise _ConnectionError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # a stream reset or refused: its data is dropped
        if not payload:
            return
        s.chunks.append(payload)
        s.filled += len(payload)
        if s.expect:
            if s.filled > s.expect:
                self._refuse(s, grpc.StatusCode.INTERNAL, "a unary call must carry exactly one request message")
            return
        if s.filled < 5:
            return
        head = s.chunks[0] if len(s.chunks[0]) >= 5 else b"".join(s.chunks)
        limit = self.server.max_message_bytes
        declared = _HEAD.unpack_from(head, 1)[0]
        if declared > limit:
            self._refuse(s, grpc.StatusCode.RESOURCE_EXHAUSTED, f"Received message larger than max ({declared} vs. "
                                                                f"{limit})")
        elif s.filled > declared + 5:
            self._refuse(s, grpc.StatusCode.INTERNAL, "a unary call must carry exactly one request message")
        else:
            s.expect = declared + 5

    def _data_end(self, sid: int) -> None:
        s = self.streams.get(sid)
        if s is not None and not s.answered:
            self._request_complete(s)

    def _on_headers(self, sid: int, flags: int, payload: memoryview) -> None:
        start, end = 0, len(payload)
        if flags & PADDED:
            start, end = 1, end - payload[0]
        if flags & PRIORITY_FLAG:
            start += 5
        if start > end:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS padding exceeds the frame")
        if flags & END_HEADERS:
            self._header_block(sid, flags, bytes(payload[start:end]))
        else:
            self.continuing = (sid, flags, bytearray(payload[start:end]))

    def _on_continuation(self, sid: int, flags: int, payload: memoryview) -> None:
        if self.continuing is None or self.continuing[0] != sid:
            raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        block = self.continuing[2]
        block += payload
        if len(block) > MAX_HEADER_LIST * 2:
            raise _ConnectionError(PROTOCOL_ERROR, "header block too large")
        if flags & END_HEADERS:
            first_flags = self.continuing[1]  # END_STREAM rides on the HEADERS frame
            self.continuing = None
            self._header_block(sid, first_flags, bytes(block))

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        try:
            headers = self.decoder.decode(block)
        except HPACKError as e:
            raise _ConnectionError(COMPRESSION_ERROR, str(e)) from None
        s = self.streams.get(sid)
        if s is not None or sid <= self.last_id:  # trailers from the client (gRPC clients send none)
            if s is not None and flags & END_STREAM and not s.answered:
                self._request_complete(s)
            return
        if sid % 2 == 0:
            raise _ConnectionError(PROTOCOL_ERROR, f"a client stream with an even id ({sid})")
        self.last_id = sid
        if self.goaway or self.server.closing or len(self.streams) >= MAX_STREAMS:
            self.transport.write(frame(RST_STREAM, 0, sid, _HEAD.pack(REFUSED_STREAM)))
            return
        cached = self.scanned.get(id(headers))
        if cached is not None and cached[0] is headers:
            path, method, ctype, timeout, encoding = cached[1]
        else:
            path, method, ctype, timeout, encoding = scan = _scan(headers)
            if len(self.scanned) >= KEPT_BLOCKS:
                self.scanned.clear()
            self.scanned[id(headers)] = (headers, scan)
        deadline = None if timeout is None else _deadline(timeout)
        s = _Stream(sid, path, headers, deadline, encoding, self.peer_window)
        self.streams[sid] = s
        if method != b"POST" or not ctype.startswith(b"application/grpc"):
            status = b"405" if method != b"POST" else b"415"
            self._end(s, frame(HEADERS, END_HEADERS | END_STREAM, sid,
                               b"\x08" + encode_int(len(status), 7) + status))  # :status by name index 8
            return
        if flags & END_STREAM:
            self._request_complete(s)

    def _on_window_update(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        inc = _HEAD.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            self.conn_send_window += inc
            self._flush_all()
        else:
            s = self.streams.get(sid)
            if s is not None:
                s.send_window += inc
                self._flush(s)

    def _on_settings(self, flags: int, payload: memoryview) -> None:
        if flags & ACK:
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS of the wrong size")
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == 0x4:
                if value > 2**31 - 1:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "initial window too large")
                delta, self.peer_window = value - self.peer_window, value
                for s in self.streams.values():
                    s.send_window += delta
            elif key == 0x5:
                if not 16384 <= value <= 2**24 - 1:
                    raise _ConnectionError(PROTOCOL_ERROR, f"max frame size {value}")
                self.peer_max_frame = value
        self.transport.write(frame(SETTINGS, ACK, 0))
        self._flush_all()

    # --- a call
    def _request_complete(self, s: _Stream) -> None:
        s.answered = True
        if not s.expect:
            self._refuse(s, grpc.StatusCode.INTERNAL, "the call carried no request message")
            return
        if s.filled != s.expect:
            self._refuse(s, grpc.StatusCode.INTERNAL, "a unary call must carry exactly one request message")
            return
        chunks = s.chunks
        s.chunks = []
        if len(chunks) == 1:
            body = chunks[0]
        elif s.filled < POOL_MIN:
            body = memoryview(b"".join(chunks))
        else:  # joined once, into a buffer a finished call gave back (fresh memory costs a page fault per 4 KiB)
            s.pooled = self.server.buffer(s.filled)
            pos = 0
            for c in chunks:
                s.pooled[pos : pos + len(c)] = c
                pos += len(c)
            body = memoryview(s.pooled)[: s.filled]
        message: bytes | memoryview = body[5:]  # protobuf parses from a buffer: no copy
        if body[0]:
            try:
                message = self._decompress(s.encoding, message)
            except _Refusal as r:
                self._refuse(s, r.code, str(r))
                return
        handler = self.server.handlers.get(s.path)
        if handler is None:
            self._refuse(s, grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {s.path.decode('latin-1')}")
            return
        kept = self.scanned.get(id(s.headers))
        if s.pooled is None and not body[0] and kept is not None and kept[0] is s.headers:
            self.called = (s.id, s.headers, kept[1][3])  # the call data_received may keep the layout of (_learn)
        call = self._call_pooled(s, handler, message) if s.pooled is not None else self._call(s, handler, message)
        # eager: run here up to its first wait, so that a call answered without waiting costs no task, no loop turn
        s.task = start_eagerly(self.loop, call) if self.server.eager else self.loop.create_task(call)

    async def _call_pooled(self, s: _Stream, handler: Handler, message: bytes | memoryview) -> None:
        """`_call`, then the message's buffer goes back to the pool (when nothing holds a view of it)."""
        try:
            await self._call(s, handler, message)
        finally:
            if isinstance(message, memoryview):
                try:
                    message.release()
                except BufferError:  # the handler kept something made from it: the buffer stays theirs
                    pass
            buf, s.pooled = s.pooled, None
            if buf is not None:
                self.server.give_back(buf)

    def _decompress(self, encoding: bytes, message: bytes | memoryview) -> bytes:
        if encoding not in (b"gzip", b"deflate"):
            raise _Refusal(grpc.StatusCode.UNIMPLEMENTED, f"grpc-encoding {encoding.decode('latin-1')!r} is not "
                           "supported (identity, gzip, deflate)")
        limit = self.server.max_message_bytes
        d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == b"gzip" else zlib.MAX_WBITS)
        try:
            out = d.decompress(message, limit + 1)
        except zlib.error as e:
            raise _Refusal(grpc.StatusCode.INTERNAL,
                           f"the {encoding.decode()} message does not decompress: {e}") from None
        if len(out) > limit:
            raise _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"Received message larger than max (more than {limit} vs. {limit}) once decompressed")
        return out

    async def _call(self, s: _Stream, handler: Handler, message: bytes | memoryview) -> None:
        ctx = CallContext(s.deadline, s.headers, self)
        try:
            answer = await handler(message, ctx)
        except AbortError as a:
            self._end(s, self._headers_frames(s.id, status_block(a.code, a.details, a.trailing)))
            return
        except asyncio.CancelledError:
            return  # reset by the client, its connection lost, or the grace period over
        except Exception as e:  # a handler's bug: the call fails, the server serves on
            log.exception("gRPC handler for %s failed", s.path.decode("latin-1"))
            self._end(s, self._headers_frames(s.id, status_block(grpc.StatusCode.UNKNOWN,
                                                                 f"Unexpected {type(e).__name__}: {e}")))
            return
        if self.closed or s.id not in self.streams:
            return
        n = len(answer) + 5
        if not ctx.initial and not ctx.trailing and n < 65536 and n <= self.peer_max_frame and \
                n <= s.send_window and n <= self.conn_send_window:
            # the usual answer: HEADERS, DATA and the OK trailers, laid out by one struct, in one write
            s.send_window -= n
            self.conn_send_window -= n
            sid = s.id
            self._end(s, b"".join((
                _OK_HEAD.pack(_OK_HEAD_FRAME, sid, _RESPONSE_HEADERS, n >> 16, n & 0xFFFF, DATA << 8, sid, 0, n - 5),
                answer, _OK_TAIL.pack(_OK_TAIL_FRAME, sid, _OK_TRAILERS))))
            return
        if ctx.initial:
            head = self._headers_frames(s.id, _RESPONSE_HEADERS + metadata_block(ctx.initial), end=False)
        else:
            head = frame(HEADERS, END_HEADERS, s.id, _RESPONSE_HEADERS)
        if ctx.trailing:
            trailers = self._headers_frames(s.id, _OK_TRAILERS + metadata_block(ctx.trailing))
        else:
            trailers = frame(HEADERS, END_HEADERS | END_STREAM, s.id, _OK_TRAILERS)
        if n <= self.peer_max_frame and n <= s.send_window and n <= self.conn_send_window:
            s.send_window -= n
            self.conn_send_window -= n
            data_head = _frame_head(DATA, 0, s.id, n) + b"\0"
            if n < 65536:
                self._end(s, b"".join((head, data_head, _HEAD.pack(n - 5), answer, trailers)))
            else:
                self.transport.writelines((head, data_head, _HEAD.pack(n - 5), answer))
                self._end(s, trailers)
            return
        self.transport.write(head)
        s.head, s.pending = b"\0" + _HEAD.pack(n - 5), memoryview(answer)
        s.trailers = trailers
        self._flush(s)

    def _flush_all(self) -> None:
        for s in [s for s in self.streams.values() if s.pending is not None]:
            self._flush(s)

    def _flush(self, s: _Stream) -> None:
        """Send what the flow-control windows allow of an answer's data, in one write; its trailers once all is sent."""
        if s.pending is None:
            return
        room = min(s.send_window, self.conn_send_window)
        out, s.head, data, taken = data_frames(s.id, s.head, s.pending, room, self.peer_max_frame)
        if out:
            self.transport.writelines(out)
        s.send_window -= taken
        self.conn_send_window -= taken
        s.pending = data if data or s.head else None
        if s.pending is None:
            self._end(s, s.trailers)

    def _headers_frames(self, sid: int, block: bytes, end: bool = True) -> bytes:
        """A header block (ending the stream unless not `end`), split into HEADERS + CONTINUATION by the
        peer's frame size."""
        size = self.peer_max_frame
        flags = END_STREAM if end else 0
        if len(block) <= size:
            return frame(HEADERS, END_HEADERS | flags, sid, block)
        parts = [block[i : i + size] for i in range(0, len(block), size)]
        out = [frame(HEADERS, flags, sid, parts[0])]
        out += [frame(CONTINUATION, 0, sid, p) for p in parts[1:-1]]
        out.append(frame(CONTINUATION, END_HEADERS, sid, parts[-1]))
        return b"".join(out)

    def _refuse(self, s: _Stream, code: grpc.StatusCode, details: str) -> None:
        """Answer a call that will not run; RST_STREAM(NO_ERROR) stops a client still sending its request."""
        incomplete = not s.answered
        s.answered = True
        s.chunks = []
        out = self._headers_frames(s.id, status_block(code, details))
        if incomplete:
            out += frame(RST_STREAM, 0, s.id, _HEAD.pack(NO_ERROR))
        self._end(s, out)

    def _end(self, s: _Stream, out: bytes) -> None:
        if not self.closed:
            self.transport.write(out)
        if self.streams.pop(s.id, None) is not None:
            self.server.stream_closed()
        if self.goaway and not self.streams and not self.closed:
            self.transport.close()


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _scan(headers: Fields) -> tuple[bytes, bytes, bytes, bytes | None, bytes]:
    """(:path, :method, content-type, grpc-timeout or None, grpc-encoding) of a request's header block."""
    method = path = ctype = encoding = b""
    timeout = None
    for name, value in headers:
        if name == b":path":
            path = value
        elif name == b":method":
            method = value
        elif name == b"content-type":
            ctype = value
        elif name == b"grpc-timeout":
            timeout = value
        elif name == b"grpc-encoding":
            encoding = value
    return path, method, ctype, timeout, encoding


def _deadline(value: bytes) -> float | None:
    """grpc-timeout (`<digits><unit>`) as a time.monotonic() deadline; None when it does not parse."""
    if len(value) < 2 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    return None if unit is None else time.monotonic() + int(value[:-1]) * unit


class GRPCTransportServer:
    """Serves `handlers` (full method path, e.g. b"/inference.GRPCInferenceService/ModelInfer" → handler);
    the same start/stop as GRPCListener. A request message over `max_message_bytes` is RESOURCE_EXHAUSTED.
    `eager`: a call starts where its message completes, a task taking over only where it waits (eager.py): for
    handlers that need no `asyncio.current_task()` before their first wait (`asyncio.timeout` does)."""

    def __init__(self, handlers: dict[bytes, Handler], max_message_bytes: int, eager: bool = False):
        self.handlers = handlers
        self.eager = eager
        self.max_message_bytes = max_message_bytes
        self.connections: set[_Connection] = set()
        self._spare: list[bytearray] = []  # message buffers free for reuse (POOL_*)
        self.closing = False
        self._server: asyncio.Server | None = None
        self._idle: asyncio.Event | None = None

    async def start(self, host: str, port: int, ssl: SSLContext | None = None) -> int:
        """Bind and start (TLS with `ssl`, whose ALPN must offer h2); returns the bound port. OSError when the
        port cannot be bound."""
        loop = asyncio.get_running_loop()
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self._server = await loop.create_server(lambda: _Connection(self), host, port, reuse_port=False, ssl=ssl)
        except OSError as e:
            raise OSError(e.errno, f"cannot listen for gRPC on {address}") from None
        return self._server.sockets[0].getsockname()[1]

    def buffer(self, n: int) -> bytearray:
        """A buffer of at least `n` bytes: one a finished call gave back, or a new one."""
        for i, b in enumerate(self._spare):
            if len(b) >= n:
                return self._spare.pop(i)
        return bytearray(n)

    def give_back(self, buf: bytearray) -> None:
        """Keep `buf` for a later message, unless something still holds a view of it (a handler kept the
        message, a write not yet flushed): a bytearray with views cannot be resized, which is the test."""
        if len(buf) > POOL_MAX or len(self._spare) >= POOL_BUFFERS:
            return
        try:
            buf.append(0)
        except BufferError:
            return
        del buf[-1]
        self._spare.append(buf)

    def stream_closed(self) -> None:
        if self._idle is not None and not any(c.streams for c in self.connections):
            self._idle.set()

    async def stop(self, grace_s: float) -> None:
        """Refuse new connections and calls at once, let those in flight finish within `grace_s`, then cancel them."""
        if self._server is None:
            return
        self.closing = True
        self._server.close()
        self._idle = asyncio.Event()
        for c in list(self.connections):
            c.close_gracefully()
        self.stream_closed()
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            pass
        for c in list(self.connections):
            for s in list(c.streams.values()):
                if s.task is not None:
                    s.task.cancel()
            c.transport.close()
        self._server = None

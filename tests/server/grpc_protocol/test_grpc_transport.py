"""The gRPC transport of our own (inference_server/grpc/transport.py) with real grpc clients: what
grpc.aio gave for free must still hold. A compressed request gets the uncompressed one's answer; an
answer larger than the client's flow-control window arrives whole; many calls at once on one
connection each get their own answer; a client that is not HTTP/2 is closed and the server serves on;
and CAFFESERVE_GRPC_TRANSPORT=grpcio serves the same answers on grpc.aio."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import caffe
import grpc
import numpy as np
import pytest
from caffe import layers as L

from caffe_testing.grpc import OIPClient, grpc_server, infer_request, output
from caffe_testing.nets import forward, save_net
from caffe_testing.servers import free_port
from inference_server.grpc import messages as pb
from inference_server.grpc.transport import GRPCTransportServer

WIDE = 40000  # output floats: 160 kB, over the 64 KiB window a client has without BDP probing


@pytest.fixture(scope="module")
def net_files(tmp_model_dir):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4]))
    n.ip = L.InnerProduct(n.data, num_output=WIDE, weight_filler=dict(type="gaussian", std=0.1))
    return save_net(n, tmp_model_dir, "wide")


@pytest.fixture(scope="module", params=["h2", "grpcio"])
def server(request, net_files, tmp_model_dir):
    proto, weights = net_files
    cfg = {"name": "wide", "model": {"prototxt": str(proto), "weights": str(weights)}, "backend": "pycaffe"}
    with grpc_server(cfg, tmp_model_dir, env={"CAFFESERVE_GRPC_TRANSPORT": request.param}) as s:
        yield s


def x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (1, 4)).astype(np.float32)


def expected(net_files, a: np.ndarray) -> np.ndarray:
    return forward(*net_files, {"data": a})["ip"]


def test_an_answer_over_the_clients_window_arrives_whole(server, net_files):
    client = OIPClient(server.grpc_port)
    small = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=[
        ("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 1 << 24)])
    stub = small.unary_unary(f"/{pb.SERVICE}/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                             response_deserializer=pb.ModelInferResponse.FromString)
    for i in range(3):
        got = output(stub(infer_request("wide", {"data": x(i)}), timeout=30), "ip")
        assert got.shape == (1, WIDE)
        assert np.abs(got - expected(net_files, x(i))).max() <= 1e-5
    small.close()
    client.close()


def test_a_gzip_request_gets_the_same_answer(server, net_files):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", compression=grpc.Compression.Gzip,
                                    options=[("grpc.max_receive_message_length", 1 << 24)])
    stub = channel.unary_unary(f"/{pb.SERVICE}/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                               response_deserializer=pb.ModelInferResponse.FromString)
    got = output(stub(infer_request("wide", {"data": x(7)}), timeout=30), "ip")
    assert np.abs(got - expected(net_files, x(7))).max() <= 1e-5
    channel.close()


def test_many_calls_at_once_on_one_connection_each_get_their_own_answer(server, net_files):
    client = OIPClient(server.grpc_port)  # one channel: one HTTP/2 connection, the calls are its streams
    futures = [client.stubs["ModelInfer"].future(infer_request("wide", {"data": x(i)}), timeout=30) for i in range(16)]
    for i, f in enumerate(futures):
        assert np.abs(output(f.result(), "ip") - expected(net_files, x(i))).max() <= 1e-5
    with ThreadPoolExecutor(4) as pool:  # and from several threads at once
        answers = list(pool.map(lambda i: output(client.infer(infer_request("wide", {"data": x(i)})), "ip"),
                                range(8)))
    for i, got in enumerate(answers):
        assert np.abs(got - expected(net_files, x(i))).max() <= 1e-5
    client.close()


def test_an_http1_client_is_closed_and_the_server_serves_on(server, net_files):
    with socket.create_connection(("127.0.0.1", server.grpc_port), timeout=10) as s:
        s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            while s.recv(4096):  # grpc.aio answers with its SETTINGS then closes; ours closes at once
                pass
        except ConnectionResetError:
            pass
    client = OIPClient(server.grpc_port)
    assert client.call("ServerReady", pb.ServerReadyRequest()).ready
    assert output(client.infer(infer_request("wide", {"data": x(1)})), "ip").shape == (1, WIDE)
    client.close()


def _transport_server(handlers: dict, max_message_bytes: int, eager: bool = False) -> int:
    """The transport alone (no model) on a loop of its own in a thread; its port."""
    port = free_port()
    started = threading.Event()

    async def serve():
        await GRPCTransportServer(handlers, max_message_bytes, eager=eager).start("127.0.0.1", port)
        started.set()
        await asyncio.Event().wait()

    threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()
    assert started.wait(30)
    return port


async def _sha256(data, context) -> bytes:
    return hashlib.sha256(bytes(data)).digest()


def _digest_answer(sock, sid: int) -> tuple[bytes, bytes]:
    """(the sha256 answered on stream `sid` by `_sha256`, every byte read until it), from a raw HTTP/2 socket."""
    marker = _answer_head(sid)
    data = b""
    while marker not in data or b"grpc-status" not in data[data.index(marker):]:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    at = data.index(marker)
    return data[at + 14 : at + 46], data


def _answer_head(sid: int) -> bytes:
    """The head of `_sha256`'s answer's DATA frame on `sid`: 37 bytes (the 5-byte prefix, 32 of digest)."""
    from inference_server.grpc.transport import DATA

    return bytes((0, 0, 37, DATA, 0)) + sid.to_bytes(4, "big")


def test_request_messages_of_every_size_arrive_whole_plain_or_gzip():
    """The transport alone (a handler that answers the sha256 and length of what it got), with grpc's client:
    empty, small, over a frame, over the presized buffer, several MB, 20 at once; over the limit is
    RESOURCE_EXHAUSTED naming it, and the connection serves on. No model: the framing is under test."""
    limit = 8 << 20

    async def digest(data, context) -> bytes:
        return hashlib.sha256(bytes(data)).digest() + len(data).to_bytes(8, "big")

    port = _transport_server({b"/t.S/M": digest}, limit)
    for compression in (None, grpc.Compression.Gzip):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", compression=compression,
                                        options=[("grpc.max_send_message_length", 64 << 20)])
        stub = channel.unary_unary("/t.S/M")
        for size in (0, 1, 1000, 70_000, 600_000, 1 << 20, (1 << 20) + 1, 3_000_000, limit):
            msg = os.urandom(size)
            assert stub(msg, timeout=60) == hashlib.sha256(msg).digest() + size.to_bytes(8, "big"), size
        msgs = [os.urandom(200_000 + i) for i in range(20)]
        futures = [stub.future(m, timeout=60) for m in msgs]
        assert [f.result()[:32] for f in futures] == [hashlib.sha256(m).digest() for m in msgs]
        with pytest.raises(grpc.RpcError) as e:
            stub(os.urandom(limit + 1), timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and str(limit) in e.value.details()
        assert stub(b"abc", timeout=60)[32:] == (3).to_bytes(8, "big")
        channel.close()


def test_a_repeated_header_block_follows_the_header_table_it_refers_to():
    """The same header block bytes sent again after the client changed its HPACK table must route by the
    new table (the transport keeps the fields of repeated blocks: a stale copy would call the old method).
    A raw HTTP/2 client, since grpc's own never repeats a block across a table change on purpose."""
    from inference_server.grpc.hpack_decode import encode_int, literal
    from inference_server.grpc.transport import DATA, END_HEADERS, END_STREAM, HEADERS, PREFACE, SETTINGS, frame

    def answer(name: bytes):
        async def handler(data, context) -> bytes:
            return name
        return handler

    port = _transport_server({b"/t.S/A": answer(b"A"), b"/t.S/B": answer(b"B")}, 1 << 20)
    fixed = b"\x83\x86" + literal(b"content-type", b"application/grpc")  # POST, http, literal content-type

    def indexed_path(path: bytes) -> bytes:  # :path (static name 4), literal with incremental indexing: entry 62
        return b"\x44" + encode_int(len(path), 7) + path

    repeat = fixed + b"\xbe"  # indexed field 62: the newest entry of the table, whatever it is now
    blocks = [fixed + indexed_path(b"/t.S/A"), repeat, repeat, fixed + indexed_path(b"/t.S/B"), repeat, repeat]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        got = []
        for i, block in enumerate(blocks):
            sid = 2 * i + 1
            sock.sendall(frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, END_STREAM, sid, b"\0\0\0\0\0"))
            data = b""
            while b"grpc-status" not in data or not data.endswith(b"0"):
                chunk = sock.recv(65536)
                assert chunk, "the server closed the connection"
                data += chunk
            # the answer's DATA frame: 9-byte frame head, then the message's 5-byte prefix and the message
            at = data.index(bytes((0, 0, 6, DATA, 0)) + sid.to_bytes(4, "big"))
            got.append(data[at + 14 : at + 15])
    assert got == [b"A", b"A", b"A", b"B", b"B", b"B"]


def test_calls_whose_frames_repeat_the_last_ones_layout_get_their_own_answers(monkeypatch):
    """A client's read per call is the same bytes but for the stream id and the message (_Connection._learn):
    such calls skip the frame loop, and each must still get the answer to its own message; a stream id not
    above the last one is ignored as the frame loop ignores it (no answer), and the next call is served."""
    from inference_server.grpc import transport
    from inference_server.grpc.hpack_decode import literal
    from inference_server.grpc.transport import DATA, END_HEADERS, END_STREAM, HEADERS, PREFACE, SETTINGS, frame

    taken = []
    take = transport._Connection._take_seen
    monkeypatch.setattr(transport._Connection, "_take_seen", lambda self, seen, data: taken.append(
        take(self, seen, data)) or taken[-1])
    port = _transport_server({b"/t.S/M": _sha256}, 1 << 20, eager=True)
    block = b"\x83\x86" + literal(b":path", b"/t.S/M") + literal(b"content-type", b"application/grpc")

    def call(sid: int, message: bytes) -> bytes:
        return (frame(HEADERS, END_HEADERS, sid, block)
                + frame(DATA, END_STREAM, sid, b"\0" + len(message).to_bytes(4, "big") + message))

    messages = [os.urandom(100) for _ in range(6)]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        assert sock.recv(65536)  # the server's SETTINGS: the preface was read on its own
        got = []
        for i, m in enumerate(messages):
            sock.sendall(call(2 * i + 1, m))
            got.append(_digest_answer(sock, 2 * i + 1)[0])
        assert got == [hashlib.sha256(m).digest() for m in messages]
        assert taken.count(True) >= 3, taken  # the first calls teach the layout, the others follow it
        sock.sendall(call(3, messages[0]))  # a stream id used before: ignored
        time.sleep(0.05)  # its own read (two sends at once may arrive as one, which the frame loop takes)
        sock.sendall(call(101, messages[1]))
        digest, read = _digest_answer(sock, 101)
        assert digest == hashlib.sha256(messages[1]).digest()
        assert _answer_head(3) not in read, (read, taken)


def test_calls_that_differ_only_in_grpc_timeout_follow_the_layout_and_keep_their_own_deadlines(monkeypatch):
    """A client that sends its remaining time (the gateway: grpc-timeout per call, as a plain literal of the same
    length) repeats a block but for that value: such calls skip the frame loop too, and each call's deadline is
    its own value's. A value of that length that is not a timeout goes to the frame loop (no deadline), and the
    calls after it are served as before."""
    import struct

    from inference_server.grpc import transport
    from inference_server.grpc.hpack_decode import literal
    from inference_server.grpc.transport import DATA, END_HEADERS, END_STREAM, HEADERS, PREFACE, SETTINGS, frame

    taken = []
    take = transport._Connection._take_seen
    monkeypatch.setattr(transport._Connection, "_take_seen", lambda self, seen, data: taken.append(
        take(self, seen, data)) or taken[-1])

    async def remaining(data, context) -> bytes:  # 32 bytes, as _digest_answer reads them
        left = -1.0 if context.deadline is None else context.deadline - time.monotonic()
        return struct.pack(">d", left) + bytes(24)

    port = _transport_server({b"/t.S/M": remaining}, 1 << 20, eager=True)

    def call(sid: int, timeout: bytes) -> bytes:
        block = (b"\x83\x86" + literal(b":path", b"/t.S/M") + literal(b"grpc-timeout", timeout)
                 + literal(b"content-type", b"application/grpc"))
        return frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, END_STREAM, sid, b"\0\0\0\0\x01x")

    seconds = [20, 30, 45, 60, 75, 90]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        assert sock.recv(65536)
        left = []
        for i, n in enumerate(seconds):
            sock.sendall(call(2 * i + 1, b"%08du" % (n * 1_000_000)))
            left.append(struct.unpack(">d", _digest_answer(sock, 2 * i + 1)[0][:8])[0])
        assert all(n - 2 < got <= n for n, got in zip(seconds, left, strict=True)), left
        assert taken.count(True) >= 3, taken
        sock.sendall(call(101, b"2000000xu"))  # the same length, not a timeout
        assert struct.unpack(">d", _digest_answer(sock, 101)[0][:8])[0] == -1.0 and taken[-1] is False
        sock.sendall(call(103, b"%08du" % 15_000_000))
        assert 13 < struct.unpack(">d", _digest_answer(sock, 103)[0][:8])[0] <= 15


def test_a_call_whose_message_comes_after_many_other_calls_header_blocks_is_answered():
    """Stream 1 sends its headers, then 20 other calls with header blocks of their own (more than a connection
    keeps the scans of) come and go before stream 1's message: stream 1 is still answered."""
    from inference_server.grpc.hpack_decode import literal
    from inference_server.grpc.transport import DATA, END_HEADERS, END_STREAM, HEADERS, PREFACE, SETTINGS, frame

    port = _transport_server({b"/t.S/M": _sha256}, 1 << 20, eager=True)

    def block(n: int) -> bytes:
        return (b"\x83\x86" + literal(b":path", b"/t.S/M") + literal(b"content-type", b"application/grpc")
                + literal(b"x-n", str(n).encode()))

    def message(sid: int, m: bytes) -> bytes:
        return frame(DATA, END_STREAM, sid, b"\0" + len(m).to_bytes(4, "big") + m)

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        sock.sendall(frame(HEADERS, END_HEADERS, 1, block(0)))
        for i in range(1, 21):
            sock.sendall(frame(HEADERS, END_HEADERS, 2 * i + 1, block(i)) + message(2 * i + 1, b"other"))
        sock.sendall(message(1, b"first"))
        assert _digest_answer(sock, 1)[0] == hashlib.sha256(b"first").digest()

"""gRPC through the gateway (`caffeserve gateway --grpc-port`), in front of real `caffeserve serve` processes.

tritonclient.grpc runs in its own process (tests/gateway/clients/): its stubs and ours
(inference_server.grpc.messages, used here through caffe_testing.grpc) must not share one. One test
puts a plain grpc server of the test's own behind the gateway, standing in for a model server,
because it must see exactly which bytes and metadata arrive (no real server reports that).
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from caffe_gateway.grpc_proxy import Malformed, model_name
from caffe_testing.digits import digits_data
from caffe_testing.gateway import IMAGES, LABELS, GatewayProcess, digits_config, metric, slow_config, static
from caffe_testing.grpc import OIPClient, assert_status, grpc_server, infer_request, output
from caffe_testing.servers import free_port
from inference_server.grpc import messages as pb

CLIENTS = Path(__file__).resolve().parent / "clients"


def digits_request(i: int, **kw):
    return infer_request("digits", {"data": digits_data.to_blob(IMAGES[i:i + 1])}, **kw)


def grpc_count(server, code: str = "OK") -> float:
    return metric(server.url, "caffeserve_grpc_requests_total", grpc_code=code)


@pytest.fixture(scope="module")
def grpc_gateway(grpc_servers):
    with GatewayProcess("--static", static("digits", *grpc_servers)) as g:
        yield g


# --------------------------------------------------------------------------- the model name


def test_the_model_name_is_read_without_decoding_the_tensors():
    msg = infer_request("digits", {"data": np.ones((2, 1, 8, 8), np.float32)}, version="1", request_id="r")
    data = msg.SerializeToString()
    assert model_name(data) == "digits"
    assert model_name(pb.ModelReadyRequest(name="m", version="2").SerializeToString()) == "m"
    assert model_name(pb.ModelMetadataRequest().SerializeToString()) == ""
    assert model_name(b"\x0a\x01a" + data) == "digits"  # the last occurrence wins, as protobuf says
    for bad in (data[:-3], b"\x0a\x05ab", b"\xff", b"\x0b", b"\x0a\x02\xff\xfe"):
        with pytest.raises(Malformed):
            model_name(bad)


# --------------------------------------------------------------------------- standard clients


def test_tritonclient_grpc_works_through_the_gateway_unchanged(grpc_servers, grpc_gateway, tmp_path):
    n = 40
    pngs = []
    for img in IMAGES[:n]:
        buf = io.BytesIO()
        digits_data.render(img).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    cases = tmp_path / "cases.npz"
    np.savez(cases, x=digits_data.to_blob(IMAGES[:n]), labels=LABELS[:n], png=np.array(pngs, dtype=object))
    before = [grpc_count(s) for s in grpc_servers]
    r = subprocess.run([sys.executable, str(CLIENTS / "triton_via_gateway.py"), str(grpc_gateway.grpc_port),
                        str(cases)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), f"{r.stdout}\n{r.stderr}"
    spread = [grpc_count(s) - b for s, b in zip(grpc_servers, before, strict=True)]
    assert sum(spread) == n + 9 and min(spread) >= 5, f"ModelInfer calls per server: {spread}"
    assert metric(grpc_gateway.url, "caffeserve_gateway_grpc_requests_total", model="digits", method="ModelInfer",
                  grpc_code="OK") >= n + 9


def test_unknown_model_is_not_found_and_model_ready_is_false(grpc_gateway):
    client = OIPClient(grpc_gateway.grpc_port)
    try:
        err = client.error("ModelInfer", infer_request("nope", {"data": np.zeros((1, 1, 8, 8), np.float32)}))
        assert_status(err, grpc.StatusCode.NOT_FOUND, "model 'nope' is not known to the gateway")
        err = client.error("ModelMetadata", pb.ModelMetadataRequest(name="nope"))
        assert_status(err, grpc.StatusCode.NOT_FOUND, "'nope'")
        assert not client.call("ModelReady", pb.ModelReadyRequest(name="nope")).ready
        assert client.call("ModelReady", pb.ModelReadyRequest(name="digits")).ready
        assert_status(_raw_error(client, "ModelInfer", b"\xff"), grpc.StatusCode.INVALID_ARGUMENT,
                      "malformed ModelInferRequest")
        assert_status(_raw_error(client, "SystemSharedMemoryStatus", b""), grpc.StatusCode.UNIMPLEMENTED)
        # typed contents and the server's own version errors pass through the same way
        resp = client.infer(digits_request(0, raw=False))
        assert int(np.argmax(output(resp, "prob"))) == LABELS[0]
        assert_status(client.error("ModelInfer", infer_request("digits", {"data": np.zeros((1, 1, 8, 8), np.float32)},
                                                               version="9")), grpc.StatusCode.NOT_FOUND, "9")
        # a status message beyond ASCII crosses both hops (percent-encoded on each) as the server wrote it
        err = client.error("ModelInfer", infer_request("digits", {"dätä": np.zeros((1, 1, 8, 8), np.float32)}))
        assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "dätä")
    finally:
        client.close()


def _raw_error(client: OIPClient, method: str, data: bytes) -> grpc.RpcError:
    try:
        client.call_raw(method, data, timeout=10)
    except grpc.RpcError as e:
        return e
    raise AssertionError(f"{method} succeeded")


# --------------------------------------------------------------------------- large messages


@pytest.mark.parametrize("server_transport", ["h2", "grpcio"])
def test_a_large_batch_through_the_gateway_answers_as_direct_with_a_small_client_window(tmp_path, server_transport):
    """A 1 MiB request and its 160 kB answer cross the gateway whole, whichever transport the server runs
    (a grpc.aio server opens with a 64 KiB window: the gateway's request waits for its updates), and a
    client whose window stays at 64 KiB (no BDP probe) reads the answer as the gateway sends it in turns."""
    n = 4096
    x = np.concatenate([digits_data.to_blob(IMAGES[:64])] * (n // 64))
    request = infer_request("digits", {"data": x})
    assert request.ByteSize() > 1 << 20
    config = digits_config(limits={"maxBatch": n})
    with grpc_server(config, tmp_path, env={"CAFFESERVE_GRPC_TRANSPORT": server_transport}) as server, \
            GatewayProcess("--static", static("digits", server)) as gw:
        direct = OIPClient(server.grpc_port)
        expected = output(direct.infer(request), "prob")
        direct.close()
        channel = grpc.insecure_channel(f"127.0.0.1:{gw.grpc_port}", options=[
            ("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 64 << 20)])
        call = channel.unary_unary(f"/{pb.SERVICE}/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        try:
            for _ in range(3):  # the connection's windows after a large call let the next one through too
                got = output(call(request, timeout=30), "prob")
                assert got.shape == (n, 10) and np.array_equal(got, expected)
            assert list(got[:64].argmax(1)) == list(LABELS[:64])
        finally:
            channel.close()


def _read_frame(sock) -> tuple[int, int, int, bytes]:
    """One HTTP/2 frame: (type, flags, stream, payload)."""
    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            assert chunk, "the gateway closed the connection"
            out += chunk
        return out

    head = exactly(9)
    length = int.from_bytes(head[:3], "big")
    return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, exactly(length)


def test_a_slow_reader_gets_its_whole_answer_and_holds_up_no_one(grpc_gateway):
    """A client that lets the gateway send only 100 bytes of its answer (HTTP/2 flow control, spoken here
    by hand over a socket: no gRPC library lets a test hold its window) gets those, then the rest once it
    reads on; meanwhile another client's calls are answered."""
    import socket
    import struct

    from inference_server.grpc import transport as h2
    from inference_server.grpc.hpack_decode import HeaderDecoder, literal

    x = digits_data.to_blob(IMAGES[:64])
    msg = infer_request("digits", {"data": x}).SerializeToString()
    block = b"\x83\x86" + b"".join(literal(k, v) for k, v in (
        (b":path", f"/{pb.SERVICE}/ModelInfer".encode()), (b":authority", b"gateway"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers")))
    with socket.create_connection(("127.0.0.1", grpc_gateway.grpc_port), timeout=10) as sock:
        sock.sendall(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0, struct.pack(">HI", 0x4, 100))  # 100-byte windows
                     + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, block)
                     + h2.frame(h2.DATA, h2.END_STREAM, 1, b"\0" + struct.pack(">I", len(msg)) + msg))
        decoder, data, fields, done = HeaderDecoder(), b"", [], False

        def read_until(stop) -> None:
            nonlocal data, done
            while not stop():
                kind, flags, sid, payload = _read_frame(sock)
                if kind == h2.SETTINGS and not flags & h2.ACK:
                    sock.sendall(h2.frame(h2.SETTINGS, h2.ACK, 0))
                elif kind == h2.HEADERS and sid == 1:
                    fields.extend(decoder.decode(payload))
                    done = bool(flags & h2.END_STREAM)
                elif kind == h2.DATA and sid == 1:
                    data += payload

        read_until(lambda: len(data) >= 100)
        assert len(data) == 100 and not done
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):  # nothing more until the client reads on
            read_until(lambda: False)
        other = OIPClient(grpc_gateway.grpc_port)  # the gateway serves others meanwhile
        try:
            assert int(np.argmax(output(other.infer(digits_request(5)), "prob"))) == LABELS[5]
        finally:
            other.close()
        sock.settimeout(10)
        sock.sendall(h2.frame(h2.WINDOW_UPDATE, 0, 1, struct.pack(">I", 1 << 20))
                     + h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20)))
        read_until(lambda: done)
    assert (b"grpc-status", b"0") in fields
    answer = pb.ModelInferResponse.FromString(data[5:])
    assert int.from_bytes(data[1:5], "big") == len(data) - 5
    probs = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(64, -1)
    assert list(probs.argmax(1)) == list(LABELS[:64])


# --------------------------------------------------------------------------- bytes and metadata


class _Recorder:
    """A grpc server of the test's own in place of a model server: records what arrives, answers set bytes."""

    def __init__(self):
        self.calls: list[tuple[str, bytes, dict, float | None]] = []
        self.answer = b"\x0a\x06digits" + b"\xfa\x07\x03xyz"  # model_name + a field no proto defines
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        handler = grpc.unary_unary_rpc_method_handler(self._infer)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            pb.SERVICE, {"ModelInfer": handler, "ModelMetadata": handler}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _infer(self, data: bytes, context):
        self.calls.append((context._rpc_event.call_details.method.decode(), data, dict(context.invocation_metadata()),
                           context.time_remaining()))
        context.send_initial_metadata((("x-served-by", "recorder"),))
        context.set_trailing_metadata((("x-trailer", "t"), ("x-trailer-bin", b"\x00\x01")))
        return self.answer


def test_bytes_and_metadata_pass_through_unchanged_and_the_deadline_is_passed_on():
    rec = _Recorder()
    rest = free_port()  # no REST server: the gateway only forwards gRPC here
    try:
        with GatewayProcess("--static", f"digits=http://127.0.0.1:{rest}?grpc={rec.port}") as gw:
            msg = infer_request("digits", {"data": np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)})
            sent = msg.SerializeToString() + b"\xf8\x07\x2a"  # plus field 127 (varint 42), unknown to any proto
            channel = grpc.insecure_channel(f"127.0.0.1:{gw.grpc_port}")
            call = channel.unary_unary(f"/{pb.SERVICE}/ModelInfer")
            answer, c = call.with_call(sent, timeout=7, metadata=(("x-request-id", "abc"), ("traceparent", "00-1-2-01"),
                                                                  ("x-custom-bin", b"\x00\xff")))
            assert answer == rec.answer  # not re-encoded (a decode and encode would drop the unknown field)
            method, got, md, left = rec.calls[-1]
            assert method == f"/{pb.SERVICE}/ModelInfer" and got == sent
            assert md["x-request-id"] == "abc" and md["traceparent"] == "00-1-2-01"
            assert md["x-custom-bin"] == b"\x00\xff"
            assert md["x-forwarded-for"] == "127.0.0.1"
            assert left is not None and 5 < left <= 7, left  # the client's deadline, less the time spent
            assert dict(c.initial_metadata())["x-served-by"] == "recorder"
            trailers = dict(c.trailing_metadata())
            assert trailers["x-trailer"] == "t" and trailers["x-trailer-bin"] == b"\x00\x01"
            channel.close()
    finally:
        rec.server.stop(0)


# --------------------------------------------------------------------------- failures


def test_a_dead_replica_is_retried_on_a_live_one(grpc_servers):
    dead = free_port(), free_port()  # nothing listens on either
    spec = static("digits", grpc_servers[0]) + f",http://127.0.0.1:{dead[0]}?grpc={dead[1]}"
    with GatewayProcess("--static", spec) as gw:
        client = OIPClient(gw.grpc_port)
        try:
            for i in range(30):
                resp = client.infer(digits_request(i))
                assert int(np.argmax(output(resp, "prob"))) == LABELS[i] or i > 3  # a few may be misread
            assert metric(gw.url, "caffeserve_gateway_retries_total", model="digits") >= 1
            assert metric(gw.url, "caffeserve_gateway_grpc_requests_total", model="digits", grpc_code="OK") == 30
        finally:
            client.close()


def test_a_model_whose_servers_cannot_be_reached_is_unavailable_with_retry_info():
    dead = f"digits=http://127.0.0.1:{free_port()}?grpc={free_port()}"
    with GatewayProcess("--static", dead) as gw:
        client = OIPClient(gw.grpc_port)
        err = client.error("ModelInfer", digits_request(0))
        assert_status(err, grpc.StatusCode.UNAVAILABLE, "cannot reach model 'digits'")
        trailers = dict(err.trailing_metadata())
        assert trailers["retry-after"] == "1" and trailers["grpc-retry-pushback-ms"] == "1000"
        status = pb.Status.FromString(trailers["grpc-status-details-bin"])
        assert pb.RetryInfo.FromString(status.details[0].value).retry_delay.seconds == 1
        client.close()


def test_a_model_served_without_grpc_is_unimplemented(grpc_servers):
    with GatewayProcess("--static", f"digits={grpc_servers[0].url}") as gw:  # no ?grpc=: REST only
        client = OIPClient(gw.grpc_port)
        assert_status(client.error("ModelInfer", digits_request(0)), grpc.StatusCode.UNIMPLEMENTED,
                      "not served over gRPC")
        client.close()


def test_deadlines_the_clients_the_gateways_and_one_passed_in_the_queue_is_never_forwarded(tmp_path):
    with grpc_server(slow_config(400), tmp_path) as slow, \
            GatewayProcess("--static", static("digits", slow), "--max-concurrency", "1",
                           "--request-timeout", "0.6") as gw:
        client = OIPClient(gw.grpc_port)
        try:
            # the client's deadline, sooner than the gateway's: passed on, the server gives up too
            assert_status(client.error("ModelInfer", digits_request(0), timeout=0.2), grpc.StatusCode.DEADLINE_EXCEEDED)
            time.sleep(0.6)
            before = grpc_count(slow, "OK") + grpc_count(slow, "DEADLINE_EXCEEDED") + grpc_count(slow, "CANCELLED")
            # the gateway's: 4 at once on one slow server, one at a time
            stub = client.stubs["ModelInfer"]
            calls = [stub.future(digits_request(i), timeout=30) for i in range(4)]
            errors, ok = [], 0
            for f in calls:
                try:
                    f.result()
                    ok += 1
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (e.code(), e.details())
                    errors.append(e.details())
            assert ok == 1 and len(errors) == 3, (ok, errors)
            # never sent: its deadline passed in the queue, or just as a slot came (forward.py checks it then)
            never_sent = sum("deadline passed while waiting" in e or "deadline passed before it could be forwarded" in e
                             for e in errors)
            assert never_sent >= 1 and sum("did not answer within" in e for e in errors) == 3 - never_sent, errors
            time.sleep(0.8)
            after = grpc_count(slow, "OK") + grpc_count(slow, "DEADLINE_EXCEEDED") + grpc_count(slow, "CANCELLED")
            assert after - before == 4 - never_sent, \
                "a call whose deadline passed in the gateway's queue reached the server"
        finally:
            client.close()


def test_overload_is_unavailable_with_retry_info(tmp_path):
    with grpc_server(slow_config(300), tmp_path) as slow, \
            GatewayProcess("--static", static("digits", slow), "--max-concurrency", "1", "--max-queue", "1") as gw:
        client = OIPClient(gw.grpc_port)
        stub = client.stubs["ModelInfer"]
        calls = [stub.future(digits_request(i), timeout=30) for i in range(6)]
        refused = []
        for f in calls:
            try:
                f.result()
            except grpc.RpcError as e:
                refused.append(e)
        assert 2 <= 6 - len(refused) <= 3 and refused
        for e in refused:
            assert_status(e, grpc.StatusCode.UNAVAILABLE, "overloaded")
            assert dict(e.trailing_metadata())["retry-after"] == "1"
        client.close()


def test_sigterm_finishes_grpc_calls_in_flight(tmp_path):
    with grpc_server(slow_config(500), tmp_path) as slow:
        gw = GatewayProcess("--static", static("digits", slow)).start()
        client = OIPClient(gw.grpc_port)
        try:
            f = client.stubs["ModelInfer"].future(digits_request(3), timeout=30)
            time.sleep(0.2)
            gw.proc.terminate()
            assert int(np.argmax(output(f.result(), "prob"))) == LABELS[3]
            assert gw.proc.wait(10) == 0
        finally:
            client.close()
            gw.stop()


# --------------------------------------------------------------------------- discovery


def test_endpointslices_and_static_lists_give_each_server_its_grpc_port():
    from caffe_gateway.discovery import parse_static, slice_endpoints

    sl = {"metadata": {"name": "m-predictor-abc", "namespace": "ml", "labels": {"caffeserving.io/model": "m"}},
          "addressType": "IPv4",
          "ports": [{"name": "grpc", "port": 8081, "protocol": "TCP"},
                    {"name": "http", "port": 8080, "protocol": "TCP"}],
          "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
                        {"addresses": ["10.0.0.2"], "conditions": {"ready": False}}]}
    assert slice_endpoints(sl) == ("m", {("10.0.0.1", 8080, 8081)})
    rest_only = {**sl, "ports": [{"name": "http", "port": 8080}]}
    assert slice_endpoints(rest_only) == ("m", {("10.0.0.1", 8080, None)})
    grpc_only = {**sl, "ports": [{"name": "grpc", "port": 8081}]}  # no REST port: not an endpoint the gateway can use
    assert slice_endpoints(grpc_only) == ("m", set())
    assert parse_static("m=http://127.0.0.1:8001?grpc=8002,127.0.0.1:8003") == (
        "m", {("127.0.0.1", 8001, 8002), ("127.0.0.1", 8003, None)})
    for bad in ("m=http://h:1?grpc=x", "m=http://h:1?grpc=70000", "m=http://h:1?foo=1", "m=http://h:1/v2"):
        with pytest.raises(ValueError):
            parse_static(bad)


def test_a_server_restarted_on_the_same_ports_is_used_again(tmp_path):
    server = grpc_server(digits_config(), tmp_path).start()
    with GatewayProcess("--static", static("digits", server), "--eject-after", "100") as gw:
        client = OIPClient(gw.grpc_port)
        try:
            assert client.infer(digits_request(0)).outputs[0].name == "prob"
            server.stop()
            assert_status(client.error("ModelInfer", digits_request(0)), grpc.StatusCode.UNAVAILABLE,
                          "cannot reach model 'digits'")
            server.start()  # the same REST and gRPC ports
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.infer(digits_request(1))
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, e.details()
                    time.sleep(0.2)
            assert time.monotonic() < deadline - 7, "the gateway took more than 3 s to use the restarted server again"
        finally:
            client.close()
            server.stop()


def test_a_grpc_port_in_use_stops_the_gateway_saying_so():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        gw = GatewayProcess("--static", "digits=http://127.0.0.1:1", "--grpc-port", str(taken.getsockname()[1]))
        with pytest.raises(RuntimeError) as e:
            gw.start(timeout=30)
    assert "exited with 2" in str(e.value) and "cannot listen for gRPC" in str(e.value), str(e.value)

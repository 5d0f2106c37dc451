"""SIGTERM: the server stops accepting, finishes the requests in flight with 200, and exits 0
within the grace period. Requests are held in flight by batching's queue delay (about 1.5 s), or
by a forward pass that takes longer than the grace period (a net of big 7×7 convolutions)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from http.client import HTTPConnection, RemoteDisconnected

import caffe
import numpy as np
import pytest
from caffe import layers as L, params as P

from caffe_testing.nets import dense_net, forward, save_net
from caffe_testing.servers import ServerProcess, http, http_json

QUEUE_DELAY_S = 1.5
GRACE_S = 10


@pytest.fixture(scope="module")
def model_files(tmp_model_dir):
    proto, weights = save_net(dense_net(6, 4), tmp_model_dir, "net")
    cfg = {"name": "slow", "model": {"prototxt": str(proto), "weights": str(weights)},
           "batching": {"enabled": True, "maxBatchSize": 64, "maxQueueDelayMs": QUEUE_DELAY_S * 1000}}
    return cfg, proto, weights


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(model_files, tmp_model_dir):
    cfg, proto, weights = model_files
    server = ServerProcess(cfg, tmp_model_dir, args=["--grace-period", str(GRACE_S)]).start()
    try:
        xs = [np.random.default_rng(i).normal(0, 1, (i + 1, 6)).astype(np.float32) for i in range(4)]
        results: list = [None] * len(xs)

        def client(i: int):
            results[i] = http_json("POST", server.url + "/v2/models/slow/infer", {"inputs": [
                {"name": "data", "shape": list(xs[i].shape), "datatype": "FP32", "data": xs[i].ravel().tolist()}]})

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(xs))]
        started = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(0.4)  # all four are queued, waiting out the batching delay
        assert all(r is None for r in results), "requests finished before SIGTERM: nothing was in flight"
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # new connections are refused while the in-flight requests are still running
        while not refused(server.port):
            assert time.monotonic() - signalled < 1.0, "still accepting connections 1 s after SIGTERM"
            time.sleep(0.02)
        assert any(t.is_alive() for t in threads), "in-flight requests were done before new connections were refused"

        for t in threads:
            t.join(GRACE_S)
        for x, (status, body) in zip(xs, results, strict=True):
            assert status == 200, body
            got = np.array(body["outputs"][0]["data"], np.float32).reshape(body["outputs"][0]["shape"])
            assert np.abs(got - forward(proto, weights, {"data": x})["prob"]).max() <= 1e-6
        assert time.monotonic() - started >= QUEUE_DELAY_S * 0.9  # they really were held

        code = server.proc.wait(GRACE_S)
        exited = time.monotonic() - signalled
        assert code == 0, server.output()
        assert exited < GRACE_S
        assert "stopped" in server.output()
    finally:
        server.stop()


def test_sigterm_on_an_idle_server_exits_0_at_once(model_files, tmp_model_dir):
    cfg, _, _ = model_files
    server = ServerProcess(cfg, tmp_model_dir).start()
    try:
        # an idle keep-alive connection does not hold the shutdown up
        conn = socket.create_connection(("127.0.0.1", server.port))
        conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert b"200 OK" in conn.recv(4096)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(5) == 0
        assert time.monotonic() - start < 2
        assert conn.recv(4096) == b""  # the server closed it
        conn.close()
    finally:
        server.stop()


def test_sigterm_after_a_failed_load_exits_0(model_files, tmp_model_dir):
    cfg, _, _ = model_files
    broken = {**cfg, "model": {**cfg["model"], "weights": str(tmp_model_dir / "missing.caffemodel")}}
    server = ServerProcess(broken, tmp_model_dir, wait_ready=False).start()
    try:
        assert http("GET", server.url + "/v2/health/live")[0] == 200
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(5) == 0
    finally:
        server.stop()


def heavy_net() -> caffe.NetSpec:
    """About 0.2 s of forward per item on this machine's two cores: a batch of 16 runs for seconds."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 64, 64, 64]))
    x = n.data
    for i in range(8):
        x = L.Convolution(x, num_output=64, kernel_size=7, pad=3)
        setattr(n, f"conv{i}", x)
    n.out = L.Pooling(x, pool=P.Pooling.AVE, global_pooling=True)
    return n


def test_a_forward_pass_longer_than_the_grace_period_does_not_hold_up_the_exit(tmp_model_dir):
    grace = 0.5
    proto, weights = save_net(heavy_net(), tmp_model_dir, "heavy")
    cfg = {"name": "heavy", "backend": "pycaffe",  # a Caffe forward pass: what a grace period cannot cut short
           "model": {"prototxt": str(proto), "weights": str(weights)}}
    server = ServerProcess(cfg, tmp_model_dir, args=["--grace-period", str(grace)]).start()
    try:
        x = np.zeros((16, 64, 64, 64), np.float32)
        head = json.dumps({"inputs": [{"name": "data", "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v2/models/heavy/infer", head + x.tobytes(),
                     {"Inference-Header-Content-Length": str(len(head))})
        time.sleep(0.3)  # the forward pass has started
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert server.proc.wait(GRACE_S) == 0
        exited = time.monotonic() - signalled
        with pytest.raises((RemoteDisconnected, ConnectionResetError)):
            conn.getresponse()  # cut off: the forward pass was still running at the end of the grace period
        conn.close()
        assert exited < grace + 1.0, f"exited {exited:.2f} s after SIGTERM with a {grace} s grace period"
        assert "still running at the end of the grace period" in server.output()
    finally:
        server.stop()


# --- the drain (issue 15): nothing fully sent is lost


@pytest.fixture(scope="module")
def wide_model(tmp_model_dir):
    """Requests of 3 MB JSON bodies that take about 200 ms (batching's queue delay holds them)."""
    proto, weights = save_net(dense_net(150_000, 4), tmp_model_dir, "wide")
    return {"name": "wide", "model": {"prototxt": str(proto), "weights": str(weights)}, "backend": "pycaffe",
            "batching": {"enabled": True, "maxBatchSize": 64, "maxQueueDelayMs": 200}}


def _wide_body(seed: int) -> bytes:
    x = np.random.default_rng(seed).normal(0, 1, (4, 150_000)).astype(np.float32)
    return json.dumps({"inputs": [{"name": "data", "shape": [4, 150_000], "datatype": "FP32",
                                   "data": np.round(x, 3).ravel().tolist()}]}).encode()


@pytest.mark.parametrize("drain_delay", [0.0, 1.0])
def test_sigterm_just_after_six_large_requests_loses_none_of_them(wide_model, tmp_model_dir, drain_delay):
    server = ServerProcess(wide_model, tmp_model_dir, args=["--drain-delay", str(drain_delay)]).start()
    try:
        bodies = [_wide_body(i) for i in range(6)]
        assert all(len(b) > 1_000_000 for b in bodies)
        results: list = [None] * 6

        def client(i: int):
            conn = HTTPConnection("127.0.0.1", server.port, timeout=60)
            try:
                conn.request("POST", "/v2/models/wide/infer", bodies[i], {"Content-Type": "application/json"})
                resp = conn.getresponse()
                results[i] = (resp.status, resp.read())
            except OSError as e:
                results[i] = (repr(e), b"")
            finally:
                conn.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert [r[0] for r in results] == [200] * 6, [(r[0], r[1][:200]) for r in results]
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


def test_on_sigterm_readiness_fails_at_once_while_the_listener_drains_and_keepalive_clients_are_told_to_close(
        wide_model, tmp_model_dir):
    delay = 2.0
    server = ServerProcess(wide_model, tmp_model_dir, args=["--drain-delay", str(delay)]).start()
    try:
        idle = HTTPConnection("127.0.0.1", server.port, timeout=10)  # a keep-alive client, idle at SIGTERM
        idle.request("GET", "/v2/health/live")
        first = idle.getresponse()
        first.read()
        assert first.getheader("connection") != "close"

        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while http("GET", server.url + "/v2/health/ready")[0] != 503:  # turns 503 at once...
            assert time.monotonic() - signalled < 1.0, "readiness still 200 a second after SIGTERM"
            time.sleep(0.02)
        assert time.monotonic() - signalled < delay * 0.5
        status, _, body = http("GET", server.url + "/v2/health/ready")
        assert status == 503 and b"shutting down" in body
        assert http("GET", server.url + "/v2/health/live")[0] == 200  # ... while liveness stays true
        # new connections are still accepted and served during the drain delay
        status, body = http_json("POST", server.url + "/v2/models/wide/infer", {"inputs": [
            {"name": "data", "shape": [1, 150_000], "datatype": "FP32", "data": [0.5] * 150_000}]})
        assert status == 200, body
        # the idle keep-alive connection's next request is answered, with Connection: close (no reset)
        idle.request("GET", "/v2/health/live")
        second = idle.getresponse()
        assert second.status == 200 and second.getheader("connection") == "close"
        second.read()
        idle.close()
        assert time.monotonic() - signalled < delay

        while not refused(server.port):  # then the listener closes, and the process exits 0
            assert time.monotonic() - signalled < delay + 5
            time.sleep(0.05)
        assert time.monotonic() - signalled >= delay * 0.9
        assert server.proc.wait(30) == 0
    finally:
        server.stop()

"""gRPC under load and at the edges, sharing REST's machinery: a full queue is UNAVAILABLE with retry
information; the client's deadline or requestTimeoutS (whichever is sooner) is DEADLINE_EXCEEDED and
the work never runs; a client that cancels has its queued work dropped; metrics count both protocols;
SIGTERM finishes gRPC and REST requests in flight, refuses new ones and exits 0."""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import caffe
import grpc
import numpy as np
import pytest
from caffe import layers as L

from caffe_testing.grpc import OIPClient, assert_status, grpc_server, infer_request, output
from inference_server.grpc import messages as pb
from caffe_testing.nets import forward, save_net
from caffe_testing.servers import http, http_json


@pytest.fixture(scope="module")
def net_files(tmp_model_dir):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4]))
    n.ip = L.InnerProduct(n.data, num_output=3)
    return save_net(n, tmp_model_dir, "tiny")


def config(net_files, delay_ms: float, **limits) -> dict:
    proto, weights = net_files
    return {"name": "tiny", "model": {"prototxt": str(proto), "weights": str(weights)}, "backend": "pycaffe",
            "batching": {"enabled": True, "maxBatchSize": 64, "maxQueueDelayMs": delay_ms}, "limits": limits}


def x(v: float = 1.0, n: int = 1) -> np.ndarray:
    return np.full((n, 4), v, np.float32)


def metric(url: str, name: str, **labels) -> float | None:
    text = http("GET", url + "/metrics")[2].decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_full_queue_is_unavailable_with_retry_info_and_then_serves_again(net_files, tmp_model_dir):
    with grpc_server(config(net_files, 1000, maxQueue=2), tmp_model_dir) as server:
        client = OIPClient(server.grpc_port)
        stub = client.stubs["ModelInfer"]
        futures = [stub.future(infer_request("tiny", {"data": x(i)}), timeout=30) for i in range(6)]
        ok, refused = 0, []
        for f in futures:
            try:
                f.result()
                ok += 1
            except grpc.RpcError as e:
                refused.append(e)
        assert ok == 2 and len(refused) == 4, (ok, [e.details() for e in refused])
        for e in refused:
            assert_status(e, grpc.StatusCode.UNAVAILABLE, "queue is full")
            trailers = dict(e.trailing_metadata())
            assert trailers["retry-after"].isdigit()
            assert int(trailers["grpc-retry-pushback-ms"]) == 1000 * int(trailers["retry-after"])
            status = pb.Status.FromString(trailers["grpc-status-details-bin"])
            assert status.code == grpc.StatusCode.UNAVAILABLE.value[0] and "queue is full" in status.message
            assert status.details[0].type_url.endswith("google.rpc.RetryInfo")
            assert pb.RetryInfo.FromString(status.details[0].value).retry_delay.seconds >= 1
        assert client.infer(infer_request("tiny", {"data": x()})).outputs[0].name == "ip"
        # the same counters as REST: 503s and 200s, and the gRPC codes beside them
        assert metric(server.url, "caffeserve_inference_requests_total", code="503") == 4
        assert metric(server.url, "caffeserve_grpc_requests_total", grpc_code="UNAVAILABLE") == 4
        assert metric(server.url, "caffeserve_grpc_requests_total", grpc_code="OK") == 3
        client.close()


def test_the_clients_deadline_when_sooner_ends_the_call_and_the_work_never_runs(net_files, tmp_model_dir):
    with grpc_server(config(net_files, 1500, requestTimeoutS=30), tmp_model_dir) as server:
        client = OIPClient(server.grpc_port)
        start = time.monotonic()
        err = client.error("ModelInfer", infer_request("tiny", {"data": x()}), timeout=0.3)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 1.2  # at the deadline, not when the batch window closed
        time.sleep(1.6)  # the window closes: the worker finds the item expired or cancelled and skips it
        assert metric(server.url, "caffeserve_batch_size_count") in (None, 0.0)
        assert metric(server.url, "caffeserve_inflight_requests") == 0
        client.close()


def test_request_timeout_when_sooner_is_deadline_exceeded_from_the_server(net_files, tmp_model_dir):
    with grpc_server(config(net_files, 1500, requestTimeoutS=0.3), tmp_model_dir) as server:
        client = OIPClient(server.grpc_port)
        start = time.monotonic()
        err = client.error("ModelInfer", infer_request("tiny", {"data": x()}), timeout=20)
        assert_status(err, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline")
        assert time.monotonic() - start < 1.2
        time.sleep(1.6)
        assert metric(server.url, "caffeserve_batch_size_count") in (None, 0.0)
        assert metric(server.url, "caffeserve_inference_requests_total", code="504") == 1
        client.close()


def test_a_client_that_cancels_has_its_queued_work_dropped(net_files, tmp_model_dir):
    with grpc_server(config(net_files, 800), tmp_model_dir) as server:
        client = OIPClient(server.grpc_port)
        fut = client.stubs["ModelInfer"].future(infer_request("tiny", {"data": x()}), timeout=30)
        time.sleep(0.3)  # queued, waiting for the batch window
        assert fut.cancel()
        time.sleep(1.0)  # the window closes: the worker finds the request cancelled and skips it
        assert metric(server.url, "caffeserve_inference_requests_total", code="499") == 1
        assert metric(server.url, "caffeserve_grpc_requests_total", grpc_code="CANCELLED") == 1
        assert metric(server.url, "caffeserve_batch_size_count") in (None, 0.0)
        assert client.infer(infer_request("tiny", {"data": x()})).outputs[0].name == "ip"
        client.close()


def test_sigterm_finishes_grpc_and_rest_requests_in_flight_refuses_new_ones_and_exits_0(net_files, tmp_model_dir):
    proto, weights = net_files
    server = grpc_server(config(net_files, 1500), tmp_model_dir, args=["--grace-period", "10"]).start()
    try:
        client = OIPClient(server.grpc_port)
        xs = [np.random.default_rng(i).normal(0, 1, (i + 1, 4)).astype(np.float32) for i in range(3)]
        futures = [client.stubs["ModelInfer"].future(infer_request("tiny", {"data": a}), timeout=20) for a in xs]
        rest: list = []
        t = threading.Thread(target=lambda: rest.append(http_json("POST", server.url + "/v2/models/tiny/infer", {
            "inputs": [{"name": "data", "shape": [1, 4], "datatype": "FP32", "data": [0.5] * 4}]})))
        t.start()
        time.sleep(0.4)  # all are queued, waiting out the batching delay
        assert not any(f.done() for f in futures)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # a new call on a new connection is refused while those in flight still run
        late = OIPClient(server.grpc_port)
        err = late.error("ModelInfer", infer_request("tiny", {"data": x()}), timeout=2)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert not all(f.done() for f in futures), "in-flight calls were done before new ones were refused"
        for a, f in zip(xs, futures):
            got = output(f.result(), "ip")
            assert np.abs(got - forward(proto, weights, {"data": a})["ip"]).max() <= 1e-5
        t.join(10)
        assert rest and rest[0][0] == 200, rest
        assert server.proc.wait(15) == 0
        log = server.output()
        assert "Traceback" not in log, log
        late.close()
        client.close()
    finally:
        server.stop()


def test_grpc_from_the_config_and_a_port_in_use_exits_1_saying_so(net_files, tmp_model_dir):
    import socket

    from caffe_testing.servers import ServerProcess, free_port

    cfg = config(net_files, 1)
    port = free_port()
    cfg["grpc"] = {"enabled": True, "port": port}
    with ServerProcess(cfg, tmp_model_dir) as server:  # no --grpc-port: the config's grpc section
        client = OIPClient(port)
        assert client.call("ServerReady", pb.ServerReadyRequest()).ready
        client.close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = grpc_server(cfg, tmp_model_dir, wait_ready=False)
        server.args[1] = str(taken.getsockname()[1])  # --grpc-port: the taken port
        with pytest.raises(RuntimeError) as e:
            server.start(timeout=30)
        assert "exited with 2" in str(e.value) and "cannot listen for gRPC" in str(e.value), str(e.value)

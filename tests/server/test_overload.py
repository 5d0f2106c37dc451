"""A full queue answers 503 with Retry-After; a request past its deadline answers 504 and is never run."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import caffe
import pytest
from caffe import layers as L

from caffe_testing.nets import save_net
from caffe_testing.servers import ServerProcess, http, http_json


@pytest.fixture(scope="module")
def net_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("overload")
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4]))
    n.ip = L.InnerProduct(n.data, num_output=3)
    return d, *save_net(n, d, "tiny")


def body(x: float = 1.0) -> dict:
    return {"inputs": [{"name": "data", "shape": [1, 4], "datatype": "FP32", "data": [x] * 4}]}


def test_full_queue_answers_503_with_retry_after_and_then_serves_again(net_files):
    d, proto, weights = net_files
    # the batching delay holds the first request in the worker for 1 s, so the queue fills up
    cfg = {"name": "tiny", "model": {"prototxt": str(proto), "weights": str(weights)},
           "batching": {"enabled": True, "maxBatchSize": 64, "maxQueueDelayMs": 1000},
           "limits": {"maxQueue": 2}}
    with ServerProcess(cfg, d) as server:
        url = server.url + "/v2/models/tiny/infer"

        def post(i):
            import json
            return http("POST", url, json.dumps(body(i)).encode(), {"Content-Type": "application/json"})

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(post, range(6)))
        codes = sorted(r[0] for r in results)
        assert codes.count(200) == 2 and codes.count(503) == 4, codes
        for status, headers, data in results:
            if status == 503:
                assert {k.lower(): v for k, v in headers.items()}["retry-after"].isdigit()
                assert b"queue is full" in data
        assert http_json("POST", url, body())[0] == 200


def test_request_past_its_deadline_gets_504_and_the_server_goes_on(net_files):
    d, proto, weights = net_files
    cfg = {"name": "tiny", "model": {"prototxt": str(proto), "weights": str(weights)},
           "batching": {"enabled": True, "maxBatchSize": 64, "maxQueueDelayMs": 1500},
           "limits": {"requestTimeoutS": 0.3}}
    with ServerProcess(cfg, d) as server:
        url = server.url + "/v2/models/tiny/infer"
        start = time.monotonic()
        status, payload = http_json("POST", url, body())
        elapsed = time.monotonic() - start
        assert status == 504, payload
        assert "deadline" in payload["error"]
        assert elapsed < 1.4  # answered at the deadline, not when the batch window closed
        time.sleep(1.5)  # the expired item is dropped by the worker, never run
        metrics = http("GET", server.url + "/metrics")[2].decode()
        assert "caffeserve_batch_size_count" not in metrics \
            or 'caffeserve_batch_size_count{model="tiny",version="1"} 0.0' in metrics
        assert 'code="504"' in metrics


def test_a_client_that_disconnects_has_its_queued_work_dropped(net_files):
    import json
    import socket

    d, proto, weights = net_files
    cfg = {"name": "tiny", "model": {"prototxt": str(proto), "weights": str(weights)},
           "batching": {"enabled": True, "maxBatchSize": 64, "maxQueueDelayMs": 800}}
    with ServerProcess(cfg, d) as server:
        payload = json.dumps(body()).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            time.sleep(0.2)  # queued, waiting for the batch window
        time.sleep(1.2)  # the window closes: the worker finds the request cancelled and skips it
        metrics = http("GET", server.url + "/metrics")[2].decode()
        assert 'code="499"' in metrics
        assert 'caffeserve_batch_size_count{model="tiny",version="1"} 0.0' in metrics
        assert http_json("POST", server.url + "/v2/models/tiny/infer", body())[0] == 200

"""Dynamic batching: requests that arrive together share one forward pass and get their own results."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import caffe
import numpy as np
import pytest
from caffe import layers as L, params as P

from caffe_testing.nets import forward, save_net
from caffe_testing.servers import ServerProcess, http, http_json


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("batching")
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 12, 12]))
    n.conv = L.Convolution(n.data, num_output=8, kernel_size=3, group=1)
    n.relu = L.ReLU(n.conv, in_place=True)
    n.pool = L.Pooling(n.relu, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.ip = L.InnerProduct(n.pool, num_output=6)
    n.prob = L.Softmax(n.ip)
    proto, weights = save_net(n, d, "batchnet")
    cfg = {
        "name": "batchnet",
        "model": {"prototxt": str(proto), "weights": str(weights)},
        "batching": {"enabled": True, "maxBatchSize": 8, "maxQueueDelayMs": 200},
    }
    with ServerProcess(cfg, d) as server:
        yield server, proto, weights


def infer(url: str, x: np.ndarray) -> np.ndarray:
    status, body = http_json("POST", url + "/v2/models/batchnet/infer", {
        "inputs": [{"name": "data", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
    })
    assert status == 200, body
    out = body["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def batch_histogram(url: str) -> tuple[float, float]:
    text = http("GET", url + "/metrics")[2].decode()
    count = float(re.search(r'caffeserve_batch_size_count\{[^}]*\} (\S+)', text).group(1))
    total = float(re.search(r'caffeserve_batch_size_sum\{[^}]*\} (\S+)', text).group(1))
    return count, total


def test_concurrent_requests_are_batched_and_each_gets_its_own_unbatched_result(model):
    server, proto, weights = model
    rng = np.random.default_rng(1)
    xs = [rng.random((1, 3, 12, 12), dtype=np.float32) for _ in range(8)]
    xs.append(rng.random((2, 3, 12, 12), dtype=np.float32))  # a request carrying its own batch of 2
    before = batch_histogram(server.url)
    with ThreadPoolExecutor(len(xs)) as pool:
        results = list(pool.map(lambda x: infer(server.url, x), xs))
    after = batch_histogram(server.url)
    for x, got in zip(xs, results, strict=True):
        ref = forward(proto, weights, {"data": x})["prob"]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-6
    forwards, rows = after[0] - before[0], after[1] - before[1]
    assert rows == 10
    assert forwards < len(xs), f"{len(xs)} requests ran as {forwards} forward passes: nothing was batched"


def test_batch_never_exceeds_max_batch_size(model):
    server, _, _ = model
    before = batch_histogram(server.url)
    xs = [np.ones((3, 3, 12, 12), np.float32)] * 6
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda x: infer(server.url, x), xs))
    text = http("GET", server.url + "/metrics")[2].decode()
    after = batch_histogram(server.url)
    assert after[1] - before[1] == 18
    # rows per forward ≤ 8 means no bucket above 8 gained anything: le="8" count equals the total count
    le8 = float(re.search(r'caffeserve_batch_size_bucket\{[^}]*le="8.0"[^}]*\} (\S+)', text).group(1))
    assert le8 == after[0]


def test_batching_auto_measures_the_curve_and_reports_its_decision(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 64]))
    n.ip1 = L.InnerProduct(n.data, num_output=256)
    n.ip2 = L.InnerProduct(n.ip1, num_output=10)
    proto, weights = save_net(n, tmp_path, "autonet")
    cfg = {"name": "autonet", "model": {"prototxt": str(proto), "weights": str(weights)},
           "batching": {"enabled": "auto", "maxBatchSize": 8, "latencyBudgetMs": 50}}
    with ServerProcess(cfg, tmp_path) as server:
        status, meta = http_json("GET", server.url + "/v2/models/autonet")
        assert status == 200
        params = meta["parameters"]
        curve = params["batching_curve"]
        assert [p["batch"] for p in curve] == [1, 2, 4, 8]
        assert all(p["forward_ms"] > 0 and p["items_per_s"] > 0 for p in curve)
        best = max(curve, key=lambda p: p["items_per_s"])
        # the decision follows the measured curve: on exactly when the best size beats batch 1 by the minimum gain
        expect_on = best["batch"] > 1 and best["items_per_s"] >= 1.1 * curve[0]["items_per_s"]
        assert params["batching"] is expect_on, params["batching_decision"]
        metrics = http("GET", server.url + "/metrics")[2].decode()
        assert 'caffeserve_batching_calibration_items_per_second{batch="8"' in metrics
        x = np.ones((1, 64), np.float32)
        assert np.abs(infer_model(server.url, "autonet", x) - forward(proto, weights, {"data": x})["ip2"]).max() <= 1e-5


def infer_model(url: str, model: str, x: np.ndarray) -> np.ndarray:
    status, body = http_json("POST", f"{url}/v2/models/{model}/infer", {
        "inputs": [{"name": "data", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
    })
    assert status == 200, body
    out = body["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])

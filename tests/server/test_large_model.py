"""A .caffemodel over 512 MiB (VGG16's is 528 MiB) loads and is served.

The sdist's Caffe capped a protobuf read at 512 MiB and aborted the process on larger weights; our
build reads up to INT_MAX. The ONNX path (protobuf's 2 GiB cap) must carry such weights too: `backend:
onnxruntime` converts, passes the parity gate and serves. (`auto` would also time both backends: one big
InnerProduct runs at about the same speed in either, so which it picks is not what this test is about.) The files
(about 1.1 GB with the converted graph) are deleted when the module ends.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from caffe_testing.servers import ServerProcess, http_json

pytestmark = pytest.mark.slow  # 35-45 s on 2 cores, most of it writing, converting and checking 1.1 GB

IN, OUT = 14_000, 10_000  # 140 M float weights: 560 MB, over 512 MiB (536,870,912 bytes)
PYCAFFE_FORWARD = """
import sys, json, numpy as np, caffe
caffe.set_mode_cpu()
net = caffe.Net(sys.argv[1], caffe.TEST, weights=sys.argv[2])
x = np.load(sys.argv[3])
net.blobs["data"].data[...] = x
np.save(sys.argv[4], net.forward()["ip"])
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    import caffe
    from caffe import layers as L

    d = tmp_path_factory.mktemp("big")
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, IN]))
    n.ip = L.InnerProduct(n.data, num_output=OUT)
    proto = d / "big.prototxt"
    proto.write_text(str(n.to_proto()))
    net = caffe.Net(str(proto), caffe.TEST)
    rng = np.random.default_rng(0)
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    w[...] = rng.standard_normal((OUT, IN), dtype=np.float32) * np.float32(0.01)
    b[...] = rng.standard_normal(OUT, dtype=np.float32)
    x = rng.standard_normal((1, IN), dtype=np.float32)
    expected = x @ w.T + b
    weights = d / "big.caffemodel"
    net.save(str(weights))
    del net, w, b
    assert weights.stat().st_size > 512 * 1024 * 1024
    np.save(d / "x.npy", x)
    yield d, proto, weights, x, expected
    shutil.rmtree(d, ignore_errors=True)  # do not leave a gigabyte in pytest's kept temp folders


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, float(np.abs(expected).max()))


def test_pycaffe_loads_weights_over_512_mib(big_model):
    d, proto, weights, _, expected = big_model
    # a child process: the old cap ended the process with a glog CHECK failure, not an exception
    r = subprocess.run([sys.executable, "-c", PYCAFFE_FORWARD, str(proto), str(weights), str(d / "x.npy"),
                        str(d / "ref.npy")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_close(np.load(d / "ref.npy"), expected)


def test_the_server_serves_weights_over_512_mib_with_onnxruntime(big_model):
    d, proto, weights, x, expected = big_model
    cfg = {"name": "big", "backend": "onnxruntime", "model": {"prototxt": str(proto), "weights": str(weights)}}
    server = ServerProcess(cfg, d, env={"CAFFESERVE_CACHE_DIR": str(d / "onnx-cache")})
    server.start(timeout=240)
    try:
        status, meta = http_json("GET", server.url + "/v2/models/big")
        assert status == 200
        assert meta["parameters"]["backend"] == "onnxruntime", meta["parameters"]["backend_reason"]
        status, body = http_json("POST", server.url + "/v2/models/big/infer", {
            "inputs": [{"name": "data", "shape": [1, IN], "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert status == 200, body
    finally:
        server.stop()
    assert_close(np.array(body["outputs"][0]["data"], np.float32).reshape(1, OUT), expected)

"""One net per model family of issue #20, built with the constructs of the published deploy files
(tests/fork_nets.py), served over HTTP by real `caffeserve serve` processes on both backends.

- pycaffe: the answer equals a direct Net.forward() in this process.
- onnxruntime: the server's own parity gate passes, and the answer equals pycaffe within 1e-5;
  where a layer has no exact ONNX form (SSD's DetectionOutput, BN in LEARN mode), `backend: auto`
  serves with pycaffe and says why, and `backend: onnxruntime` refuses to start.
"""

from __future__ import annotations

import numpy as np
import pytest

from caffe_testing import fork_nets
from caffe_testing.nets import forward, save_net
from caffe_testing.servers import ServerProcess, http_json, settled_backend

TOL = 1e-5


@pytest.fixture(autouse=True)
def onnx_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAFFESERVE_CACHE_DIR", str(tmp_path / "onnx-cache"))


def config(name: str, proto, weights, backend: str) -> dict:
    return {"name": name, "backend": backend, "model": {"prototxt": str(proto), "weights": str(weights)}}


def infer(url: str, model: str, x: np.ndarray) -> dict[str, np.ndarray]:
    status, body = http_json("POST", f"{url}/v2/models/{model}/infer", {
        "inputs": [{"name": "data", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert status == 200, body
    return {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in body["outputs"]}


def backend_of(url: str, model: str) -> tuple[str, str]:
    params = settled_backend(url, model)  # with auto: once the onnxruntime check beside serving has ended
    return params["backend"], params["backend_reason"]


def assert_close(got: dict, want: dict, tol: float) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        diff = float(np.abs(got[name] - w).max())
        assert diff <= tol * max(1.0, float(np.abs(w).max())), f"{name}: max |Δ| {diff:.3g}"


def input_for(proto, batch: int, seed: int = 0) -> np.ndarray:
    import caffe

    shape = caffe.Net(str(proto), caffe.TEST).blobs["data"].data.shape
    return np.random.default_rng(seed).uniform(-1, 1, (batch, *shape[1:])).astype(np.float32)


@pytest.mark.parametrize("family,build,batch", [
    ("segnet", fork_nets.segnet_block, 2),
    ("enet", fork_nets.enet_block, 2),
    ("senet", fork_nets.se_block, 2),
    ("shufflenet", fork_nets.shufflenet_unit, 2),
    ("ssd-head", lambda: fork_nets.ssd_head(detection=False), 1),
])
def test_family_serves_on_both_backends_with_parity(tmp_path, family, build, batch):
    proto, weights = save_net(build(), tmp_path, family, seed=7)
    x = input_for(proto, batch)
    want = forward(proto, weights, {"data": x})
    with ServerProcess(config(family, proto, weights, "pycaffe"), tmp_path) as server:
        assert_close(infer(server.url, family, x), want, 1e-6)
    with ServerProcess(config(family, proto, weights, "onnxruntime"), tmp_path) as server:
        backend, reason = backend_of(server.url, family)
        assert backend == "onnxruntime"
        assert "parity check passed" in reason
        assert_close(infer(server.url, family, x), want, TOL)


def test_ssd_with_detection_output_falls_back_to_pycaffe_saying_why(tmp_path):
    proto, weights = save_net(fork_nets.ssd_head(detection=True), tmp_path, "ssd", seed=7)
    x = input_for(proto, 1)
    want = forward(proto, weights, {"data": x})
    assert want["detection_out"].shape[-1] == 7
    with ServerProcess(config("ssd", proto, weights, "auto"), tmp_path) as server:
        backend, reason = backend_of(server.url, "ssd")
        assert backend == "pycaffe"
        assert reason.startswith("auto: serving with pycaffe because layer 'detection_out' of type 'DetectionOutput'")
        assert "non-maximum suppression" in reason
        got = infer(server.url, "ssd", x)
        assert_close(got, want, 1e-6)
        boxes = got["detection_out"].reshape(-1, 7)[:, 3:]
        assert boxes.min() >= 0 and boxes.max() <= 1  # clip: true


def test_enet_with_bn_in_learn_mode_falls_back_to_pycaffe_saying_why(tmp_path):
    proto, weights = save_net(fork_nets.enet_block(bn_mode=0), tmp_path, "enet_learn", seed=7)
    x = input_for(proto, 1)
    want = forward(proto, weights, {"data": x})
    with ServerProcess(config("enet", proto, weights, "auto"), tmp_path) as server:
        backend, reason = backend_of(server.url, "enet")
        assert backend == "pycaffe"
        assert "of type 'BN'" in reason and "bn_mode LEARN" in reason
        assert_close(infer(server.url, "enet", x), want, 1e-6)

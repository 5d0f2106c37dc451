"""Batching never hands one client another's result, and a model serves what its forward really gives.

Issue #19: with batching on, requests that arrive together each get exactly their own forward's answer,
or the configuration is refused with a reason naming the output (SSD's DetectionOutput, a Reshape that
folds the batch, BatchNorm on batch statistics); `auto` leaves such nets unbatched and says why; output
dimensions the data decides are -1 in metadata; any blob (one that feeds a Silence layer) can be served.
Issue #13: metadata describes the net at the served input shapes, not the prototxt's.
Real pycaffe and ONNX Runtime behind real `caffeserve serve` processes.
"""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml

from caffe_testing.nets import (
    batch_folding_net,
    batch_statistics_net,
    every_layer_net,
    fixed_batch_net,
    forward,
    save_net,
    save_weights,
    silenced_net,
    small_input_dim_prototxt,
    ssd_head,
    zoo_net,
)
from caffe_testing.servers import ServerProcess, http, http_json
from inference_server.backends import BackendChoice
from inference_server.commands import check
from inference_server.config import parse_config
from inference_server.errors import InferenceError
from inference_server.serving.executor import Executor, WorkItem

TOL = 1e-5  # the parity gate's bound: |Δ| ≤ TOL × max(1, max |reference|)
BATCHING = {"enabled": True, "maxBatchSize": 4, "maxQueueDelayMs": 200}

# name: (net builder, the outputs the config names (None: Caffe's), whether a batch may be split)
ZOO = {
    "zoo": (zoo_net, None, True),
    "every_layer": (every_layer_net, None, True),
    "silenced": (silenced_net, ["class8_ab", "conv1"], True),
    "ssd": (ssd_head, None, False),
    "folding": (batch_folding_net, None, False),
    "batch_stats": (batch_statistics_net, None, False),
}
ONNX_CONVERTIBLE = ["zoo", "every_layer", "silenced", "folding"]
CASES = [(name, "pycaffe") for name in ZOO] + [(name, "onnxruntime") for name in ONNX_CONVERTIBLE]


@pytest.fixture(scope="module")
def zoo_files(tmp_model_dir):
    """name → (prototxt, weights), each net saved once per module."""
    saved = {}

    def get(name: str):
        if name not in saved:
            saved[name] = save_net(ZOO[name][0](), tmp_model_dir, name, seed=5)
        return saved[name]

    return get


@pytest.fixture
def onnx_env(tmp_path) -> dict:
    return {"CAFFESERVE_CACHE_DIR": str(tmp_path / "onnx-cache")}


def config(name: str, proto, weights, backend: str = "pycaffe", **extra) -> dict:
    outputs = ZOO[name][1] if name in ZOO else None
    cfg = {"name": name, "backend": backend, "model": {"prototxt": str(proto), "weights": str(weights)}, **extra}
    if outputs and "outputs" not in extra:
        cfg["outputs"] = [{"name": o} for o in outputs]
    return cfg


def wait_loaded(url: str, timeout: float = 120.0) -> tuple[int, dict]:
    """Readiness once the load ended: (200, body) or (503, body with the loader's message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = http_json("GET", url + "/v2/health/ready")
        if status == 200 or "failed to load" in body.get("error", ""):
            return status, body
        time.sleep(0.1)
    raise AssertionError(f"the model neither loaded nor failed within {timeout}s: {body}")


def infer(url: str, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    status, body = http_json("POST", f"{url}/v2/models/{model}/infer", {"inputs": [
        {"name": k, "shape": list(v.shape), "datatype": "FP32", "data": v.ravel().tolist()} for k, v in feeds.items()]})
    assert status == 200, body
    return {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in body["outputs"]}


def assert_same(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert set(got) == set(ref)
    for name, r in ref.items():
        assert got[name].shape == r.shape, f"{name}: shape {got[name].shape}, its own forward gives {r.shape}"
        delta = float(np.abs(got[name].astype(np.float64) - r).max())
        assert delta <= TOL * max(1.0, float(np.abs(r).max())), f"{name}: max |Δ| {delta:.3g}"


def batch_forwards(url: str) -> float:
    text = http("GET", url + "/metrics")[2].decode()
    return float(re.search(r"caffeserve_batch_size_count\{[^}]*\} (\S+)", text).group(1))


def concurrent_requests_get_their_own_answers(url: str, name: str, proto, weights, meta: dict, n: int = 4) -> None:
    """`n` different single-item requests at once; each answer equals that item's own pycaffe forward."""
    rng = np.random.default_rng(11)
    feeds = [{i["name"]: rng.uniform(-1, 1, (1, *i["shape"][1:])).astype(np.float32) for i in meta["inputs"]}
             for _ in range(n)]
    outputs = [o["name"] for o in meta["outputs"]]
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda f: infer(url, name, f), feeds))
    for feed, got in zip(feeds, answers, strict=True):
        assert_same(got, forward(proto, weights, feed, blobs=outputs))


# --- the property: batched, or refused with the reason

@pytest.mark.parametrize("name, backend", CASES, ids=[f"{n}-{b}" for n, b in CASES])
def test_batched_requests_each_get_their_own_forward_or_the_config_is_refused(name, backend, zoo_files, tmp_path,
                                                                              onnx_env):
    proto, weights = zoo_files(name)
    separable = ZOO[name][2]
    with ServerProcess(config(name, proto, weights, backend, batching=BATCHING), tmp_path, env=onnx_env,
                       wait_ready=False) as server:
        status, body = wait_loaded(server.url)
        if status != 200:
            assert not separable, body
            assert re.search(r"batching is enabled but this net cannot be batched: output '\w+'", body["error"]), body
            assert http("GET", server.url + "/v2/health/live")[0] == 200
            return
        assert separable, f"{name} was served batched although a batch of it cannot be split"
        meta = http_json("GET", f"{server.url}/v2/models/{name}")[1]
        assert meta["parameters"]["backend"] == backend and meta["parameters"]["batching"] is True
        assert meta["parameters"]["batch_separable"] is True
        before = batch_forwards(server.url)
        concurrent_requests_get_their_own_answers(server.url, name, proto, weights, meta)
        assert batch_forwards(server.url) - before < 4, "nothing was batched: the property was not exercised"


@pytest.mark.parametrize("name, backend", [("ssd", "pycaffe"), ("batch_stats", "pycaffe"), ("folding", "onnxruntime")])
def test_auto_batching_leaves_a_net_that_cannot_be_batched_unbatched_and_says_why(name, backend, zoo_files, tmp_path,
                                                                                 onnx_env):
    proto, weights = zoo_files(name)
    cfg = config(name, proto, weights, backend, batching={**BATCHING, "enabled": "auto"})
    with ServerProcess(cfg, tmp_path, env=onnx_env) as server:
        meta = http_json("GET", f"{server.url}/v2/models/{name}")[1]
        params = meta["parameters"]
        assert params["backend"] == backend
        assert params["batching"] is False and params["batch_separable"] is False
        output = meta["outputs"][0]["name"]
        assert params["batching_decision"].startswith(f"the net cannot be batched: output '{output}'")
        assert params["batch_separable_reason"] in params["batching_decision"]
        concurrent_requests_get_their_own_answers(server.url, name, proto, weights, meta)


def test_detection_output_reports_its_data_dependent_dimension_as_minus_one(zoo_files, tmp_path):
    proto, weights = zoo_files("ssd")
    with ServerProcess(config("ssd", proto, weights), tmp_path) as server:
        meta = http_json("GET", server.url + "/v2/models/ssd")[1]
        assert meta["outputs"] == [{"name": "detection_out", "datatype": "FP32", "shape": [-1, 1, -1, 7]}]
        assert meta["parameters"]["batch_separable"] is False
        assert "'detection_out' does not keep the batch on axis 0" in meta["parameters"]["batch_separable_reason"]
        x = np.random.default_rng(2).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
        got = infer(server.url, "ssd", {"data": x})["detection_out"]
        assert got.shape[:2] == (1, 1) and got.shape[3] == 7 and got.shape[2] > 1  # not the reshape-time [1, 1, 1, 7]
        assert_same({"detection_out": got}, forward(proto, weights, {"data": x}))


def test_a_net_that_only_runs_batch_1_is_not_probed_with_a_batch_when_the_server_never_runs_one(tmp_path):
    proto, weights = save_net(fixed_batch_net(), tmp_path, "fixed")
    cfg = {"name": "fixed", "backend": "pycaffe", "model": {"prototxt": str(proto), "weights": str(weights)},
           "limits": {"maxBatch": 1}}
    with ServerProcess(cfg, tmp_path) as server:
        meta = http_json("GET", server.url + "/v2/models/fixed")[1]
        assert meta["parameters"]["batch_separable"] is None
        assert meta["parameters"]["batch_separable_reason"].startswith("not checked")
        x = np.ones((1, 4), np.float32)
        assert_same(infer(server.url, "fixed", {"data": x}), forward(proto, weights, {"data": x}))


# --- outputs can be any blob

def test_a_net_whose_blobs_all_feed_silence_is_refused_with_what_to_configure(zoo_files, tmp_path):
    proto, weights = zoo_files("silenced")
    with ServerProcess(config("silenced", proto, weights, outputs=None), tmp_path, wait_ready=False) as server:
        status, body = wait_loaded(server.url)
        assert status == 503
        assert "the net has no outputs" in body["error"] and "`outputs`" in body["error"]
        assert "class8_ab" in body["error"]


def test_a_config_output_that_is_no_blob_of_the_net_is_refused_naming_it(zoo_files, tmp_path):
    proto, weights = zoo_files("silenced")
    cfg = config("silenced", proto, weights, outputs=[{"name": "class9_ab"}])
    with ServerProcess(cfg, tmp_path, wait_ready=False) as server:
        status, body = wait_loaded(server.url)
        assert status == 503
        assert "config output 'class9_ab' is not a blob of the net" in body["error"] and "class8_ab" in body["error"]


@pytest.mark.parametrize("backend", ["pycaffe", "onnxruntime"])
def test_a_silenced_blob_and_an_in_place_blob_are_served_as_pycaffe_shows_them(backend, zoo_files, tmp_path, onnx_env):
    proto, weights = zoo_files("silenced")
    with ServerProcess(config("silenced", proto, weights, backend), tmp_path, env=onnx_env) as server:
        meta = http_json("GET", server.url + "/v2/models/silenced")[1]
        assert meta["parameters"]["backend"] == backend
        assert meta["outputs"] == [{"name": "class8_ab", "datatype": "FP32", "shape": [-1, 2, 8, 8]},
                                   {"name": "conv1", "datatype": "FP32", "shape": [-1, 6, 8, 8]}]
        x = np.random.default_rng(4).uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
        got = infer(server.url, "silenced", {"data_l": x})
        ref = forward(proto, weights, {"data_l": x}, blobs=["class8_ab", "conv1"])
        assert ref["conv1"].min() >= 0  # pycaffe's conv1 is the rectified one (ReLU in place)
        assert_same(got, ref)


# --- served input shapes (issue #13)

@pytest.fixture(scope="module")
def tiny_input(tmp_model_dir):
    proto = small_input_dim_prototxt(tmp_model_dir)
    return proto, save_weights(proto, seed=2)


@pytest.mark.parametrize("backend", ["pycaffe", "onnxruntime"])
def test_metadata_describes_the_net_at_the_served_input_shape_not_the_prototxts(backend, tiny_input, tmp_path,
                                                                                onnx_env):
    proto, weights = tiny_input
    cfg = {"name": "tiny", "backend": backend, "model": {"prototxt": str(proto), "weights": str(weights)},
           "inputs": [{"name": "image", "shape": [1, 3, 368, 368]}], "batching": {"enabled": "auto", "maxBatchSize": 2}}
    with ServerProcess(cfg, tmp_path, env=onnx_env) as server:
        meta = http_json("GET", server.url + "/v2/models/tiny")[1]
        assert meta["parameters"]["backend"] == backend
        assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 368, 368]}]
        x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 368, 368)).astype(np.float32)
        ref = forward(proto, weights, {"image": x})["heatmaps"]
        assert ref.shape == (1, 4, 184, 184)
        assert meta["outputs"] == [{"name": "heatmaps", "datatype": "FP32", "shape": [-1, 4, 184, 184]}]
        assert_same(infer(server.url, "tiny", {"image": x}), {"heatmaps": ref})


# --- caffeserve check

def write_config(tmp_path, cfg: dict):
    path = tmp_path / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_check_uses_the_served_input_shapes(tiny_input, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAFFESERVE_CACHE_DIR", str(tmp_path / "onnx-cache"))
    proto, weights = tiny_input
    cfg = {"name": "tiny", "model": {"prototxt": str(proto), "weights": str(weights)},
           "inputs": [{"name": "image", "shape": [1, 3, 368, 368]}]}
    assert check.main(["--config", write_config(tmp_path, cfg), "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "image                [1, 3, 368, 368]" in out and "heatmaps             [1, 4, 184, 184]" in out
    assert "parity           PASS" in out


def test_check_on_a_net_with_nothing_to_serve_says_so_and_exits_1(zoo_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAFFESERVE_CACHE_DIR", str(tmp_path / "onnx-cache"))
    proto, weights = zoo_files("silenced")
    assert check.main(["--config", write_config(tmp_path, config("silenced", proto, weights, outputs=None))]) == 1
    captured = capsys.readouterr()
    assert "model silenced: cannot serve: the net has no outputs" in captured.out
    assert "Traceback" not in captured.out + captured.err


def test_check_honours_the_configs_outputs_on_both_backends(zoo_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAFFESERVE_CACHE_DIR", str(tmp_path / "onnx-cache"))
    proto, weights = zoo_files("silenced")
    assert check.main(["--config", write_config(tmp_path, config("silenced", proto, weights)), "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "class8_ab            [1, 2, 8, 8]" in out and "conv1                [1, 6, 8, 8]" in out
    assert "parity           PASS" in out and "compared class8_ab,conv1" in out
    assert "  pycaffe " in out and "  onnxruntime " in out
    assert "batching (pycaffe): the net can be batched" in out
    assert "batching (onnxruntime): the net can be batched" in out


def test_check_exits_1_when_batching_is_on_for_a_net_that_cannot_be_batched(zoo_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAFFESERVE_CACHE_DIR", str(tmp_path / "onnx-cache"))
    proto, weights = zoo_files("ssd")
    assert check.main(["--config", write_config(tmp_path, config("ssd", proto, weights, batching=BATCHING)),
                       "--runs", "1"]) == 1
    out = capsys.readouterr().out
    assert "detection_out        [1, 1, -1, 7]  (-1: decided by the data)" in out
    assert "batching (pycaffe): the net cannot be batched: output 'detection_out' does not keep the batch" in out
    assert "the server would refuse to start" in out


# --- the split asserts what it assumes

def test_the_split_fails_a_batch_whose_output_axis_0_is_not_the_stacked_batch():
    class FoldingBackend:  # a double: the load-time probe keeps every real net like this from being batched
        def infer(self, inputs, outputs):
            return {"out": np.zeros((1, 6 * len(inputs["data"])), np.float32)}

    ex = Executor(parse_config({"name": "m", "model": {"prototxt": "p", "weights": "w"}}), BackendChoice("pycaffe", ""))

    async def run_batch_of_two():
        loop = asyncio.get_running_loop()
        items = [WorkItem({"data": np.zeros((1, 4), np.float32)}, ["out"], 1, time.monotonic() + 10,
                          loop.create_future(), loop) for _ in range(2)]
        await asyncio.to_thread(ex._execute, FoldingBackend(), items)
        return await asyncio.gather(*(it.future for it in items), return_exceptions=True)

    for error in asyncio.run(run_batch_of_two()):
        assert isinstance(error, InferenceError) and error.status_code == 500
        assert "output 'out' has shape [1, 12] for 2 stacked items" in error.message

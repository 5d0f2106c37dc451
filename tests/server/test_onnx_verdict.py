"""Restart without redoing work, and `auto` chooses ONNX Runtime only where it is faster.

The parity gate's and the timing's verdict is recorded beside the cached graph with the sha256 of the
graph's bytes it judged (loading/selection.py). A load whose keyed inputs and graph bytes are unchanged
is served from the verdict without loading the Net, converting or gating; any change reruns the gate.
"""

from __future__ import annotations

import json
from pathlib import Path

import caffe
import numpy as np
import onnx
import pytest
import yaml
from caffe import layers as L, params as P
from onnx import numpy_helper

import inference_server.loading.convert as convert
import inference_server.loading.parity as parity
import inference_server.loading.selection as selection
from caffe_testing.digits import DIGITS_DIR
from caffe_testing.nets import save_net
from caffe_testing.servers import ServerProcess, http, settled_backend
from inference_server.backends import choose_backend
from inference_server.config import parse_config
from inference_server.loading.child_load import probe_load


def tamper(model: onnx.ModelProto, initializer: str, factor: float) -> onnx.ModelProto:
    """One weight of the converted graph moved by `factor`."""
    for init in model.graph.initializer:
        if init.name == initializer:
            w = numpy_helper.to_array(init).copy()
            w.flat[0] *= np.float32(factor)
            init.CopyFrom(numpy_helper.from_array(w, init.name))
            return model
    raise AssertionError(f"no initializer {initializer}")


def write_digits_config(tmp_path: Path, backend: str) -> Path:
    data = yaml.safe_load((DIGITS_DIR / "server.yaml").read_text())
    data["backend"] = backend
    for key in ("prototxt", "weights", "labels"):
        data["model"][key] = str(DIGITS_DIR / data["model"][key])
    path = tmp_path / f"digits-{backend}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(autouse=True)
def onnx_cache(tmp_path, monkeypatch):
    d = tmp_path / "onnx-cache"
    monkeypatch.setenv("CAFFESERVE_CACHE_DIR", str(d))
    return d


def conv_net(channels: int = 8) -> caffe.NetSpec:
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 12, 12]))
    n.conv = L.Convolution(n.data, num_output=channels, kernel_size=3, pad=1)
    n.relu = L.ReLU(n.conv, in_place=True)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.AVE, global_pooling=True)  # any served spatial size
    n.logits = L.InnerProduct(n.pool, num_output=5)
    n.prob = L.Softmax(n.logits)
    return n


def config(proto, weights, backend="onnxruntime", **extra):
    return parse_config({"name": "m", "backend": backend, "model": {"prototxt": str(proto), "weights": str(weights)},
                         **extra})


def choose(cfg):
    return choose_backend(cfg, probe_load(cfg))


def no_rework(monkeypatch):
    """From here on, loading the Net in this process, converting, gating or timing is a test failure."""
    def refuse(*a, **k):
        raise AssertionError("the cached verdict should have been used")

    monkeypatch.setattr(convert, "load_net", refuse)
    monkeypatch.setattr(convert, "convert_net", refuse)
    monkeypatch.setattr(parity, "check_parity", refuse)
    monkeypatch.setattr(selection, "measure_speed", refuse)


def test_a_restart_is_served_from_the_verdict_without_loading_converting_or_gating(tmp_path, monkeypatch, onnx_cache):
    proto, weights = save_net(conv_net(), tmp_path, "m")
    cfg = config(proto, weights)
    first = choose(cfg)
    assert first.name == "onnxruntime" and first.details["onnx_cache_hit"] is False
    verdicts = list(onnx_cache.glob("*.verdict.json"))
    assert len(verdicts) == 1
    recorded = json.loads(verdicts[0].read_text())
    assert recorded["parity"]["passed"] is True and recorded["onnx_sha256"]
    assert recorded["fields"]["onnxruntime"] and recorded["fields"]["graph"] in first.artifact

    with monkeypatch.context() as m:
        no_rework(m)
        second = choose(cfg)
    assert second.name == "onnxruntime" and second.artifact == first.artifact and second.reason == first.reason
    assert second.details["verdict_cached"] is True and second.details["onnx_cache_hit"] is True
    assert second.details["parity_max_abs_diff"] == first.details["parity_max_abs_diff"]
    # the served graph is the gated one: it carries the logits the gate compared as an extra output
    assert "logits/Gemm" in {o.name for o in onnx.load(first.artifact).graph.output}


def test_changed_graph_bytes_rerun_the_gate(tmp_path, onnx_cache):
    proto, weights = save_net(conv_net(), tmp_path, "m")
    cfg = config(proto, weights)
    path = choose(cfg).artifact
    onnx.save(tamper(onnx.load(path), "logits/weight", 1 + 1e-6), path)  # still passes, but other bytes
    again = choose(cfg)
    assert again.details.get("verdict_cached") is None and again.details["onnx_cache_hit"] is True
    assert again.details["onnx_cache_rejected"] == "the cached graph's bytes are not the ones that passed the gate"
    assert choose(cfg).details["verdict_cached"] is True  # the new bytes' verdict is recorded


@pytest.mark.parametrize("change", ["prototxt", "weights", "input_shape", "outputs", "converter", "onnxruntime",
                                    "tolerance"])
def test_any_keyed_input_that_changes_reruns_the_gate(change, tmp_path, monkeypatch):
    proto, weights = save_net(conv_net(), tmp_path, "m")
    cfg = config(proto, weights)
    choose(cfg)
    assert choose(cfg).details["verdict_cached"] is True
    if change == "prototxt":
        proto.write_text(proto.read_text() + "\n# a comment changes the file\n")
    elif change == "weights":
        _, weights = save_net(conv_net(), tmp_path, "m", seed=1)
    elif change == "input_shape":
        cfg = config(proto, weights, inputs=[{"name": "data", "shape": [1, 3, 16, 16]}])
    elif change == "outputs":
        cfg = config(proto, weights, outputs=[{"name": "prob"}, {"name": "logits"}])
    elif change == "converter":
        monkeypatch.setattr(convert, "CONVERTER_VERSION", "test-next")
    elif change == "onnxruntime":
        import onnxruntime

        monkeypatch.setattr(onnxruntime, "__version__", "99.0.0")
    elif change == "tolerance":
        cfg = config(proto, weights, parityTolerance=2e-5)
    details = choose(cfg).details
    assert details.get("verdict_cached") is None and details["parity_passed"] is True


def test_auto_takes_onnxruntime_only_when_it_measures_faster_and_says_both_figures(tmp_path, monkeypatch):
    proto, weights = save_net(conv_net(), tmp_path, "m")
    cfg = config(proto, weights, backend="auto")
    monkeypatch.setenv("CAFFESERVE_AUTO_MIN_SAVING_MS", "0")  # a net this small saves microseconds
    monkeypatch.setenv("CAFFESERVE_AUTO_MIN_SPEEDUP", "1000")  # no graph is that much faster
    slow = choose(cfg)
    assert slow.name == "pycaffe"
    assert slow.reason.startswith("auto: serving with pycaffe because onnxruntime is not faster here: forward ")
    assert (
        " vs pycaffe " in slow.reason
        and "1000× and 0 ms saved needed); its parity check passed (max |Δ|" in slow.reason
    )
    assert slow.details["speed_pycaffe_ms"] > 0 and slow.details["speed_onnxruntime_ms"] > 0
    monkeypatch.setenv("CAFFESERVE_AUTO_MIN_SPEEDUP", "0")  # any speed will do: the figures come from the verdict
    monkeypatch.setenv("CAFFESERVE_AUTO_MIN_SAVING_MS", "-1000")
    with monkeypatch.context() as m:
        no_rework(m)
        fast = choose(cfg)
    assert fast.name == "onnxruntime" and fast.details["verdict_cached"] is True
    assert fast.reason.startswith("auto: onnxruntime, parity check passed (max |Δ| ")
    monkeypatch.setenv("CAFFESERVE_AUTO_MIN_SAVING_MS", "1000")  # and a saving floor no net reaches
    assert choose(cfg).name == "pycaffe"
    assert f"forward {slow.details['speed_onnxruntime_ms']:.3g} ms vs pycaffe" in fast.reason
    assert fast.details["speedup"] == slow.details["speedup"]


def test_a_verdict_without_timing_gets_timed_when_auto_needs_it(tmp_path, monkeypatch):
    proto, weights = save_net(conv_net(), tmp_path, "m")
    choose(config(proto, weights))  # backend onnxruntime: gated, not timed
    auto = choose(config(proto, weights, backend="auto"))
    assert auto.details["speed_pairs"] >= 5 and auto.details.get("verdict_cached") is None


def test_a_net_the_converter_cannot_take_is_remembered(tmp_path, monkeypatch):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.mvn = L.MVN(n.data)
    proto, weights = save_net(n, tmp_path, "mvn")
    cfg = config(proto, weights, backend="auto")
    first = choose(cfg)
    assert first.name == "pycaffe" and "MVN" in first.reason
    with monkeypatch.context() as m:
        no_rework(m)
        second = choose(cfg)
    assert second.reason == first.reason and second.details["verdict_cached"] is True


def test_digits_is_served_by_pycaffe_under_auto_with_both_figures_and_its_load_time(tmp_path, onnx_cache):
    """ONNX Runtime passes parity on the digits net but runs it at ~0.8× pycaffe's speed here (and a forward of
    0.03 ms could not save the 0.1 ms per forward `auto` asks for in any case)."""
    env = {"CAFFESERVE_CACHE_DIR": str(onnx_cache)}
    for restart in (False, True):
        with ServerProcess(write_digits_config(tmp_path, "auto"), env=env) as server:
            params = settled_backend(server.url, "digits")  # first start: once the check beside serving ends
            assert params["backend"] == "pycaffe", params["backend_reason"]
            assert params["backend_reason"].startswith("auto: serving with pycaffe because onnxruntime is not "
                                                       "faster here: forward "), params["backend_reason"]
            assert params["parity_passed"] is True and params["speed_min_saving_ms"] == 0.1
            assert params.get("verdict_cached", False) is restart
            assert 0 < params["load_probe_seconds"] < params["load_seconds"]
            metrics = http("GET", server.url + "/metrics")[2].decode()
            line = next(ln for ln in metrics.splitlines() if ln.startswith("caffeserve_model_load_seconds{"))
            assert float(line.split()[-1]) == params["load_seconds"]

"""No Caffe failure at load takes the server down: what Caffe refuses with a CHECK / LOG(FATAL) (which
abort the process) is found by the load probe's child process (inference_server/loading/child_load.py). The
server stays live, readiness and model readiness answer 503 with Caffe's own message, and
`caffeserve check` prints it and exits 1.

Each kind is a real model that aborts a plain pycaffe process (the first test proves that: exit by
SIGABRT), served by a real `caffeserve serve` process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import caffe
import pytest
from caffe import layers as L

from caffe_testing import REPO
from caffe_testing.nets import save_net
from caffe_testing.servers import CAFFESERVE, ServerProcess, http_json
from inference_server.commands import check


def small_net() -> caffe.NetSpec:
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4]))
    n.fc = L.InnerProduct(n.data, num_output=6)
    n.prob = L.Softmax(n.fc)
    return n


def baked_reshape_net() -> caffe.NetSpec:
    """A Reshape whose batch size (1) is written in the prototxt: any other batch is a CHECK failure."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4]))
    n.fc = L.InnerProduct(n.data, num_output=6)
    n.grid = L.Reshape(n.fc, shape=dict(dim=[1, 2, 3]))
    return n


def make_case(kind: str, d: Path) -> tuple[dict, str]:
    """(server config, the text Caffe's message must hold) for one failure kind."""
    proto, weights = save_net(small_net(), d, "small")
    extra: dict = {}
    if kind == "unknown_layer":
        bad = d / "unknown.prototxt"
        bad.write_text(proto.read_text().replace('type: "Softmax"', 'type: "Frobnicate"'))
        proto, want = bad, "Unknown layer type: Frobnicate"
    elif kind == "malformed_prototxt":
        bad = d / "malformed.prototxt"
        bad.write_text(proto.read_text() + "\nlayer { name: 'x' typo_field: 3 }\n")
        proto, want = bad, "Check failed: ReadProtoFromTextFile"
    elif kind == "weights_wrong_shape":
        other = caffe.NetSpec()
        other.data = L.Input(shape=dict(dim=[1, 4]))
        other.fc = L.InnerProduct(other.data, num_output=7)  # 7 outputs where the prototxt has 6
        other.prob = L.Softmax(other.fc)
        _, weights = save_net(other, d, "other")
        want = "Cannot copy param 0 weights from layer 'fc'; shape mismatch"
    elif kind == "unreadable_weights":  # the same CHECK as protobuf's 512 MiB limit: ReadProtoFromBinaryFile
        weights = d / "garbage.caffemodel"
        weights.write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + b"not a caffemodel" * 64)
        want = "Check failed: ReadProtoFromBinaryFile"
    elif kind == "served_shape_mismatch":  # served at a shape the InnerProduct's weights do not fit
        extra = {"inputs": [{"name": "data", "shape": [1, 5]}]}
        want = "Check failed: K_ == new_K (4 vs. 5) Input size incompatible with inner product parameters"
    elif kind == "baked_batch_reshape":
        proto, weights = save_net(baked_reshape_net(), d, "baked")
        extra = {"batching": {"enabled": True, "maxBatchSize": 4}}
        want = "Check failed: top[0]->count() == bottom[0]->count()"
    else:
        raise AssertionError(kind)
    cfg = {"name": "broken", "backend": "pycaffe", "model": {"prototxt": str(proto), "weights": str(weights)}, **extra}
    return cfg, want


KINDS = ["unknown_layer", "malformed_prototxt", "weights_wrong_shape", "unreadable_weights", "served_shape_mismatch",
         "baked_batch_reshape"]


def wait_failed(url: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = http_json("GET", url + "/v2/health/ready")
        assert status == 503, body
        if "failed to load" in body.get("error", ""):
            return body
        time.sleep(0.1)
    raise AssertionError(f"the model did not fail within {timeout}s: {body}")


@pytest.mark.parametrize("kind", KINDS)
def test_the_failure_kills_a_plain_pycaffe_process(kind, tmp_path):
    """What the server must survive: pycaffe itself ends the process by SIGABRT for each kind."""
    cfg, want = make_case(kind, tmp_path)
    code = ("import sys, caffe\nnet = caffe.Net(sys.argv[1], caffe.TEST, weights=sys.argv[2])\n"
            "net.blobs['data'].reshape(*map(int, sys.argv[3].split(','))); net.reshape(); net.forward()\n")
    shape = cfg["inputs"][0]["shape"] if "inputs" in cfg else [2, 4]  # batch 2: what the batch probe runs
    r = subprocess.run([sys.executable, "-c", code, cfg["model"]["prototxt"], cfg["model"]["weights"],
                        ",".join(map(str, shape))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGABRT, r.stderr[-1000:]
    assert want in r.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_the_server_stays_up_and_says_why_it_is_not_ready(kind, tmp_path):
    cfg, want = make_case(kind, tmp_path)
    with ServerProcess(cfg, tmp_path, wait_ready=False) as server:
        body = wait_failed(server.url)
        assert body["ready"] is False and want in body["error"], body
        assert "Caffe aborted the load (SIGABRT)" in body["error"]
        status, model = http_json("GET", server.url + "/v2/models/broken/ready")
        assert status == 503 and want in model["error"], model
        for _ in range(3):  # and it keeps answering
            assert http_json("GET", server.url + "/v2/health/live") == (200, {"live": True})
            assert http_json("GET", server.url + "/v2/health/ready")[0] == 503
        assert server.proc.poll() is None


@pytest.mark.parametrize("kind", KINDS)
def test_check_prints_caffes_message_and_exits_1(kind, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAFFESERVE_CACHE_DIR", str(tmp_path / "onnx-cache"))
    import yaml

    cfg, want = make_case(kind, tmp_path)
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert check.main(["--config", str(path), "--runs", "1"]) == 1
    out = capsys.readouterr().out
    assert "model broken: cannot serve: Caffe aborted the load (SIGABRT)" in out and want in out, out


def test_check_as_a_command_exits_1_not_134(tmp_path):
    import yaml

    cfg, want = make_case("unknown_layer", tmp_path)
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(CAFFESERVE + ["check", "--config", str(path)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert want in r.stdout


def test_the_baked_batch_net_names_the_batch_probe_and_serves_one_item_at_a_time(tmp_path):
    """A net that only runs batch 1 is servable when the server never runs more: the failure says how."""
    cfg, want = make_case("baked_batch_reshape", tmp_path)
    with ServerProcess(cfg, tmp_path, wait_ready=False) as server:
        body = wait_failed(server.url)
        assert "while reshaping the Net at batch 2 (the batch probe" in body["error"]
        assert "limits.maxBatch 1 and batching off" in body["error"]
    cfg = {**cfg, "batching": {"enabled": False}, "limits": {"maxBatch": 1}}
    with ServerProcess(cfg, tmp_path) as server:
        status, body = http_json("POST", server.url + "/v2/models/broken/infer", {
            "inputs": [{"name": "data", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]})
        assert status == 200 and body["outputs"][0]["shape"] == [1, 2, 3], body
        status, meta = http_json("GET", server.url + "/v2/models/broken")
        assert meta["parameters"]["load_probe_seconds"] > 0 and meta["parameters"]["load_seconds"] > 0

"""The config file as a user meets it: a bad field stops `caffeserve serve` with exit 2 and names
the field; environment variables override fields; a GPU request on a CPU-only build is a clear
not-ready state, never a crash."""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml

from caffe_testing.nets import dense_net, save_net
from caffe_testing.servers import CAFFESERVE, REPO, ServerProcess, free_port, http, http_json


@pytest.fixture(scope="module")
def model_files(tmp_model_dir):
    save_net(dense_net(4, 3), tmp_model_dir, "net")
    return tmp_model_dir


def base_config() -> dict:
    # relative paths: resolved against the config file's folder, not the server's working directory
    return {"name": "cfgnet", "model": {"prototxt": "net.prototxt", "weights": "net.caffemodel"}}


def run_serve(config_path, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        CAFFESERVE + ["serve", "--config", str(config_path), "--port", str(free_port()), "--grpc-port", "0"],
        cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


INVALID = {
    "instances-zero": ({"instances": 0}, ["instances"]),
    "instances-text": ({"instances": "two"}, ["instances"]),
    "unknown-field": ({"instance": 2}, ["instance", "not permitted"]),
    "device-kind": ({"device": {"kind": "tpu"}}, ["device.kind"]),
    "device-id": ({"device": {"kind": "gpu", "id": -1}}, ["device.id"]),
    "batch-size": ({"batching": {"enabled": True, "maxBatchSize": 0}}, ["batching.maxBatchSize"]),
    "limit-too-small": ({"limits": {"maxRequestBytes": 10}}, ["limits.maxRequestBytes"]),
    "bad-sha": ({"model": {"prototxt": "net.prototxt", "weights": "net.caffemodel", "weightsSha256": "xyz"}},
                ["model.weightsSha256"]),
    "bad-name": ({"name": "a/b"}, ["name"]),
    "no-model": ({"model": None}, ["model"]),
    "two-means": ({"preprocessing": {"meanValues": [1.0], "meanFile": "mean.binaryproto"}},
                  ["preprocessing", "at most one"]),
}


@pytest.mark.parametrize("override,words", INVALID.values(), ids=INVALID.keys())
def test_invalid_config_exits_2_naming_the_field(model_files, override, words):
    path = model_files / "bad.yaml"
    path.write_text(yaml.safe_dump({**base_config(), **override}))
    r = run_serve(path)
    assert r.returncode == 2, r.stderr
    assert "invalid config" in r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_invalid_value_from_the_environment_exits_2_naming_the_field(model_files):
    path = model_files / "ok.yaml"
    path.write_text(yaml.safe_dump(base_config()))
    r = run_serve(path, env={"CAFFESERVE__INSTANCES": "0"})
    assert r.returncode == 2 and "instances" in r.stderr, r.stderr


@pytest.mark.parametrize("content,words", [
    (None, ["cannot read config"]),
    ("name: [unclosed\n", ["not valid YAML"]),
    ("- just\n- a list\n", ["mapping"]),
], ids=["missing-file", "not-yaml", "not-a-mapping"])
def test_unreadable_config_exits_2(model_files, content, words):
    path = model_files / "unreadable.yaml"
    path.unlink(missing_ok=True)
    if content is not None:
        path.write_text(content)
    r = run_serve(path)
    assert r.returncode == 2, r.stderr
    assert all(w in r.stderr for w in words), r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def overridden(model_files):
    cfg = {**base_config(), "limits": {"maxRequestBytes": 1024 * 1024, "max_batch": 4}}  # either spelling works
    env = {"CAFFESERVE__INSTANCES": "2", "CAFFESERVE__NAME": "renamed",
           "CAFFESERVE__LIMITS__MAX_REQUEST_BYTES": "2048"}
    with ServerProcess(cfg, model_files, env=env) as server:
        yield server


def infer_body(batch: int) -> bytes:
    return json.dumps({"inputs": [{"name": "data", "shape": [batch, 4], "datatype": "FP32",
                                   "data": [0.25] * (4 * batch)}]}).encode()


def test_environment_overrides_config_fields(overridden):
    url = overridden.url
    status, meta = http_json("GET", url + "/v2/models/renamed")
    assert status == 200 and meta["name"] == "renamed"
    assert meta["parameters"]["instances"] == 2
    assert http("GET", url + "/v2/models/cfgnet")[0] == 404
    # the environment's 2048-byte limit wins over the file's 1 MiB
    big = infer_body(1) + b" " * 3000
    status, _, body = http("POST", url + "/v2/models/renamed/infer", big)
    assert status == 413 and "2048" in json.loads(body)["error"]
    # the file's snake_case max_batch: 4 is in force too
    status, _, body = http("POST", url + "/v2/models/renamed/infer", infer_body(5))
    assert status == 400 and "1..4" in json.loads(body)["error"]
    status, _, body = http("POST", url + "/v2/models/renamed/infer", infer_body(4))
    assert status == 200, body


def test_two_instances_serve_concurrent_requests_correctly(overridden):
    url = overridden.url + "/v2/models/renamed/infer"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: http("POST", url, infer_body(2)), range(16)))
    bodies = {r[2] for r in results}
    assert all(r[0] == 200 for r in results)
    assert len(bodies) == 1  # the same input gives the same answer whichever Net ran it
    probs = np.array(json.loads(bodies.pop())["outputs"][0]["data"], np.float32)
    assert probs.shape == (6,) and np.allclose(probs.reshape(2, 3).sum(axis=1), 1.0, atol=1e-6)


def gpu_unavailable_reason() -> str | None:
    from inference_server.backends.pycaffe import gpu_problem

    return gpu_problem(0)


@pytest.fixture(scope="module")
def on_gpu(model_files):
    if gpu_unavailable_reason() is None:
        pytest.skip("a GPU is usable here: this test is about machines without one")
    with ServerProcess(base_config(), model_files, env={"CAFFESERVE__DEVICE__KIND": "gpu"}, wait_ready=False) as server:
        yield server


def test_gpu_on_a_cpu_only_machine_is_live_not_ready_with_a_clear_message(on_gpu):
    url = on_gpu.url
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, body = http_json("GET", url + "/v2/health/ready")
        assert status == 503
        if "failed" in body["error"]:
            break
        time.sleep(0.1)
    reason = gpu_unavailable_reason()
    assert reason in body["error"]
    if "CPU-only" in reason:  # this machine's pycaffe: the message says so
        assert "CPU-only" in body["error"] and "device.kind: cpu" in body["error"]
    assert http_json("GET", url + "/v2/health/live") == (200, {"live": True})
    status, _, err = http("POST", url + "/v2/models/cfgnet/infer", infer_body(1))
    assert status == 503 and "gpu" in json.loads(err)["error"]
    time.sleep(0.5)
    assert on_gpu.proc.poll() is None, "the server process ended"

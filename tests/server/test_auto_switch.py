"""`backend: auto` is ready as soon as pycaffe loads, checks onnxruntime beside serving, then switches.

Real servers on loopback, real pycaffe and ONNX Runtime, the real child process of the check. The speed
floors are lowered (CAFFESERVE_AUTO_MIN_SPEEDUP / _SAVING_MS) so that the verdict is onnxruntime whatever
the machine's load: these tests are about the switch, not about which backend is faster.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from caffe import layers as L, params as P

from caffe_testing.nets import forward, save_net
from caffe_testing.servers import ServerProcess, http, http_json, settled_backend

FASTER = {"CAFFESERVE_AUTO_MIN_SPEEDUP": "0", "CAFFESERVE_AUTO_MIN_SAVING_MS": "-1000"}


def conv_net():
    import caffe

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 24, 24]))
    n.conv = L.Convolution(n.data, num_output=16, kernel_size=3, pad=1)
    n.relu = L.ReLU(n.conv, in_place=True)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.AVE, global_pooling=True)
    n.logits = L.InnerProduct(n.pool, num_output=10)
    n.prob = L.Softmax(n.logits)
    return n


def config(proto: Path, weights: Path, **extra) -> dict:
    return {"name": "m", "backend": "auto", "model": {"prototxt": str(proto), "weights": str(weights)}, **extra}


def params_of(url: str) -> dict:
    return http_json("GET", url + "/v2/models/m")[1]["parameters"]


def backend_metrics(url: str) -> list[str]:
    text = http("GET", url + "/metrics")[2].decode()
    return [line for line in text.splitlines() if line.startswith("caffeserve_model_backend")]


class Client(threading.Thread):
    """Keeps sending infer requests, each with its own id and input, until stopped; records every answer."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.sent, self.answers = url, threading.Event(), [], []

    def run(self) -> None:
        rng = np.random.default_rng(1)
        while not self.stop.is_set():
            i = len(self.sent)
            x = rng.normal(0, 1, (1, 3, 24, 24)).astype(np.float32)
            self.sent.append(x)
            body = json.dumps({"id": f"r{i}", "inputs": [{"name": "data", "shape": list(x.shape), "datatype": "FP32",
                                                          "data": x.ravel().tolist()}]}).encode()
            status, headers, raw = http("POST", self.url + "/v2/models/m/infer", body,
                                        {"Content-Type": "application/json"})
            backend = {k.lower(): v for k, v in headers.items()}.get("x-caffeserve-backend")
            self.answers.append((status, backend, json.loads(raw)))


def test_auto_serves_pycaffe_at_once_then_switches_to_onnxruntime_under_traffic(tmp_path, monkeypatch):
    monkeypatch.setenv("CAFFESERVE__ONNX_CACHE__MODEL_FOLDER", "true")  # where the next pod finds the verdict
    proto, weights = save_net(conv_net(), tmp_path / "model", "m", seed=3)
    env = {"CAFFESERVE_CACHE_DIR": str(tmp_path / "local"), **FASTER}
    with ServerProcess(config(proto, weights), tmp_path, env=env) as server:
        first = params_of(server.url)
        assert first["backend"] == "pycaffe" and first["backend_check"] == "running"
        assert first["backend_reason"].startswith("auto: serving with pycaffe while the onnxruntime check")
        assert any('backend="pycaffe"' in line for line in backend_metrics(server.url))

        client = Client(server.url)
        client.start()
        params = settled_backend(server.url, "m")
        time.sleep(0.5)  # requests keep coming after the switch
        client.stop.set()
        client.join(30)

        assert params["backend"] == "onnxruntime", params["backend_reason"]
        assert params["backend_check"] == "done" and params["backend_reason"].startswith("auto: onnxruntime, parity")
        assert params["backend_since"] > first["backend_since"]
        lines = backend_metrics(server.url)
        assert any(line.startswith("caffeserve_model_backend_info{") and 'backend="onnxruntime"' in line
                   for line in lines)
        assert not any('backend_info{backend="pycaffe"' in line for line in lines)  # one series: the backend now
        assert 'caffeserve_model_backend_switches_total{from_backend="pycaffe",model="m",to_backend="onnxruntime",' \
               'version="1"} 1.0' in lines
        since = [ln for ln in lines if ln.startswith("caffeserve_model_backend_since_timestamp_seconds")]
        assert float(since[0].split()[-1]) == pytest.approx(params["backend_since"], abs=1e-2)

        # every request answered once, with its own prediction, by one backend or the other
        assert len(client.answers) == len(client.sent) and len(client.sent) > 10
        backends = set()
        for i, (x, (status, backend, answer)) in enumerate(zip(client.sent, client.answers, strict=True)):
            assert status == 200 and answer["id"] == f"r{i}", answer
            got = np.array(answer["outputs"][0]["data"], np.float32).reshape(answer["outputs"][0]["shape"])
            want = forward(proto, weights, {"data": x})["prob"]
            assert np.abs(got - want).max() <= 1e-5, (i, backend)
            backends.add(backend)
        assert backends == {"pycaffe", "onnxruntime"}
        stats = http_json("GET", server.url + "/v2/models/m/stats")[1]["model_stats"][0]
        assert stats["inference_stats"]["success"]["count"] == len(client.sent)  # none run twice, none lost
        assert stats["inference_stats"]["fail"]["count"] == 0
    assert re.search(r"model m: switched to onnxruntime .* pycaffe's workers drained", server.output())
    # published beside the model (no sharedDir): the next server finds it
    assert list((tmp_path / "model" / ".caffeserve-onnx").glob("*.verdict.json"))


def test_a_second_server_with_an_empty_local_cache_serves_onnxruntime_from_the_shared_cache(tmp_path):
    proto, weights = save_net(conv_net(), tmp_path / "model", "m", seed=4)
    shared = tmp_path / "shared"
    cfg = config(proto, weights, onnxCache={"sharedDir": str(shared)})
    with ServerProcess(cfg, tmp_path, env={"CAFFESERVE_CACHE_DIR": str(tmp_path / "node-a"), **FASTER}) as server:
        assert settled_backend(server.url, "m")["backend"] == "onnxruntime"
    assert len(list(shared.glob("*.onnx"))) == 1 and len(list(shared.glob("*.verdict.json"))) == 1
    assert not list((tmp_path / "model").glob(".caffeserve-onnx"))  # sharedDir given: the model folder stays clean

    node_b = tmp_path / "node-b"
    with ServerProcess(cfg, tmp_path, env={"CAFFESERVE_CACHE_DIR": str(node_b), **FASTER}) as server:
        params = params_of(server.url)
        assert params["backend"] == "onnxruntime" and "backend_check" not in params  # from the start, no check
        assert params["verdict_cached"] is True and params["onnx_cache_found_in"] == "shared"
        assert params["onnx_cache_hit"] is True
        x = np.random.default_rng(2).normal(0, 1, (1, 3, 24, 24)).astype(np.float32)
        status, answer = http_json("POST", server.url + "/v2/models/m/infer", {
            "inputs": [{"name": "data", "shape": [1, 3, 24, 24], "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert status == 200
        got = np.array(answer["outputs"][0]["data"], np.float32).reshape(1, 10)
        assert np.abs(got - forward(proto, weights, {"data": x})["prob"]).max() <= 1e-5
    assert not list(node_b.glob("*.onnx"))  # nothing converted on this node


def test_a_crash_of_the_check_leaves_pycaffe_serving_with_the_reason(tmp_path):
    """The check's child process is killed (as the OOM killer would): pycaffe keeps serving and says why."""
    proto, weights = save_net(conv_net(), tmp_path / "model", "m", seed=5)
    with ServerProcess(config(proto, weights), tmp_path, env={"CAFFESERVE_CACHE_DIR": str(tmp_path / "local")}) \
            as server:
        assert params_of(server.url)["backend_check"] == "running"
        assert server.proc is not None
        checks = [p for p in psutil.Process(server.proc.pid).children()
                  if "inference_server.loading.background" in " ".join(p.cmdline())]
        assert len(checks) == 1
        checks[0].kill()
        params = settled_backend(server.url, "m")
        assert params["backend"] == "pycaffe" and params["backend_check"] == "failed"
        assert params["backend_reason"] == ("auto: serving with pycaffe because the onnxruntime check failed: its "
                                            "process ended (SIGKILL), probably killed for lack of memory")
        assert any('backend_info{backend="pycaffe"' in line and "check failed" in line
                   for line in backend_metrics(server.url))
        x = np.random.default_rng(3).normal(0, 1, (1, 3, 24, 24)).astype(np.float32)
        status, answer = http_json("POST", server.url + "/v2/models/m/infer", {
            "inputs": [{"name": "data", "shape": [1, 3, 24, 24], "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert status == 200
        got = np.array(answer["outputs"][0]["data"], np.float32).reshape(1, 10)
        assert np.abs(got - forward(proto, weights, {"data": x})["prob"]).max() <= 1e-6
        assert http("GET", server.url + "/v2/health/ready")[0] == 200


def test_a_not_faster_verdict_timed_beside_requests_is_not_recorded_but_the_graph_is_shared(tmp_path):
    """ONNX Runtime's timing beside serving is skewed against it: `not faster` found while requests were served
    is said, not kept (the next start times again); the converted graph still goes to the shared cache."""
    proto, weights = save_net(conv_net(), tmp_path / "model", "m", seed=6)
    shared, local = tmp_path / "shared", tmp_path / "local"
    cfg = config(proto, weights, onnxCache={"sharedDir": str(shared)})
    env = {"CAFFESERVE_CACHE_DIR": str(local), "CAFFESERVE_AUTO_MIN_SPEEDUP": "1000"}  # no graph is that fast
    with ServerProcess(cfg, tmp_path, env=env) as server:
        client = Client(server.url)
        client.start()
        params = settled_backend(server.url, "m")
        client.stop.set()
        client.join(30)
        assert params["backend"] == "pycaffe" and params["backend_check"] == "done"
        assert params["backend_reason"].startswith("auto: serving with pycaffe because onnxruntime is not faster")
        assert re.search(r"\(timed while this server answered \d+ requests, so not recorded: the next start "
                         r"times it again\)$", params["backend_reason"]), params["backend_reason"]
        assert params["verdict_recorded"] is False
        assert all(status == 200 for status, _, _ in client.answers)
    assert not list(local.glob("*.verdict.json")) and not list(shared.glob("*.verdict.json"))
    assert len(list(shared.glob("*.onnx"))) == 1  # the next pod skips the conversion, and times on its own


def big_fc_net():
    """95 MiB of weights: the budget below holds pycaffe's load (measured ~107 MiB) and its estimate (159 MiB),
    not pycaffe's Net and onnxruntime's session at once (~214 MiB)."""
    import caffe

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 5000]))
    n.fc = L.InnerProduct(n.data, num_output=5000)
    n.prob = L.Softmax(n.fc)
    return n


@pytest.mark.slow
@pytest.mark.parametrize("budget_mib,serves", [(180, "pycaffe"), (400, "onnxruntime")])
def test_the_switch_holds_both_backends_at_once_so_it_must_fit_the_memory_budget(tmp_path, budget_mib, serves):
    """A many-model server's budget promises no out-of-memory kill: a switch that would pass it while pycaffe
    still serves is refused, pycaffe keeps serving and the reason says so; one that fits goes ahead."""
    proto, weights = save_net(big_fc_net(), tmp_path / "model", "m", seed=7)
    env = {"CAFFESERVE_CACHE_DIR": str(tmp_path / "local"), **FASTER}
    with ServerProcess(config(proto, weights), tmp_path, env=env,
                       args=["--memory-bytes", str(budget_mib * 2**20)]) as server:
        loaded = params_of(server.url)["memory_bytes"]
        params = settled_backend(server.url, "m")
        assert params["backend"] == serves, params["backend_reason"]
        if serves == "pycaffe":
            assert params["backend_check"] == "done"
            assert re.fullmatch(
                r"auto: serving with pycaffe: onnxruntime passed the check, but pycaffe's Net and onnxruntime's "
                r"sessions, held at once during the switch, do not fit: model 'm' does not fit in this server's "
                rf"memory budget: it needs [\d.]+ MiB \(measured\), loaded models hold 0.0 MiB of {budget_mib}.0 MiB "
                r"\(--memory-bytes\); unload a model or load it on another server", params["backend_reason"])
            need = float(re.search(r"it needs ([\d.]+) MiB", params["backend_reason"]).group(1))
            assert need > budget_mib and need * 2**20 > loaded  # both backends' memory, measured
            assert params["memory_bytes"] <= loaded * 1.1  # onnxruntime's sessions were freed again
        x = np.random.default_rng(8).normal(0, 1, (1, 5000)).astype(np.float32)
        body = json.dumps({"inputs": [{"name": "data", "shape": [1, 5000], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        status, headers, raw = http("POST", server.url + "/v2/models/m/infer", body,
                                    {"Content-Type": "application/json"})
        assert status == 200 and {k.lower(): v for k, v in headers.items()}["x-caffeserve-backend"] == serves
        answer = json.loads(raw)
        got = np.array(answer["outputs"][0]["data"], np.float32).reshape(1, 5000)
        assert np.abs(got - forward(proto, weights, {"data": x})["prob"]).max() <= 1e-5
    assert ("does not fit beside pycaffe" in server.output()) == (serves == "pycaffe")

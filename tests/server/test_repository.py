"""One server, many models: `serve --model-repository DIR`, Triton's control modes and repository API (REST
here, with tritonclient.http unchanged; gRPC in test_repository_grpc.py), memory per model and the budget.

Real servers on loopback, real pycaffe nets: the answers are compared with a direct pycaffe forward."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml
from tritonclient.utils import InferenceServerException

from caffe_testing.gateway import DIGITS_DIR, LABELS, digits_config, infer_payload, metric, predicted
from caffe_testing.nets import forward
from caffe_testing.repository import dense_model, write_model
from caffe_testing.servers import ServerProcess, http, http_json


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("repository")
    write_model(root, "digits", digits_config())  # absolute paths: a config may name files anywhere
    nets = {"small": dense_model(root, "small", 16, 4, seed=1), "wide": dense_model(root, "wide", 512, 1000, seed=2)}
    broken = write_model(root, "broken", {"model": {"prototxt": "net.prototxt", "weights": "net.caffemodel"}})
    shutil.copy(nets["small"]["weights"], broken / "net.caffemodel")
    (broken / "net.prototxt").write_text(nets["small"]["proto"].read_text().replace('"Softmax"', '"Frobnicate"'))
    return {"root": root, **nets}


def infer_dense(url: str, model: str, x: np.ndarray) -> tuple[int, dict]:
    return http_json("POST", f"{url}/v2/models/{model}/infer", {"inputs": [
        {"name": "data", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})


def assert_serves(url: str, model: str, net: dict) -> None:
    x = np.random.default_rng(7).random((1, net["inputs"]), dtype=np.float32)
    status, body = infer_dense(url, model, x)
    assert status == 200, body
    want = forward(net["proto"], net["weights"], {"data": x})["prob"]
    np.testing.assert_allclose(np.array(body["outputs"][0]["data"]), want.ravel(), rtol=1e-5, atol=1e-6)


def index(url: str, **body) -> dict[str, dict]:
    status, entries = http_json("POST", url + "/v2/repository/index", body or None)
    assert status == 200
    return {e["name"]: e for e in entries}


@pytest.fixture(scope="module")
def none_mode(repo):
    with ServerProcess(None, repository=repo["root"]) as s:
        yield s


@pytest.fixture(scope="module")
def explicit(repo):
    with ServerProcess(None, repository=repo["root"], args=[
            "--model-control-mode", "explicit", "--load-model", "digits", "--load-model", "small"]) as s:
        yield s


def test_none_mode_loads_every_model_and_a_broken_one_leaves_the_others_serving(none_mode, repo):
    entries = index(none_mode.url)
    assert {n: e["state"] for n, e in entries.items()} == {
        "broken": "UNAVAILABLE", "digits": "READY", "small": "READY", "wide": "READY"}
    assert "Unknown layer type: Frobnicate" in entries["broken"]["reason"]
    assert entries["digits"] == {"name": "digits", "version": "1", "state": "READY", "reason": ""}
    assert [e["name"] for e in http_json("POST", none_mode.url + "/v2/repository/index", {"ready": True})[1]] == [
        "digits", "small", "wide"]
    # each model answers as its own net does; the broken one says why it is not there
    status, body = http_json("POST", none_mode.url + "/v2/models/digits/infer", infer_payload(3))
    assert status == 200 and predicted(body) == LABELS[3]
    assert_serves(none_mode.url, "small", repo["small"])
    assert_serves(none_mode.url, "wide", repo["wide"])
    status, body = http_json("GET", none_mode.url + "/v2/models/broken/ready")
    assert status == 503 and "Frobnicate" in body["error"]
    # the server is ready: each model has its own readiness
    assert http_json("GET", none_mode.url + "/v2/health/ready")[0] == 200


def test_none_mode_refuses_load_and_unload_saying_how_to_enable_them(none_mode):
    for call in ("load", "unload"):
        status, body = http_json("POST", f"{none_mode.url}/v2/repository/models/small/{call}", {})
        assert status == 409, body
        assert "--model-control-mode explicit" in body["error"] and "'none'" in body["error"]
    client = httpclient.InferenceServerClient(none_mode.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match="model-control-mode explicit"):
        client.unload_model("small")
    assert index(none_mode.url)["small"]["state"] == "READY"  # nothing changed
    assert_ready(none_mode.url, "small")


def assert_ready(url: str, model: str) -> None:
    assert http_json("GET", f"{url}/v2/models/{model}/ready") == (200, {"name": model, "ready": True})


def test_each_model_has_its_memory_in_metadata_statistics_and_metrics(none_mode, repo):
    sizes = {}
    for name in ("small", "wide", "digits"):
        status, meta = http_json("GET", f"{none_mode.url}/v2/models/{name}")
        assert status == 200
        params = meta["parameters"]
        assert params["memory_bytes"] >= 0 and params["memory_estimate_bytes"] > 0
        sizes[name] = params["memory_bytes"]
        assert metric(none_mode.url, "caffe_model_memory_bytes", model=name, memory="host") == params["memory_bytes"]
        stats = http_json("GET", f"{none_mode.url}/v2/models/{name}/stats")[1]["model_stats"][0]
        assert stats["memory_usage"] == [{"type": "CPU", "id": 0, "byte_size": params["memory_bytes"]}]
    # the wide net's 2 MB of weights show: it holds more than the 16x4 one
    assert sizes["wide"] > sizes["small"] + repo["wide"]["weights"].stat().st_size // 2
    # each model's request metrics carry its own labels
    infer_dense(none_mode.url, "small", np.zeros((1, 16), np.float32))
    assert metric(none_mode.url, "caffeserve_inference_requests_total", model="small", code="200") >= 1
    assert metric(none_mode.url, "caffeserve_model_ready", model="wide") == 1


def test_explicit_mode_loads_unloads_and_reloads_through_tritonclient(explicit, repo):
    url = explicit.url
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    states = {e["name"]: (e["state"], e["reason"]) for e in client.get_model_repository_index()}
    assert states == {"broken": ("UNAVAILABLE", "not loaded"), "digits": ("READY", ""), "small": ("READY", ""),
                      "wide": ("UNAVAILABLE", "not loaded")}
    status, body = infer_dense(url, "wide", np.zeros((1, 512), np.float32))
    assert status == 404 and "not served here" in body["error"]

    client.load_model("wide")
    assert client.is_model_ready("wide")
    assert_serves(url, "wide", repo["wide"])

    client.unload_model("small")
    assert not client.is_model_ready("small")
    status, headers, body = http("POST", url + "/v2/models/small/infer", b"{}")
    # not loaded here, maybe on another replica: 503 not-run, so a gateway may send it elsewhere
    assert status == 503 and json.loads(body)["error"] == "model 'small' is not loaded on this server (unloaded)"
    assert {k.lower(): v for k, v in headers.items()}["caffe-not-run"] == "true"
    assert index(url)["small"] == {"name": "small", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    assert metric(url, "caffe_model_memory_bytes", model="small", memory="host") == 0
    client.unload_model("small")  # unloading what is not loaded succeeds, as Triton's does
    # the others never stopped
    assert_serves(url, "wide", repo["wide"])
    assert predicted(http_json("POST", url + "/v2/models/digits/infer", infer_payload(5))[1]) == LABELS[5]

    client.load_model("small")  # and back
    assert_serves(url, "small", repo["small"])
    client.load_model("small")  # a reload of a loaded model: it keeps serving throughout
    assert_serves(url, "small", repo["small"])
    # the server stays ready throughout; an unknown model is a 404
    assert http_json("GET", url + "/v2/health/ready")[0] == 200
    with pytest.raises(InferenceServerException, match="not in the repository"):
        client.load_model("nope")
    status, body = http_json("POST", url + "/v2/repository/models/nope/unload", {})
    assert status == 404


def test_a_load_that_fails_answers_caffes_message_and_changes_nothing_else(explicit):
    url = explicit.url
    status, body = http_json("POST", url + "/v2/repository/models/broken/load", {})
    assert status == 400 and "failed to load model 'broken'" in body["error"]
    assert "Unknown layer type: Frobnicate" in body["error"]
    entry = index(url)["broken"]
    assert entry["state"] == "UNAVAILABLE" and "Frobnicate" in entry["reason"]
    assert predicted(http_json("POST", url + "/v2/models/digits/infer", infer_payload(2))[1]) == LABELS[2]


def test_a_load_carries_its_config_as_tritons_parameters_config(explicit, repo):
    """The operator pushes a model's server config (JSON) with the load: a model the folder does not hold."""
    url = explicit.url
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    config = {"model": {"prototxt": str(repo["wide"]["proto"]), "weights": str(repo["wide"]["weights"])},
              "version": "3", "backend": "pycaffe", "limits": {"maxBatch": 2}}
    client.load_model("pushed", config=json.dumps(config))
    assert_serves(url, "pushed", repo["wide"])
    meta = client.get_model_metadata("pushed")
    assert meta["versions"] == ["3"] and meta["parameters"]["max_request_batch"] == 2
    assert index(url)["pushed"]["state"] == "READY"
    # relative paths resolve against the model's folder, here one the repository does not have: `..` still works
    beside = {"model": {"prototxt": f"../wide/{repo['wide']['proto'].name}",
                        "weights": f"../wide/{repo['wide']['weights'].name}"}}
    client.load_model("pushed-beside", config=json.dumps(beside))
    assert_serves(url, "pushed-beside", repo["wide"])
    client.unload_model("pushed-beside")
    # what is wrong with a pushed config is a 400 naming the field, and nothing is loaded
    for bad, words in (({"model": {"prototxt": "x"}}, "model.weights"),
                       ({**config, "name": "other"}, "names the model 'other'"),
                       ({**config, "instances": 0}, "instances")):
        status, body = http_json("POST", url + "/v2/repository/models/pushed2/load",
                                 {"parameters": {"config": json.dumps(bad)}})
        assert status == 400 and words in body["error"], body
    status, body = http_json("POST", url + "/v2/repository/models/pushed2/load",
                             {"parameters": {"config": "{not json"}})
    assert status == 400 and "not valid JSON" in body["error"]
    status, body = http_json("POST", url + "/v2/repository/models/pushed2/load",
                             {"parameters": {"file:1/model.caffemodel": "AAAA"}})
    assert status == 400 and "files in a load call are not supported" in body["error"]
    assert "pushed2" not in index(url)
    client.unload_model("pushed")


def test_an_unload_drains_the_requests_in_flight(tmp_path, repo):
    root = tmp_path / "slow"
    # a lone request waits 1 s for a batch to fill: requests are still in flight when the unload comes
    write_model(root, "slow", digits_config(name="slow", batching={"enabled": True, "maxBatchSize": 8,
                                                                   "maxQueueDelayMs": 1000}))
    with ServerProcess(None, repository=root, args=["--model-control-mode", "explicit", "--load-model", "*"]) as s:

        async def scenario():
            loop = asyncio.get_running_loop()
            body = json.dumps(infer_payload(4)).encode()
            inflight = [loop.run_in_executor(None, http, "POST", s.url + "/v2/models/slow/infer", body)
                        for _ in range(4)]
            while metric(s.url, "caffeserve_inflight_requests", model="slow") < 4:  # all four have arrived
                await asyncio.sleep(0.01)
            unload = loop.run_in_executor(None, http_json, "POST", s.url + "/v2/repository/models/slow/unload", {})
            return await asyncio.gather(*inflight), await unload

        answers, unloaded = asyncio.run(scenario())
        assert unloaded == (200, {})
        assert [a[0] for a in answers] == [200] * 4
        assert all(predicted(json.loads(a[2])) == LABELS[4] for a in answers)
        assert index(s.url)["slow"]["state"] == "UNAVAILABLE"
        assert "unloaded (ready)" in s.output() and "returned to the system" in s.output()


def test_the_memory_budget_refuses_what_does_not_fit_with_a_message(tmp_path, repo):
    root = tmp_path / "budget"
    big = dense_model(root, "big", 2048, 4000, seed=3)  # 32 MiB of weights: estimated at 64 MiB
    write_model(root, "digits", digits_config())
    shutil.copytree(repo["root"] / "small", root / "small")
    budget = 48 * 2**20  # room for digits and the small net, not for the big one
    with ServerProcess(None, repository=root, args=[
            "--model-control-mode", "explicit", "--load-model", "digits", "--memory-bytes", str(budget)]) as s:
        status, body = http_json("POST", s.url + "/v2/repository/models/big/load", {})
        assert status == 507, body
        assert "model 'big' does not fit in this server's memory budget" in body["error"]
        assert "--memory-bytes" in body["error"] and "(estimated)" in body["error"]
        entry = index(s.url)["big"]
        assert entry["state"] == "UNAVAILABLE" and "memory budget" in entry["reason"]
        assert metric(s.url, "caffe_memory_budget_bytes", memory="host") == budget
        # the model that fits keeps serving, and one that fits still loads
        assert predicted(http_json("POST", s.url + "/v2/models/digits/infer", infer_payload(1))[1]) == LABELS[1]
        assert http_json("POST", s.url + "/v2/repository/models/small/load", {}) == (200, {})
        assert_serves(s.url, "small", repo["small"])
        # unloading makes room: the big one fits once the budget is raised... on a server with room for it
    with ServerProcess(None, repository=root, args=[
            "--model-control-mode", "explicit", "--memory-bytes", str(256 * 2**20)]) as s:
        assert http_json("POST", s.url + "/v2/repository/models/big/load", {}) == (200, {})
        assert_serves(s.url, "big", big)


def test_a_config_server_is_a_repository_of_one(tmp_path):
    cfg_path = tmp_path / "server.yaml"
    cfg_path.write_text(yaml.safe_dump(digits_config()))
    with ServerProcess(cfg_path, args=["--model-control-mode", "explicit"]) as s:
        assert index(s.url) == {"digits": {"name": "digits", "version": "1", "state": "READY", "reason": ""}}
        assert http_json("POST", s.url + "/v2/repository/models/digits/unload", {}) == (200, {})
        # its one model unloaded: the server is not ready (a --config server is ready when its model is)
        assert http_json("GET", s.url + "/v2/health/ready") == (
            503, {"ready": False, "error": "model 'digits' is not loaded (unloaded)"})
        assert http_json("POST", s.url + "/v2/repository/models/digits/load", {}) == (200, {})
        assert predicted(http_json("POST", s.url + "/v2/models/digits/infer", infer_payload(6))[1]) == LABELS[6]
        assert http_json("GET", s.url + "/v2/health/ready")[0] == 200
        status, body = http_json("POST", s.url + "/v2/repository/models/resnet/load", {})
        assert status == 404 and "it serves 'digits'" in body["error"]
    assert DIGITS_DIR.is_dir()

"""Triton's statistics and model-configuration extensions, read with `tritonclient.http` as a Triton
user's tooling does: against the server, and through the gateway (which sums a model's replicas)."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from caffe_testing.digits import digits_data
from caffe_testing.gateway import IMAGES, GatewayProcess, digits_config, static
from caffe_testing.servers import ServerProcess, http_json

CONFIG = digits_config(batching={"enabled": True, "maxBatchSize": 8, "maxQueueDelayMs": 1.0})


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats")
    with ServerProcess(CONFIG, tmp) as a, ServerProcess(CONFIG, tmp) as b:
        yield a, b


@pytest.fixture(scope="module")
def gateway(servers):
    with GatewayProcess("--static", static("digits", *servers)) as g:
        yield g


def client_for(url: str) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=url.removeprefix("http://"))


def infer(client, n: int, start: int = 0):
    x = httpclient.InferInput("data", [n, 1, 8, 8], "FP32")
    x.set_data_from_numpy(digits_data.to_blob(IMAGES[start:start + n]).astype(np.float32))
    return client.infer("digits", [x])


def stats_of(client, version: str = "") -> dict:
    answer = client.get_inference_statistics("digits", version)
    assert [s["name"] for s in answer["model_stats"]] == ["digits"]
    return answer["model_stats"][0]


def test_statistics_count_successes_failures_rows_and_phases(servers):
    client = client_for(servers[0].url)
    before = stats_of(client)
    infer(client, 1)
    infer(client, 2, start=5)
    infer(client, 1, start=9)
    bad = httpclient.InferInput("data", [1, 1, 7, 7], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 1, 7, 7), np.float32))
    with pytest.raises(InferenceServerException, match="shape"):
        client.infer("digits", [bad])

    after = stats_of(client, "1")
    phases, was = after["inference_stats"], before["inference_stats"]

    def grew(phase: str) -> tuple[int, int]:
        return phases[phase]["count"] - was[phase]["count"], phases[phase]["ns"] - was[phase]["ns"]

    assert grew("success")[0] == 3 and grew("success")[1] > 0
    assert grew("fail")[0] == 1 and grew("fail")[1] > 0
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        count, ns = grew(phase)
        assert count == 3 and ns > 0, phase
    # each phase is part of the request's whole time
    assert sum(grew(p)[1] for p in ("compute_input", "compute_infer", "compute_output")) <= grew("success")[1]
    assert after["inference_count"] - before["inference_count"] == 4  # batch rows
    assert 1 <= after["execution_count"] - before["execution_count"] <= 3
    assert after["last_inference"] > 0 and after["version"] == "1"
    sizes = {b["batch_size"]: b for b in after["batch_stats"]}
    assert set(sizes) >= {1, 2}
    assert all(b["compute_infer"]["count"] >= 1 and b["compute_infer"]["ns"] > 0 for b in sizes.values())
    # every model at once, as `get_inference_statistics()` with no name asks
    everything = client.get_inference_statistics()
    assert [s["name"] for s in everything["model_stats"]] == ["digits"]
    with pytest.raises(InferenceServerException, match="no version '9'"):
        client.get_inference_statistics("digits", "9")


def test_model_config_in_tritons_shape(servers):
    config = client_for(servers[0].url).get_model_config("digits")
    assert config["name"] == "digits" and config["platform"] == "caffe"
    assert config["backend"] in ("pycaffe", "onnxruntime")
    assert config["max_batch_size"] == 64  # limits.maxBatch: the largest batch one request may carry
    assert config["input"] == [{"name": "data", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [1, 8, 8],
                                "allow_ragged_batch": False, "optional": False}]
    assert config["output"] == [{"name": "prob", "data_type": "TYPE_FP32", "dims": [10],
                                 "label_filename": "labels.txt"}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 1000
    assert config["instance_group"] == [{"name": "digits", "kind": "KIND_CPU", "count": 1, "gpus": []}]
    assert config["parameters"]["batching_max_batch_size"] == {"string_value": "8"}


def test_extensions_are_listed_by_server_and_gateway(servers, gateway):
    for url in (servers[0].url, gateway.url):
        meta = client_for(url).get_server_metadata()
        assert {"statistics", "model_configuration"} <= set(meta["extensions"]), url


def test_gateway_forwards_config_and_sums_statistics_over_replicas(servers, gateway):
    direct = [stats_of(client_for(s.url)) for s in servers]
    client = client_for(gateway.url)
    for i in range(6):  # spread over both replicas by the balancer
        infer(client, 1, start=i)
    replicas = [stats_of(client_for(s.url)) for s in servers]
    summed = stats_of(client)
    assert sum(r["inference_stats"]["success"]["count"] - d["inference_stats"]["success"]["count"]
               for r, d in zip(replicas, direct, strict=True)) == 6
    for phase in ("success", "fail", "queue", "compute_infer"):
        assert summed["inference_stats"][phase]["count"] == sum(r["inference_stats"][phase]["count"] for r in replicas)
        assert summed["inference_stats"][phase]["ns"] == sum(r["inference_stats"][phase]["ns"] for r in replicas)
    assert summed["inference_count"] == sum(r["inference_count"] for r in replicas)
    assert summed["last_inference"] == max(r["last_inference"] for r in replicas)
    assert [s["name"] for s in client.get_inference_statistics()["model_stats"]] == ["digits"]
    assert client.get_model_config("digits") == client_for(servers[0].url).get_model_config("digits")
    status, body = http_json("GET", gateway.url + "/v2/models/nope/stats")
    assert status == 404 and "nope" in body["error"]

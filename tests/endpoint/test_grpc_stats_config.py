"""Triton's statistics and model-configuration extensions over gRPC, read with tritonclient.grpc (in its own
process: its stubs and ours must not share one, kserve#3099) against a server and through the gateway; and
ServerMetadata's extension list, over REST and gRPC, equal to the extensions that answer a real call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from caffe_testing.gateway import GatewayProcess, digits_config, static
from caffe_testing.grpc import grpc_server

CLIENT = Path(__file__).resolve().parent / "clients" / "triton_grpc_extensions.py"
CONFIG = digits_config(batching={"enabled": True, "maxBatchSize": 8, "maxQueueDelayMs": 1.0})
# What each listed extension means, and the REST call that shows it works (the gRPC ones: CLIENT's PROBES).
REST_PROBES = {
    "binary_tensor_data": lambda c: c.infer("digits", [_input(binary=True)],
                                            outputs=[httpclient.InferRequestedOutput("prob", binary_data=True)])
    .as_numpy("prob").shape == (2, 10),
    "classification": lambda c: c.infer("digits", [_input()], outputs=[
        httpclient.InferRequestedOutput("prob", class_count=2)]).as_numpy("prob").shape == (2, 2),
    "statistics": lambda c: c.get_inference_statistics("digits")["model_stats"][0]["name"] == "digits",
    "model_configuration": lambda c: c.get_model_config("digits")["name"] == "digits",
}


def _input(binary: bool = False):
    x = httpclient.InferInput("data", [2, 1, 8, 8], "FP32")
    x.set_data_from_numpy(np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32), binary_data=binary)
    return x


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpc-stats")
    with grpc_server(CONFIG, tmp) as a, grpc_server(CONFIG, tmp) as b:
        yield a, b


@pytest.fixture(scope="module")
def gateway(servers):
    with GatewayProcess("--static", static("digits", *servers)) as g:
        yield g


def ask_grpc(port: int) -> dict:
    r = subprocess.run([sys.executable, str(CLIENT), str(port), "digits"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def rest(url: str) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=url.removeprefix("http://"))


STRING_FIELDS = {"name", "version", "string_value", "label_filename", "backend", "platform"}


def canon(value, key: str = ""):
    """The same message, however it was written: tritonclient.grpc's JSON (protobuf's mapping) writes 64-bit
    integers as strings and leaves out fields at their default (0, false, empty); REST writes them all."""
    if isinstance(value, dict):
        out = {k: canon(v, k) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (0, False, "", [], {})}
    if isinstance(value, list):
        return [canon(v, key) for v in value]
    if isinstance(value, str) and key not in STRING_FIELDS and value.lstrip("-").isdecimal():
        return int(value)
    return value


@pytest.mark.parametrize("where", ["server", "gateway"])
def test_listed_extensions_are_exactly_those_that_work_over_both_protocols(servers, gateway, where):
    target = servers[0] if where == "server" else gateway
    answer = ask_grpc(target.grpc_port)
    rest_listed = rest(target.url).get_server_metadata()["extensions"]
    assert sorted(answer["extensions"]) == sorted(rest_listed), "REST and gRPC list different extensions"
    # a listed extension with no call that shows it (or an implemented one left unlisted) fails here
    assert sorted(rest_listed) == sorted(REST_PROBES)
    assert answer["works"] == {name: True for name in REST_PROBES}, answer["works"]
    client = rest(target.url)
    assert {name: probe(client) for name, probe in REST_PROBES.items()} == {name: True for name in REST_PROBES}


def test_grpc_statistics_and_config_equal_rests_on_the_server(servers):
    server = servers[0]
    answer = ask_grpc(server.grpc_port)
    stats = canon(answer["stats"])["model_stats"]
    assert [s["name"] for s in stats] == ["digits"] and stats[0]["version"] == "1"
    phases = stats[0]["inference_stats"]
    assert phases["success"]["count"] >= 3 and phases["success"]["ns"] > 0  # the client's own calls, counted
    assert phases["compute_infer"]["count"] >= 3 and stats[0]["inference_count"] >= 6
    assert {b["batch_size"] for b in stats[0]["batch_stats"]} >= {2}
    later = rest(server.url).get_inference_statistics("digits")["model_stats"][0]
    assert later["inference_stats"]["success"]["count"] == phases["success"]["count"]  # one set of counters
    assert [s["name"] for s in canon(answer["all_stats"])["model_stats"]] == ["digits"]

    config, expected = canon(answer["config"]), rest(server.url).get_model_config("digits")
    expected = canon(expected)
    for key in ("name", "platform", "backend", "max_batch_size", "input", "output", "instance_group", "parameters"):
        assert config[key] == expected[key], key
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 1000
    assert config["version_policy"] == {"specific": {"versions": [1]}}

    assert answer["errors"]["stats"][0] == "StatusCode.NOT_FOUND" and "'nope'" in answer["errors"]["stats"][1]
    assert answer["errors"]["config"][0] == "StatusCode.NOT_FOUND" and "'nope'" in answer["errors"]["config"][1]


def test_grpc_statistics_through_the_gateway_sum_the_replicas(servers, gateway):
    answer = ask_grpc(gateway.grpc_port)
    summed = canon(answer["stats"])["model_stats"][0]
    replicas = [rest(s.url).get_inference_statistics("digits")["model_stats"][0] for s in servers]
    for phase in ("success", "compute_infer"):
        assert summed["inference_stats"][phase]["count"] == sum(r["inference_stats"][phase]["count"] for r in replicas)
    assert summed["inference_count"] == sum(r["inference_count"] for r in replicas)
    assert canon(answer["config"])["name"] == "digits"
    assert canon(answer["config"])["input"] == canon(rest(servers[0].url).get_model_config("digits"))["input"]
    assert answer["errors"]["stats"] == ["StatusCode.NOT_FOUND", "model 'nope' is not known to the gateway"]
    assert answer["errors"]["config"][0] == "StatusCode.NOT_FOUND"

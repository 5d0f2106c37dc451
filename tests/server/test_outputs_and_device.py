"""Two answers a user reads literally: the metadata's `device` (cpu/gpu, what docs/gpu.md and
scripts/gpu/gpu_check.py compare with), and a request whose `outputs` list is empty, which OIP leaves
ambiguous: answered with every output, as Triton does (never a silent empty answer)."""

from __future__ import annotations

import numpy as np
import pytest

from caffe_testing.gateway import digits_config
from caffe_testing.grpc import OIPClient, grpc_server, infer_request

X = (np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8) % 17) / 4


@pytest.fixture(scope="module")
def server(tmp_model_dir):
    with grpc_server(digits_config(), tmp_model_dir) as s:
        yield s


def test_metadata_device_reads_cpu(server):
    from caffe_testing.servers import http_json

    status, meta = http_json("GET", server.url + "/v2/models/digits")
    assert status == 200 and meta["parameters"]["device"] == "cpu", meta["parameters"]
    status, config = http_json("GET", server.url + "/v2/models/digits/config")
    assert config["instance_group"][0]["kind"] == "KIND_CPU"


def test_an_empty_outputs_list_answers_every_output_over_rest(server):
    from caffe_testing.servers import http_json

    body = {"inputs": [{"name": "data", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": X.ravel().tolist()}]}
    status, all_outputs = http_json("POST", server.url + "/v2/models/digits/infer", body)
    assert status == 200 and [o["name"] for o in all_outputs["outputs"]] == ["prob"]
    status, empty = http_json("POST", server.url + "/v2/models/digits/infer", {**body, "outputs": []})
    assert status == 200, empty
    assert [o["name"] for o in empty["outputs"]] == ["prob"]
    assert empty["outputs"][0]["data"] == all_outputs["outputs"][0]["data"]


def test_an_empty_outputs_list_answers_every_output_over_grpc(server):
    client = OIPClient(server.grpc_port)
    try:
        resp = client.infer(infer_request("digits", {"data": X}, outputs=[]))
        assert [o.name for o in resp.outputs] == ["prob"] and len(resp.raw_output_contents) == 1
    finally:
        client.close()

"""The inference server on requests whose fields are malformed (a 400 naming the field, not a
500) and on a load that fails after its Nets were built (their worker threads are freed)."""

from __future__ import annotations

import threading

import caffe
import pytest
from caffe import layers as L

from caffe_testing.nets import save_net
from inference_server.config import ServerConfig
from inference_server.errors import BadRequest
from inference_server.serving.codecs import decode_request
from inference_server.serving.dataplane import Model
from inference_server.serving.metrics import ServerMetrics

FP32_INPUT = b'{"name":"data","shape":[1],"datatype":"FP32","data":[1.0]}'


@pytest.mark.parametrize(
    "body, headers, words",
    [
        # '\xb2' (superscript two) is a latin-1 header character that str.isdigit() accepts and int() refuses
        (
            b'{"inputs":[' + FP32_INPUT + b"]}",
            {"inference-header-content-length": "\xb2"},
            "Inference-Header-Content-Length",
        ),
        (b'{"inputs":[' + FP32_INPUT + b'],"outputs":[{"name":"prob","parameters":"top1"}]}', {}, "output 'prob'"),
        (b'{"inputs":[' + FP32_INPUT + b'],"outputs":[{"name":"prob","parameters":[1]}]}', {}, "output 'prob'"),
    ],
)
def test_malformed_request_fields_are_a_400_naming_the_field_not_a_500(body, headers, words):
    with pytest.raises(BadRequest) as e:
        decode_request(body, headers, 1000)
    assert words in e.value.message


def _net_workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("net-worker-") and t.is_alive()]


def test_a_load_that_fails_after_the_nets_were_built_frees_their_worker_threads(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    n.prob = L.Softmax(n.data)
    proto, weights = save_net(n, tmp_path, "small")
    cfg = ServerConfig.model_validate({
        "name": "small", "model": {"prototxt": str(proto), "weights": str(weights)}, "instances": 2,
        "inputs": [{"name": "not_an_input"}],
    })
    before = len(_net_workers())
    model = Model(cfg, ServerMetrics("small", "1"))
    model.load()
    assert model.state == "failed" and "not_an_input" in model.error
    assert len(_net_workers()) == before  # two Nets (and their memory) were held for the life of the process

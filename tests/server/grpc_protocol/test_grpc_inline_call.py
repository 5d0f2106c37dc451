"""The common ModelInfer call answered in one step (grpc/inline_call.py) answers what the general path does.

In-process, on the gRPC service the server runs and the real digits net: the first message of a layout goes the
general path (protobuf, then a scan that keeps the layout, then that layout, which keeps the call), later ones
the inline call. Answers, errors and statistics must be the same as the general path's.
"""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import pytest

import inference_server.serving.executor as executor_module
from caffe_http.access_log import configure_logging
from caffe_testing.digits import DIGITS_DIR
from caffe_testing.nets import forward
from inference_server.commands.serve import build
from inference_server.grpc import messages as pb
from inference_server.grpc.codec import laid_out
from inference_server.grpc.service import GRPCServer
from inference_server.grpc.transport import AbortError, CallContext
from inference_server.model_dir import config_from


@pytest.fixture(scope="module")
def served():
    configure_logging("WARNING", "text", io.StringIO())
    cfg, _ = config_from(str(DIGITS_DIR / "server.yaml"), None)
    cfg.backend = "pycaffe"  # no onnxruntime check beside serving: this test is about the call's path
    plane, _server, repo = build(cfg, True, None, str(DIGITS_DIR / "server.yaml"), None, "none")
    model = plane.models["digits"]
    model.load()
    assert model.state == "ready", model.error
    yield GRPCServer(plane, repo, 1 << 20).service, model
    model.close()


@pytest.fixture
def short_forward(monkeypatch, served):
    """Every forward counts as short (runs on the loop), as on an idle machine after the first."""
    monkeypatch.setattr(executor_module, "INLINE_MAX_S", 10.0)
    monkeypatch.setattr(served[1].executor, "row_s", 0.0)


def message(x: np.ndarray, request_id: str = "") -> bytes:
    req = pb.ModelInferRequest(model_name="digits", id=request_id)
    req.inputs.add(name="data", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    return req.SerializeToString()


def call(service, data: bytes, deadline: float | None = None) -> bytes:
    return asyncio.run(service.ModelInfer(data, CallContext(deadline, ())))


def digits(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (1, 1, 8, 8)).astype(np.float32)


def expected(x: np.ndarray) -> np.ndarray:
    files = DIGITS_DIR / "deploy.prototxt", DIGITS_DIR / "digits.caffemodel"
    return forward(*files, {"data": x})["prob"]


@pytest.mark.parametrize("request_id", ["", "call-7"])
def test_later_calls_of_a_layout_are_answered_inline_with_the_general_paths_bytes(served, short_forward, request_id):
    service, model = served
    xs = [digits(i) for i in range(5)]
    answers, inline = [], []
    before = model.stats.inference_count
    for x in xs:
        data = message(x, request_id)
        lay = laid_out(data)
        inline.append(lay is not None and lay.call is not None and lay.call.model is model)
        answers.append(call(service, data))
    # protobuf (inputs kept; a test before may have kept them), a scan (the layout kept), the layout (the call
    # kept), then the call
    assert inline[0] is False and inline[3:] == [True, True], inline
    assert model.stats.inference_count - before == 5
    for x, raw in zip(xs, answers, strict=True):
        resp = pb.ModelInferResponse.FromString(raw)
        assert resp.model_name == "digits" and resp.id == request_id and [o.name for o in resp.outputs] == ["prob"]
        got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(resp.outputs[0].shape)
        assert np.array_equal(got, expected(x))
    # the same message on the general path (the layout's call forgotten) gives the same bytes
    lay = laid_out(message(xs[4], request_id))
    assert lay is not None
    lay.call = None
    assert call(service, message(xs[4], request_id)) == answers[4]


def test_a_passed_deadline_is_the_general_paths_error_and_is_counted_as_a_failure(served, short_forward):
    service, model = served
    for seed in range(4):  # the layout and its call learned
        call(service, message(digits(seed), "late"))
    lay = laid_out(message(digits(9), "late"))
    assert lay is not None and lay.call is not None
    failures = model.stats_json()["inference_stats"]["fail"]["count"]
    with pytest.raises(AbortError) as e:
        call(service, message(digits(9), "late"), deadline=time.monotonic() - 1)
    assert e.value.code.name == "DEADLINE_EXCEEDED" and "deadline passed" in e.value.details
    assert model.stats_json()["inference_stats"]["fail"]["count"] == failures + 1
    # and the next call is answered
    resp = pb.ModelInferResponse.FromString(call(service, message(digits(10), "late")))
    assert resp.id == "late"

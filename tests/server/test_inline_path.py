"""The common binary request answered in one step (serving/inline_path.py) answers what the general path does.

In-process, on the server's own handler chain and the real digits net: the first request with a given JSON
header goes the general path (which keeps the header's plan), later ones the inline path. Their answers,
statistics and metrics must be the same; requests the inline path cannot answer (classification, a wrong
binary size, a batch over the limit) still get the general path's answer or 400.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import orjson
import pytest

import inference_server.serving.app as app_module
import inference_server.serving.executor as executor_module
from caffe_http.access_log import configure_logging
from caffe_http.server import Request, Response
from caffe_testing.digits import DIGITS_DIR
from caffe_testing.nets import forward
from inference_server.backends import BackendChoice
from inference_server.commands.serve import build
from inference_server.errors import BadRequest
from inference_server.model_dir import config_from
from inference_server.serving.codecs import InferRequest, InputTensor, RequestedOutput

PATH = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def served():
    configure_logging("WARNING", "text", io.StringIO())
    cfg, _ = config_from(str(DIGITS_DIR / "server.yaml"), None)
    cfg.backend = "pycaffe"  # no onnxruntime check beside serving: this test is about the request path
    plane, server, _repo = build(cfg, True, None, str(DIGITS_DIR / "server.yaml"), None, "none")
    model = plane.models["digits"]
    model.load()
    assert model.state == "ready", model.error
    yield server, model
    model.close()


@pytest.fixture
def inline_answers(monkeypatch, served) -> list[bool]:
    """One entry per request that reached the data plane: True where the inline path answered it. Every
    forward counts as short, from the first (before any pass is measured, or on a loaded machine, requests
    would go to the worker thread instead; right after one, the worker may still hold the Net)."""
    monkeypatch.setattr(executor_module, "INLINE_MAX_S", 10.0)
    monkeypatch.setattr(served[1].executor, "row_s", 0.0)
    taken: list[bool] = []
    real = app_module.answer_inline

    def spy(model, body, headers):
        done = real(model, body, headers)
        taken.append(done is not None)
        return done

    monkeypatch.setattr(app_module, "answer_inline", spy)
    return taken


def binary_request(x: np.ndarray, header: dict) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps(header)
    return head + x.tobytes(), {"content-type": "application/octet-stream",
                                "inference-header-content-length": str(len(head))}


def header_for(x: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "data", "shape": list(x.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes}}], **extra}


def post(server, body: bytes, headers: dict[str, str], path: str = PATH) -> Response:
    async def go() -> Response:
        return await server.handler(Request("POST", path, "", dict(headers), body, "127.0.0.1:1", 0.0))

    return asyncio.run(go())


def outputs_of(resp: Response) -> tuple[dict, bytes]:
    n = int(resp.headers.get("Inference-Header-Content-Length", len(resp.body)))
    return orjson.loads(resp.body[:n]), resp.body[n:]


def inputs(n: int, batch: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.uniform(0, 16, (batch, 1, 8, 8)).astype(np.float32) for _ in range(n)]


def direct_prob(x: np.ndarray) -> np.ndarray:
    return forward(DIGITS_DIR / "deploy.prototxt", DIGITS_DIR / "digits.caffemodel", {"data": x})["prob"]


def test_a_repeated_header_is_answered_inline_with_the_general_paths_bytes_and_the_nets_values(served, inline_answers):
    server, _ = served
    header = header_for(inputs(1)[0], parameters={"binary_data_output": True})
    xs = inputs(4)
    answers = [post(server, *binary_request(x, header)) for x in [*xs, xs[0]]]
    assert inline_answers == [False, True, True, True, True]
    assert all(r.status == 200 for r in answers), [r.body[:200] for r in answers]
    assert answers[4].body == answers[0].body  # the same input: inline and general give the same bytes
    assert set(answers[4].headers) == set(answers[0].headers)
    for x, resp in zip(xs, answers, strict=False):
        head, tensors = outputs_of(resp)
        assert head["outputs"] == [{"name": "prob", "datatype": "FP32", "shape": [1, 10],
                                    "parameters": {"binary_data_size": 40}}]
        assert resp.headers["X-Caffeserve-Backend"] == "pycaffe"
        got = np.frombuffer(tensors, np.float32).reshape(1, 10)
        assert np.array_equal(got, direct_prob(x))


def test_named_repeated_and_json_outputs_with_an_id_match_the_general_path(served, inline_answers):
    server, _ = served
    x = inputs(1, batch=3)[0]
    header = header_for(x, id="req-7", outputs=[{"name": "prob", "parameters": {"binary_data": True}},
                                                  {"name": "prob"}])
    first, second = (post(server, *binary_request(x, header)) for _ in range(2))
    assert inline_answers == [False, True]
    assert second.body == first.body
    head, tensors = outputs_of(second)
    assert head["id"] == "req-7" and [o["name"] for o in head["outputs"]] == ["prob", "prob"]
    want = direct_prob(x)
    assert np.array_equal(np.frombuffer(tensors, np.float32).reshape(3, 10), want)
    assert np.allclose(np.array(head["outputs"][1]["data"], np.float32).reshape(3, 10), want, atol=1e-7)


def test_what_the_inline_path_cannot_answer_keeps_the_general_paths_answer(served, inline_answers):
    server, model = served
    x = inputs(1)[0]
    classify = header_for(x, outputs=[{"name": "prob", "parameters": {"classification": 2}}])
    answers = [post(server, *binary_request(x, classify)) for _ in range(2)]
    assert inline_answers == [False, False]
    assert answers[0].body == answers[1].body and b"BYTES" in answers[1].body

    short = header_for(x)
    short["inputs"][0]["parameters"]["binary_data_size"] = 128  # half the tensor
    for _ in range(2):
        resp = post(server, *binary_request(x, short))
        assert resp.status == 400 and b"128 bytes of binary data are not claimed by any input" in resp.body, resp.body
    too_big = inputs(1, batch=model.max_batch + 1)[0]
    for _ in range(2):
        resp = post(server, *binary_request(too_big, header_for(too_big)))
        assert resp.status == 400 and b"batch size" in resp.body, resp.body
    body, headers = binary_request(x, header_for(x))
    post(server, body, headers)  # its plan is known from here on
    for _ in range(2):
        resp = post(server, body, {**headers, "inference-header-content-length": str(len(body) + 1)})
        assert resp.status == 400 and b"is not a length within the body" in resp.body, resp.body
    assert not any(inline_answers)


def test_statistics_and_metrics_count_every_request_whichever_path_answered_it(served, inline_answers):
    server, model = served
    x = inputs(1)[0]
    header = header_for(x, parameters={"binary_data_output": True}, id="stats")
    before = model.stats_json()
    hist_before = model.metrics.queue_seconds.counts[:], model.metrics.compute_seconds.counts[:]
    for _ in range(5):
        assert post(server, *binary_request(x, header)).status == 200
    assert inline_answers == [False, True, True, True, True]
    after = model.stats_json()
    stats, stats0 = after["inference_stats"], before["inference_stats"]
    for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[phase]["count"] - stats0[phase]["count"] == 5, phase
        assert stats[phase]["ns"] >= stats0[phase]["ns"], phase
    assert stats["success"]["ns"] > stats0["success"]["ns"]
    assert after["inference_count"] - before["inference_count"] == 5
    assert after["execution_count"] - before["execution_count"] == 5
    assert sum(model.metrics.queue_seconds.counts) - sum(hist_before[0]) == 5
    assert sum(model.metrics.compute_seconds.counts) - sum(hist_before[1]) == 5
    assert model.metrics._codes[200] >= 5


def test_a_backend_change_is_named_in_the_next_inline_answer(served, inline_answers):
    server, model = served
    x = inputs(1)[0]
    header = header_for(x, parameters={"binary_data_output": True}, id="switch")
    assert post(server, *binary_request(x, header)).headers["X-Caffeserve-Backend"] == "pycaffe"
    assert post(server, *binary_request(x, header)).headers["X-Caffeserve-Backend"] == "pycaffe"
    previous = model.choice
    try:
        model.adopt_backend(BackendChoice("onnxruntime", "a test's relabelling"))
        assert post(server, *binary_request(x, header)).headers["X-Caffeserve-Backend"] == "onnxruntime"
    finally:
        model.adopt_backend(previous)
    assert inline_answers == [False, True, True]


def test_a_grpc_request_runs_inline_with_the_outputs_and_statistics_of_run(served, inline_answers):
    """gRPC's ModelInfer tries `Model.run_now` first (no wait, the forward inline), then `run`."""
    _, model = served
    x = inputs(1, batch=2)[0]
    req = InferRequest("g1", [InputTensor("data", [2, 1, 8, 8], "FP32", x)],
                       [RequestedOutput("prob", True), RequestedOutput("prob", False, 3)], True)
    before = model.stats_json()
    now = model.run_now(req)
    assert now is not None
    later = asyncio.run(model.run(req))
    assert [(n, d, b) for n, d, _, b in now] == [(n, d, b) for n, d, _, b in later] == [
        ("prob", "FP32", True), ("prob", "BYTES", False)]
    assert np.array_equal(now[0][2], later[0][2]) and np.array_equal(now[0][2], direct_prob(x))
    assert np.array_equal(now[1][2], later[1][2])
    after = model.stats_json()
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 2
    assert after["inference_count"] - before["inference_count"] == 4

    image = InferRequest(None, [InputTensor("data", [1], "BYTES", np.array([b"\x89PNG"], dtype=object))], None)
    assert model.run_now(image) is None  # an encoded image is decoded off the loop: `run` serves it
    assert model.stats_json()["inference_stats"]["fail"] == after["inference_stats"]["fail"]
    with pytest.raises(BadRequest, match="unknown output 'nope'"):
        model.run_now(InferRequest(None, req.inputs, [RequestedOutput("nope")]))
    assert model.stats_json()["inference_stats"]["fail"]["count"] == after["inference_stats"]["fail"]["count"] + 1

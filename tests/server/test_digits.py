"""The digits example end to end: a digit as a PNG in, the digit out, through the real HTTP server."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from caffe_testing.digits import DIGITS_DIR, digits_data
from caffe_testing.nets import forward
from caffe_testing.servers import ServerProcess, http_json


@pytest.fixture(scope="module")
def server():
    with ServerProcess(DIGITS_DIR / "server.yaml") as s:
        yield s


def classify(url: str, png: bytes) -> str:
    status, body = http_json("POST", url + "/v2/models/digits/infer", {
        "inputs": [{"name": "data", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png).decode()]}],
        "parameters": {"binary_data_output": False},
        "outputs": [{"name": "prob", "parameters": {"classification": 1}}],
    })
    assert status == 200, body
    out = body["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [1, 1]
    return out["data"][0]


def test_held_out_digits_as_png_are_classified_with_at_least_95_percent_accuracy(server):
    images, labels = digits_data.held_out()
    # half at the dataset's 8x8, half upscaled to 32x32 (the server resizes back)
    pngs = [digits_data.render_png(img, 8 if i % 2 else 32) for i, img in enumerate(images)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: classify(server.url, p), pngs))
    predicted = np.array([int(a.split(":")[1]) for a in answers])
    score, _, label = answers[0].split(":")
    assert 0.0 <= float(score) <= 1.0 and label == str(predicted[0])
    accuracy = float((predicted == labels).mean())
    assert accuracy >= 0.95, f"held-out accuracy {accuracy:.3f}"


def test_png_input_gives_the_same_probabilities_as_a_direct_forward(server):
    images, _ = digits_data.held_out()
    pngs = [digits_data.render_png(img, 8) for img in images[:4]]
    status, body = http_json("POST", server.url + "/v2/models/digits/infer", {
        "inputs": [{"name": "data", "shape": [4], "datatype": "BYTES",
                    "data": [base64.b64encode(p).decode() for p in pngs]}],
    })
    assert status == 200, body
    got = np.array(body["outputs"][0]["data"], np.float32).reshape(4, 10)
    ref = forward(DIGITS_DIR / "deploy.prototxt", DIGITS_DIR / "digits.caffemodel",
                  {"data": digits_data.to_blob(images[:4])})["prob"]
    assert np.abs(got - ref).max() <= 1e-6

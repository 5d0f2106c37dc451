"""`tritonclient.http`, a client nobody here wrote, works against the server unchanged:
health, metadata, infer with JSON and binary tensors, and the classification extension."""

from __future__ import annotations

import base64
import io

import caffe
import numpy as np
import pytest
import tritonclient.http as httpclient
from caffe import layers as L
from PIL import Image
from tritonclient.utils import InferenceServerException

from caffe_testing.nets import forward, image_net, save_net
from caffe_testing.servers import ServerProcess

LABELS = ["cat", "dog", "horse", "sea lion", "ship", "truck", "zebra"]


def net() -> caffe.NetSpec:
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 6, 6]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3)
    n.relu = L.ReLU(n.conv, in_place=True)
    n.ip = L.InnerProduct(n.conv, num_output=len(LABELS))
    n.prob = L.Softmax(n.ip)
    n.embedding = L.InnerProduct(n.conv, num_output=3)
    return n


@pytest.fixture(scope="module")
def served(tmp_model_dir):
    proto, weights = save_net(net(), tmp_model_dir, "animals", seed=11)
    labels = tmp_model_dir / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    cfg = {"name": "animals", "version": "3",
           "model": {"prototxt": str(proto), "weights": str(weights), "labels": str(labels)}}
    with ServerProcess(cfg, tmp_model_dir) as server:
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        yield client, proto, weights
        client.close()


def batch(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 2, 6, 6)).astype(np.float32)


def test_health_and_readiness(served):
    client, _, _ = served
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("animals")
    assert client.is_model_ready("animals", "3")
    assert not client.is_model_ready("animals", "4")
    assert not client.is_model_ready("nope")


def test_server_metadata_names_the_extensions_the_client_uses(served):
    client, _, _ = served
    meta = client.get_server_metadata()
    assert meta["name"] == "caffe-serving" and meta["version"]
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])


def test_model_metadata(served):
    client, _, _ = served
    meta = client.get_model_metadata("animals", "3")
    assert meta["name"] == "animals" and meta["versions"] == ["3"] and meta["platform"] == "caffe"
    assert meta["inputs"] == [{"name": "data", "datatype": "FP32", "shape": [-1, 2, 6, 6]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "prob": ("FP32", [-1, len(LABELS)]), "embedding": ("FP32", [-1, 3])}
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert "nope" in e.value.message()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_equals_direct_forward(served, binary):
    client, proto, weights = served
    x = batch(3, seed=1 if binary else 2)
    inp = httpclient.InferInput("data", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("prob", "embedding")]
    result = client.infer("animals", [inp], model_version="3", outputs=outputs, request_id="r1")
    ref = forward(proto, weights, {"data": x})
    for name in ("prob", "embedding"):
        got = result.as_numpy(name)
        assert got.dtype == np.float32 and got.shape == ref[name].shape
        assert np.abs(got - ref[name]).max() <= 1e-6
    resp = result.get_response()
    assert resp["model_name"] == "animals" and resp["model_version"] == "3" and resp["id"] == "r1"
    assert all(("parameters" in o) == binary for o in resp["outputs"])


def test_infer_without_requested_outputs_returns_all(served):
    client, proto, weights = served
    x = batch(1, seed=3)
    inp = httpclient.InferInput("data", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary by default
    result = client.infer("animals", [inp])
    ref = forward(proto, weights, {"data": x})
    for name in ("prob", "embedding"):
        assert np.abs(result.as_numpy(name) - ref[name]).max() <= 1e-6


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_class_count_returns_top_k_as_score_index_label(served, binary):
    client, proto, weights = served
    x = batch(2, seed=4)
    inp = httpclient.InferInput("data", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("prob", binary_data=binary, class_count=3)
    result = client.infer("animals", [inp], outputs=[out])
    top = result.as_numpy("prob")
    assert top.shape == (2, 3)
    ref = forward(proto, weights, {"data": x})["prob"]
    for row, probs in zip(top, ref, strict=True):
        expected = np.argsort(-probs, kind="stable")[:3]
        for entry, idx in zip(row, expected, strict=True):
            text = entry.decode() if isinstance(entry, bytes) else entry
            score, index, label = text.split(":")
            assert int(index) == idx and label == LABELS[idx]
            assert float(score) == pytest.approx(float(probs[idx]), abs=1e-6)


def test_bad_request_raises_the_servers_message(served):
    client, _, _ = served
    x = np.zeros((1, 2, 5, 5), np.float32)
    inp = httpclient.InferInput("data", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        client.infer("animals", [inp])
    assert "'data'" in e.value.message() and "[1, 2, 5, 5]" in e.value.message()
    assert e.value.status() == "400"


@pytest.fixture(scope="module")
def image_model(tmp_model_dir):
    proto, weights = save_net(image_net(len(LABELS)), tmp_model_dir, "pictures", seed=12)
    labels = tmp_model_dir / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    cfg = {"name": "pictures", "model": {"prototxt": str(proto), "weights": str(weights), "labels": str(labels)},
           "preprocessing": {"color": True, "channelSwap": [2, 1, 0], "meanValues": [104.0, 117.0, 123.0]}}
    with ServerProcess(cfg, tmp_model_dir) as server:
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        yield client, proto, weights
        client.close()


def png_and_blob(seed: int) -> tuple[bytes, np.ndarray]:
    """An 8×8 RGB PNG and the blob Caffe's classifier would make of it (BGR, mean subtracted)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    rgb01 = pixels.astype(np.float32) * np.float32(1.0 / 255.0)
    mean = np.array([104, 117, 123], np.float32).reshape(3, 1, 1)
    blob = rgb01.transpose(2, 0, 1)[[2, 1, 0]] * np.float32(255.0) - mean
    return buf.getvalue(), blob


@pytest.mark.parametrize("binary", [False, True], ids=["json-base64", "binary"])
def test_encoded_images_as_bytes_input_with_class_count(image_model, binary):
    client, proto, weights = image_model
    pngs, blobs = zip(*(png_and_blob(s) for s in (1, 2)), strict=True)
    items = [p if binary else base64.b64encode(p) for p in pngs]
    inp = httpclient.InferInput("data", [2], "BYTES")
    inp.set_data_from_numpy(np.array(items, dtype=object), binary_data=binary)
    result = client.infer("pictures", [inp], outputs=[
        httpclient.InferRequestedOutput("prob", binary_data=binary, class_count=2)])
    top = result.as_numpy("prob")
    ref = forward(proto, weights, {"data": np.stack(blobs)})["prob"]
    for row, probs in zip(top, ref, strict=True):
        first = (row[0].decode() if isinstance(row[0], bytes) else row[0]).split(":")
        best = int(np.argmax(probs))
        assert int(first[1]) == best and first[2] == LABELS[best]
        assert float(first[0]) == pytest.approx(float(probs[best]), abs=1e-6)
    # the probabilities themselves equal a direct forward on the blob Caffe's classifier would make
    plain = client.infer("pictures", [inp], outputs=[httpclient.InferRequestedOutput("prob", binary_data=binary)])
    assert np.abs(plain.as_numpy("prob") - ref).max() <= 1e-6

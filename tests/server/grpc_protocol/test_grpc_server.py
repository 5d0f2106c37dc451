"""The gRPC service of a real server: health, metadata, infer with typed and raw contents, images and
classification; and every bad-input case REST's tests cover (test_server_errors.py) gets its gRPC
status and a message that says what is wrong, after which the server still serves: every test ends
with good requests (raw and typed) that get the right answer.

REST cases with no gRPC counterpart: JSON syntax and nesting (a protobuf message has neither: its
counterpart is a message that does not parse), 405 (an unknown RPC is UNIMPLEMENTED, tested), and
slow headers/bodies (HTTP/2 framing is grpc's own)."""

from __future__ import annotations

import io
import struct
import time
import zlib

import caffe
import grpc
import numpy as np
import pytest
from caffe import layers as L
from PIL import Image

from caffe_testing.grpc import OIPClient, assert_status, grpc_server, infer_request, output
from caffe_testing.nets import forward, save_net
from caffe_testing.servers import http
from inference_server.grpc import messages as pb

MAX_REQUEST_BYTES = 256 * 1024
MAX_IMAGE_PIXELS = 10_000
LABELS = ["cat", "dog", "horse", "ship", "truck"]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def image_net() -> caffe.NetSpec:
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3)
    n.relu = L.ReLU(n.conv, in_place=True)
    n.ip = L.InnerProduct(n.conv, num_output=5)
    n.prob = L.Softmax(n.ip)
    return n


def png_bytes(size=(8, 8), color=(200, 30, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of width×height zeros: tens of KB on disk, billions of bits decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row * 1000) for _ in range(height // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class Served:
    def __init__(self, server, proto, weights):
        self.server = server
        self.client = OIPClient(server.grpc_port)
        self.proto, self.weights = proto, weights
        self.x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
        self.ref = forward(proto, weights, {"data": self.x})["prob"]

    def error(self, request, code=INVALID, *words, method="ModelInfer"):
        return assert_status(self.client.error(method, request), code, *words)

    def good_request_succeeds(self):
        for raw in (True, False):
            resp = self.client.infer(infer_request("img", {"data": self.x}, raw=raw))
            assert np.abs(output(resp, "prob") - self.ref).max() <= 1e-6
            assert bool(resp.raw_output_contents) is raw


@pytest.fixture(scope="module")
def img(tmp_model_dir):
    proto, weights = save_net(image_net(), tmp_model_dir, "img")
    labels = tmp_model_dir / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    cfg = {"name": "img", "model": {"prototxt": str(proto), "weights": str(weights), "labels": str(labels)},
           "preprocessing": {"color": True},
           "limits": {"maxRequestBytes": MAX_REQUEST_BYTES, "maxImagePixels": MAX_IMAGE_PIXELS}}
    with grpc_server(cfg, tmp_model_dir) as server:
        served = Served(server, proto, weights)
        yield served
        served.client.close()


def fp32(shape=(1, 3, 8, 8), name="data", values=None):
    t = pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=list(shape))
    n = int(np.prod(shape)) if values is None else values
    t.contents.fp32_contents.extend([0.5] * n)
    return t


def req(*inputs, raw=None, outputs=(), model="img", version=""):
    msg = pb.ModelInferRequest(model_name=model, model_version=version, inputs=list(inputs))
    if raw is not None:
        msg.raw_input_contents.extend(raw)
    for o in outputs:
        msg.outputs.add(name=o)
    return msg


# --- health and metadata


def test_health_and_metadata(img):
    c = img.client
    assert c.call("ServerLive", pb.ServerLiveRequest()).live
    assert c.call("ServerReady", pb.ServerReadyRequest()).ready
    assert c.call("ModelReady", pb.ModelReadyRequest(name="img")).ready
    assert c.call("ModelReady", pb.ModelReadyRequest(name="img", version="1")).ready
    assert not c.call("ModelReady", pb.ModelReadyRequest(name="img", version="9")).ready
    assert not c.call("ModelReady", pb.ModelReadyRequest(name="nope")).ready
    meta = c.call("ServerMetadata", pb.ServerMetadataRequest())
    assert meta.name == "caffe-serving" and meta.version and "classification" in meta.extensions
    meta = c.call("ModelMetadata", pb.ModelMetadataRequest(name="img"))
    assert meta.name == "img" and list(meta.versions) == ["1"] and meta.platform == "caffe"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("data", "FP32", [-1, 3, 8, 8])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("prob", "FP32", [-1, 5])]
    img.error(pb.ModelMetadataRequest(name="nope"), grpc.StatusCode.NOT_FOUND, "'nope'", method="ModelMetadata")
    img.error(pb.ModelMetadataRequest(name="img", version="9"), grpc.StatusCode.NOT_FOUND, "'9'",
              method="ModelMetadata")


# --- inference


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_infer_equals_direct_forward_with_id_and_version(img, raw):
    x = np.random.default_rng(5).random((3, 3, 8, 8), dtype=np.float32)
    resp = img.client.infer(infer_request("img", {"data": x}, raw=raw, version="1", request_id="r-1",
                                          outputs=["prob"]))
    assert resp.model_name == "img" and resp.model_version == "1" and resp.id == "r-1"
    ref = forward(img.proto, img.weights, {"data": x})["prob"]
    got = output(resp, "prob")
    assert got.shape == (3, 5) and np.abs(got - ref).max() <= 1e-6
    assert [o.datatype for o in resp.outputs] == ["FP32"]


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_classification_parameter_returns_top_k_with_labels(img, raw):
    x = np.random.default_rng(6).random((2, 3, 8, 8), dtype=np.float32)
    resp = img.client.infer(infer_request("img", {"data": x}, raw=raw, outputs=[("prob", 3)]))
    top = output(resp, "prob")
    assert top.shape == (2, 3) and resp.outputs[0].datatype == "BYTES"
    ref = forward(img.proto, img.weights, {"data": x})["prob"]
    for row, probs in zip(top, ref, strict=True):
        order = np.argsort(-probs)[:3]
        for entry, i in zip(row, order, strict=True):
            score, index, label = entry.decode().split(":")
            assert int(index) == i and label == LABELS[i] and abs(float(score) - probs[i]) < 1e-5


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_png_images_as_bytes_get_the_configured_preprocessing(img, raw):
    images = [png_bytes(), png_bytes((16, 12), (10, 200, 40))]
    msg = pb.ModelInferRequest(model_name="img")
    t = msg.inputs.add(name="data", datatype="BYTES", shape=[2])
    if raw:
        msg.raw_input_contents.append(b"".join(struct.pack("<I", len(i)) + i for i in images))
    else:
        t.contents.bytes_contents.extend(images)
    got = output(img.client.infer(msg), "prob")
    # the same images through REST give the same answer (one preprocessing for both protocols)
    import base64
    import json

    status, _, body = http(
        "POST",
        img.server.url + "/v2/models/img/infer",
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "data",
                        "shape": [2],
                        "datatype": "BYTES",
                        "data": [base64.b64encode(i).decode() for i in images],
                    }
                ]
            }
        ).encode(),
    )
    assert status == 200
    rest = np.array(json.loads(body)["outputs"][0]["data"], np.float32).reshape(2, 5)
    assert got.shape == (2, 5) and np.abs(got - rest).max() <= 1e-6


# --- bad requests (test_server_errors.py's cases)


def test_a_message_that_does_not_parse_is_invalid_argument(img):
    with pytest.raises(grpc.RpcError) as e:
        img.client.call_raw("ModelInfer", b"\xff\xff\xff\xff not a protobuf")
    assert_status(e.value, INVALID, "malformed ModelInferRequest")
    img.good_request_succeeds()


def test_a_request_without_inputs_is_invalid_argument(img):
    img.error(req(), INVALID, "inputs")
    img.good_request_succeeds()


def test_unknown_input_name_names_it(img):
    img.error(req(fp32(name="pixels")), INVALID, "pixels", "data")
    img.good_request_succeeds()


def test_input_given_twice_names_it(img):
    img.error(req(fp32(), fp32()), INVALID, "'data'", "more than once")
    img.good_request_succeeds()


def test_unknown_output_name_names_it(img):
    img.error(req(fp32(), outputs=["logits"]), INVALID, "logits", "prob")
    img.good_request_succeeds()


def test_wrong_shape_names_the_input_and_the_expected_shape(img):
    img.error(req(fp32((1, 3, 9, 9))), INVALID, "'data'", "[1, 3, 9, 9]", "[-1, 3, 8, 8]")
    img.error(req(fp32((192,))), INVALID, "'data'")
    img.error(req(fp32((1, -3, 8, -8), values=192)), INVALID, "'data'", "negative")
    img.good_request_succeeds()


def test_wrong_datatype(img):
    t = pb.ModelInferRequest.InferInputTensor(name="data", datatype="INT32", shape=[1, 3, 8, 8])
    t.contents.int_contents.extend([1] * 192)
    img.error(req(t), INVALID, "'data'", "INT32", "FP32")
    img.error(req(pb.ModelInferRequest.InferInputTensor(name="data", datatype="FLOAT", shape=[1, 3, 8, 8])),
              INVALID, "'data'", "FLOAT")
    t = pb.ModelInferRequest.InferInputTensor(name="data", datatype="FP32", shape=[1, 3, 8, 8])
    t.contents.bytes_contents.extend([b"a"] * 192)  # JSON's strings-for-numbers: the wrong contents field
    img.error(req(t), INVALID, "'data'", "fp32_contents", "bytes_contents")
    img.good_request_succeeds()


def test_data_length_mismatch_gives_both_counts(img):
    img.error(req(fp32(values=100)), INVALID, "'data'", "192", "100")
    raw_input = pb.ModelInferRequest.InferInputTensor(name="data", datatype="FP32", shape=[1, 3, 8, 8])
    img.error(req(raw_input, raw=[b"\0" * 400]), INVALID, "'data'", "768", "400")
    img.error(req(raw_input, raw=[b"\0" * 768, b"\0" * 768]), INVALID, "raw_input_contents", "2 entries")
    img.error(req(raw_input), INVALID, "'data'", "neither")
    img.good_request_succeeds()


def test_absurd_shape_names_the_input_not_a_crash(img):
    img.error(req(fp32((1, 2**30, 2**30), values=1)), INVALID, "'data'", str(2**60))
    img.error(req(fp32((2**63 - 1, 3, 8, 8), values=1)), INVALID, "'data'")
    img.good_request_succeeds()


def test_batch_over_the_limit(img):
    img.error(req(fp32((65, 3, 8, 8))), INVALID, "'data'", "batch size 65")
    img.good_request_succeeds()


def test_message_over_max_request_bytes_is_resource_exhausted_naming_the_limit(img):
    big = np.zeros((1, 3, 8, 8), np.float32)
    msg = infer_request("img", {"data": big})
    msg.raw_input_contents[0] = b"\0" * (MAX_REQUEST_BYTES + 1)
    err = img.client.error("ModelInfer", msg)
    assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, str(MAX_REQUEST_BYTES))
    img.good_request_succeeds()


def image_request(*images: bytes, shape=None):
    msg = pb.ModelInferRequest(model_name="img")
    msg.inputs.add(name="data", datatype="BYTES", shape=shape or [len(images)]).contents.bytes_contents.extend(images)
    return msg


def test_undecodable_image_bytes(img):
    img.error(image_request(b"this is not an image at all, only text"), INVALID, "'data'", "decode")
    img.error(image_request(png_bytes(), png_bytes((32, 32))[:60]), INVALID, "'data'")
    img.good_request_succeeds()


def test_decompression_bomb_names_the_configured_limit_without_decoding_it(img):
    bomb = png_bomb(20000, 20000)
    start = time.monotonic()
    img.error(image_request(bomb), INVALID, "'data'", "decompression bomb", str(MAX_IMAGE_PIXELS))
    assert time.monotonic() - start < 5
    img.good_request_succeeds()


def test_image_just_over_the_configured_pixel_limit(img):
    img.error(image_request(png_bytes((150, 100))), INVALID, "'data'", str(MAX_IMAGE_PIXELS))
    assert output(img.client.infer(image_request(png_bytes((100, 100)))), "prob").shape == (1, 5)
    img.good_request_succeeds()


def test_image_shape_must_be_one_per_row(img):
    img.error(image_request(png_bytes(), png_bytes(), shape=[1, 2]), INVALID, "'data'", "[N]")
    img.good_request_succeeds()


def test_unknown_model_and_version_are_not_found(img):
    img.error(req(fp32(), model="nope"), grpc.StatusCode.NOT_FOUND, "'nope'")
    img.error(req(fp32(), version="9"), grpc.StatusCode.NOT_FOUND, "'9'")
    resp = img.client.infer(req(fp32(), version="1"))
    assert resp.model_version == "1"
    img.good_request_succeeds()


def test_unknown_rpc_is_unimplemented(img):
    with pytest.raises(grpc.RpcError) as e:
        img.client.call_raw("TraceSetting", b"")  # Triton's, not served here
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    img.good_request_succeeds()


def test_classification_must_be_a_non_negative_integer(img):
    msg = req(fp32())
    msg.outputs.add(name="prob").parameters["classification"].string_param = "three"
    img.error(msg, INVALID, "'prob'", "classification")
    img.good_request_succeeds()


# --- models that are not ready


def wait_grpc_failed(client: OIPClient, model: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        err = client.error("ModelInfer", req(fp32(), model=model))
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        if "failed" in err.details():
            return err
        time.sleep(0.1)
    raise AssertionError("the model did not fail to load")


def test_missing_weights_and_a_sha256_mismatch_are_unavailable_with_the_loaders_message(tmp_model_dir):
    proto, weights = save_net(image_net(), tmp_model_dir, "img")
    cases = [
        (
            {"prototxt": str(proto), "weights": str(tmp_model_dir / "gone.caffemodel")},
            ("gone.caffemodel", "does not exist"),
        ),
        ({"prototxt": str(proto), "weights": str(weights), "weightsSha256": "ab" * 32}, ("sha256", "ab" * 32)),
    ]
    for files, words in cases:
        with grpc_server({"name": "broken", "model": files}, tmp_model_dir, wait_ready=False) as server:
            client = OIPClient(server.grpc_port)
            err = wait_grpc_failed(client, "broken")
            assert_status(err, grpc.StatusCode.UNAVAILABLE, *words)
            trailers = dict(err.trailing_metadata())
            assert trailers["retry-after"].isdigit() and int(trailers["retry-after"]) > 0
            assert_status(client.error("ModelMetadata", pb.ModelMetadataRequest(name="broken")),
                          grpc.StatusCode.UNAVAILABLE, *words)
            assert client.call("ServerLive", pb.ServerLiveRequest()).live
            assert not client.call("ServerReady", pb.ServerReadyRequest()).ready
            assert not client.call("ModelReady", pb.ModelReadyRequest(name="broken")).ready
            assert server.proc.poll() is None
            client.close()


def test_a_model_that_is_loading_is_unavailable_saying_so(tmp_model_dir):
    proto, weights = save_net(image_net(), tmp_model_dir, "img")
    # batching: auto times the net at several batch sizes before it is ready: a loading window to hit
    cfg = {"name": "img", "model": {"prototxt": str(proto), "weights": str(weights)}, "backend": "pycaffe",
           "batching": {"enabled": "auto"}}
    with grpc_server(cfg, tmp_model_dir, wait_ready=False) as server:
        client = OIPClient(server.grpc_port)
        grpc.channel_ready_future(client.channel).result(timeout=30)
        err = client.error("ModelInfer", req(fp32()))
        assert_status(err, grpc.StatusCode.UNAVAILABLE, "'img'", "is loading")
        assert dict(err.trailing_metadata())["retry-after"].isdigit()
        # it did not start the call: a gateway may send it to another replica (REST's Caffe-Not-Run)
        assert dict(err.trailing_metadata())["caffe-not-run"] == "true"
        assert not client.call("ModelReady", pb.ModelReadyRequest(name="img")).ready
        deadline = time.monotonic() + 60
        while not client.call("ServerReady", pb.ServerReadyRequest()).ready:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert client.infer(req(fp32())).outputs[0].name == "prob"
        client.close()

"""Image inputs are prepared exactly as Caffe's own classifier prepares them (caffe.io.Transformer)."""

from __future__ import annotations

import base64
import io

import caffe
import numpy as np
import pytest
import skimage
import skimage.io
from caffe import layers as L
from caffe.proto import caffe_pb2
from PIL import Image

from caffe_testing.nets import forward, save_net
from caffe_testing.servers import ServerProcess, http_json


def caffe_reference_input(png: bytes, mean: np.ndarray, raw_scale: float, swap, scale: float) -> np.ndarray:
    """What Caffe's classifier feeds the net: caffe.io.load_image + Transformer.preprocess."""
    # caffe.io.load_image's own body (it passes `as_grey`, which current scikit-image no longer takes)
    img = skimage.img_as_float(skimage.io.imread(io.BytesIO(png))).astype(np.float32)  # RGB in [0, 1], HxWx3
    t = caffe.io.Transformer({"data": (1, 3, *img.shape[:2])})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", swap)
    t.set_raw_scale("data", raw_scale)
    t.set_mean("data", mean)
    t.set_input_scale("data", scale)
    return t.preprocess("data", img)[None]


@pytest.fixture(scope="module")
def color_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("color")
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 10, 12]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3)
    n.ip = L.InnerProduct(n.conv, num_output=5)
    n.prob = L.Softmax(n.ip)
    proto, weights = save_net(n, d, "colornet")
    mean = caffe_pb2.BlobProto()
    mean.shape.dim.extend([1, 3, 10, 12])
    planes = np.stack([np.full((10, 12), v, np.float32) for v in (104.0, 117.0, 123.0)])
    mean.data.extend(planes.ravel().tolist())
    (d / "mean.binaryproto").write_bytes(mean.SerializeToString())
    cfg = {
        "name": "colornet",
        "model": {"prototxt": str(proto), "weights": str(weights)},
        "preprocessing": {"color": True, "rawScale": 255.0, "channelSwap": [2, 1, 0],
                          "meanFile": "mean.binaryproto", "scale": 0.017},
    }
    with ServerProcess(cfg, d) as server:
        yield server, proto, weights


def test_color_png_with_mean_file_and_channel_swap_matches_caffe_transformer(color_model):
    server, proto, weights = color_model
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    png = buf.getvalue()
    status, body = http_json("POST", server.url + "/v2/models/colornet/infer", {
        "inputs": [{"name": "data", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png).decode()]}],
    })
    assert status == 200, body
    got = np.array(body["outputs"][0]["data"], np.float32)
    x = caffe_reference_input(png, np.array([104.0, 117.0, 123.0]), 255.0, (2, 1, 0), 0.017)
    ref = forward(proto, weights, {"data": x.astype(np.float32)})["prob"].ravel()
    assert np.abs(got - ref).max() <= 1e-6


def test_metadata_marks_the_image_input(color_model):
    server, _, _ = color_model
    status, meta = http_json("GET", server.url + "/v2/models/colornet")
    assert status == 200
    assert meta["inputs"] == [{"name": "data", "datatype": "FP32", "shape": [-1, 3, 10, 12], "parameters": {"image": True}}]

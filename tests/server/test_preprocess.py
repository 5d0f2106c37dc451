"""Image inputs are prepared exactly as Caffe's own classifier prepares them: caffe.io.load_image,
caffe.io.resize_image and caffe.io.Transformer.preprocess, compared here against pycaffe's caffe.io
itself (the repaired module our install ships), resize included, on JPEG and PNG, color and grey,
images smaller and larger than the input, with channel swap, mean values and mean files."""

from __future__ import annotations

import base64
import io

import caffe
import caffe.io
import numpy as np
import pytest
from caffe import layers as L
from caffe.proto import caffe_pb2
from PIL import Image

from caffe_testing.nets import forward, save_net
from caffe_testing.servers import ServerProcess, http_json
from inference_server.config import Preprocessing
from inference_server.serving.preprocess import ImagePreprocessor

MAX_PIXELS = 1 << 24


def encoded(pixels: np.ndarray, mode: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def photo(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient with noise and a bright spot: the min..max stretch and the anti-aliasing both matter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 30 + 120 * yy / height + 60 * xx / width
    pixels = base[..., None] + rng.normal(0, 25, (height, width, channels)) + np.arange(channels) * 10
    pixels[height // 3, width // 2] = 250
    return np.clip(pixels, 0, 255).astype(np.uint8).squeeze()


def write_mean_file(path, mean: np.ndarray) -> None:
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([1, *mean.shape])
    blob.data.extend(mean.ravel().tolist())
    path.write_bytes(blob.SerializeToString())


def read_mean_file(path) -> np.ndarray:
    """As a Caffe user loads a mean.binaryproto for the Transformer."""
    return caffe.io.blobproto_to_array(caffe_pb2.BlobProto.FromString(path.read_bytes()))[0]


def caffe_io_blob(path, color: bool, input_shape, swap=None, mean=None, raw_scale=255.0, scale=None) -> np.ndarray:
    """What Caffe's classify.py feeds the net: caffe.io.load_image + Transformer.preprocess."""
    img = caffe.io.load_image(str(path), color=color)
    t = caffe.io.Transformer({"data": tuple(input_shape)})
    t.set_transpose("data", (2, 0, 1))
    if swap is not None:
        t.set_channel_swap("data", swap)
    t.set_raw_scale("data", raw_scale)
    if mean is not None:
        t.set_mean("data", mean)
    if scale is not None:
        t.set_input_scale("data", scale)
    return t.preprocess("data", img)


# (format, source mode, image H×W, color, input H×W, channel swap, mean: None | "values" | "file" | "file-other-size")
CASES = {
    "png-rgb-down-swap-values": ("PNG", "RGB", (41, 57), True, (16, 20), [2, 1, 0], "values"),
    "jpeg-rgb-up-file": ("JPEG", "RGB", (9, 7), True, (16, 20), None, "file"),
    "jpeg-rgb-down-swap-resized-file": ("JPEG", "RGB", (50, 33), True, (16, 20), [2, 1, 0], "file-other-size"),
    "png-grey-up-values": ("PNG", "L", (6, 11), False, (16, 20), None, "values"),
    "jpeg-grey-down-file": ("JPEG", "L", (45, 38), False, (16, 20), None, "file"),
    "jpeg-rgb-as-grey-down": ("JPEG", "RGB", (40, 47), False, (16, 20), None, None),
    "png-rgba-as-grey-up": ("PNG", "RGBA", (8, 10), False, (16, 20), None, "values"),
    "png-rgba-as-color-down": ("PNG", "RGBA", (30, 30), True, (16, 20), [2, 0, 1], None),
    "png-grey-as-color-down-and-up": ("PNG", "L", (40, 12), True, (16, 20), None, "values"),
    "png-same-size": ("PNG", "RGB", (16, 20), True, (16, 20), [2, 1, 0], "file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_server_preprocessing_equals_caffe_io(case, tmp_path):
    fmt, mode, (h, w), color, (in_h, in_w), swap, mean_kind = CASES[case]
    channels = 3 if color else 1
    pixels = photo(h, w, {"RGB": 3, "RGBA": 4, "L": 1}[mode])
    if mode == "RGBA":
        pixels[..., 3] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]  # alpha varies: it is dropped or composited
    data = encoded(pixels, mode, fmt)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)

    spec = {"color": color, "rawScale": 255.0, "channelSwap": swap, "scale": 0.017}
    mean, mean_path = None, None
    if mean_kind == "values":
        spec["meanValues"] = [104.0, 117.0, 123.0][:channels]
        mean = np.array(spec["meanValues"])
    elif mean_kind is not None:
        mh, mw = (in_h, in_w) if mean_kind == "file" else (24, 27)
        mean_path = tmp_path / "mean.binaryproto"
        write_mean_file(mean_path, np.random.default_rng(1).uniform(90, 130, (channels, mh, mw)))
        spec["meanFile"] = str(mean_path)
        mean = read_mean_file(mean_path)
    shape = (1, channels, in_h, in_w)

    got = ImagePreprocessor(Preprocessing(**spec), shape, MAX_PIXELS, mean_path and str(mean_path)).decode_one(
        "x", data
    )
    ref = caffe_io_blob(path, color, shape, swap, mean, 255.0, 0.017)
    assert got.dtype == np.float32 and got.shape == ref.shape == shape[1:]
    # float rounding only: the blob spans about ±2.5, where one float32 ulp is 2.4e-7
    assert np.abs(got - ref).max() <= 1e-6, case


def test_fast_resize_is_an_option_close_to_caffe_io(tmp_path):
    data = encoded(photo(41, 57, 3), "RGB", "PNG")
    shape = (1, 3, 16, 20)
    exact = ImagePreprocessor(Preprocessing(), shape, MAX_PIXELS).decode_one("x", data)
    fast = ImagePreprocessor(Preprocessing(resize="fast"), shape, MAX_PIXELS).decode_one("x", data)
    assert Preprocessing().resize == "caffe"
    diff = np.abs(exact - fast)
    assert 0 < diff.max() < 60 and diff.mean() < 10  # 0..255 scale: another filter, the same picture


@pytest.fixture(scope="module")
def color_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("color")
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 10, 12]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3)
    n.ip = L.InnerProduct(n.conv, num_output=5)
    n.prob = L.Softmax(n.ip)
    proto, weights = save_net(n, d, "colornet")
    mean = np.random.default_rng(2).uniform(100, 125, (3, 14, 15))  # another size than the input's: resized
    write_mean_file(d / "mean.binaryproto", mean)
    cfg = {
        "name": "colornet",
        "backend": "pycaffe",
        "model": {"prototxt": str(proto), "weights": str(weights)},
        "preprocessing": {"color": True, "rawScale": 255.0, "channelSwap": [2, 1, 0],
                          "meanFile": "mean.binaryproto", "scale": 0.017},
    }
    with ServerProcess(cfg, d) as server:
        yield server, proto, weights, d


def test_served_image_answers_are_caffe_classifiers(color_model):
    """A JPEG larger than the input, over HTTP: the answer is pycaffe's on caffe.io's blob."""
    server, proto, weights, d = color_model
    jpeg = encoded(photo(33, 45, 3, seed=4), "RGB", "JPEG")
    path = d / "request.jpg"
    path.write_bytes(jpeg)
    status, body = http_json("POST", server.url + "/v2/models/colornet/infer", {
        "inputs": [{"name": "data", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(jpeg).decode()]}],
    })
    assert status == 200, body
    got = np.array(body["outputs"][0]["data"], np.float32)
    x = caffe_io_blob(path, True, (1, 3, 10, 12), (2, 1, 0), read_mean_file(d / "mean.binaryproto"), 255.0, 0.017)
    ref = forward(proto, weights, {"data": x[None]})["prob"].ravel()
    assert np.abs(got - ref).max() <= 1e-6


def test_metadata_marks_the_image_input(color_model):
    server = color_model[0]
    status, meta = http_json("GET", server.url + "/v2/models/colornet")
    assert status == 200
    assert meta["inputs"] == [
        {"name": "data", "datatype": "FP32", "shape": [-1, 3, 10, 12], "parameters": {"image": True}}
    ]

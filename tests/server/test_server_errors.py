"""Bad input gets the right HTTP code and a JSON `{"error": ...}` that says what is wrong, and the
server keeps serving: every test ends with a good request that still gets the right answer."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from caffe_testing.nets import forward, image_net, save_net
from caffe_testing.servers import ServerProcess, http, http_json

MAX_REQUEST_BYTES = 256 * 1024
BODY_TIMEOUT_S = 1.0
HEADER_TIMEOUT_S = 1.0
MAX_IMAGE_PIXELS = 10_000


class Served:
    def __init__(self, server, proto, weights):
        self.server, self.url, self.port = server, server.url, server.port
        self.x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
        self.ref = forward(proto, weights, {"data": self.x})["prob"]

    def infer_url(self, model="img"):
        return f"{self.url}/v2/models/{model}/infer"

    def good_request_succeeds(self):
        status, body = http_json("POST", self.infer_url(), {"inputs": [
            {"name": "data", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": self.x.ravel().tolist()}]})
        assert status == 200, body
        got = np.array(body["outputs"][0]["data"], np.float32).reshape(body["outputs"][0]["shape"])
        assert np.abs(got - self.ref).max() <= 1e-6


@pytest.fixture(scope="module")
def img(tmp_model_dir):
    proto, weights = save_net(image_net(5, relu=True), tmp_model_dir, "img")
    cfg = {
        "name": "img",
        "model": {"prototxt": str(proto), "weights": str(weights)},
        "preprocessing": {"color": True},
        "limits": {"maxRequestBytes": MAX_REQUEST_BYTES, "bodyTimeoutS": BODY_TIMEOUT_S,
                   "headerTimeoutS": HEADER_TIMEOUT_S, "maxImagePixels": MAX_IMAGE_PIXELS},
    }
    with ServerProcess(cfg, tmp_model_dir) as server:
        yield Served(server, proto, weights)


def assert_error(status: int, body, expected_status: int, *words: str) -> str:
    """The code, a body of exactly {"error": str}, and a message that mentions every word."""
    if isinstance(body, (bytes, bytearray)):
        body = json.loads(body)
    assert status == expected_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    message = body["error"]
    assert isinstance(message, str) and message
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    return message


def post(url: str, payload) -> tuple[int, dict]:
    return http_json("POST", url, payload)


def fp32_input(**over) -> dict:
    t = {"name": "data", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.5] * 192}
    t.update(over)
    return t


def png_bytes(size=(8, 8), color=(200, 30, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of width×height zeros: tens of KB on disk, billions of bits decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row * 1000) for _ in range(height // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[int | None, bytes, float, bool]:
    """Send raw bytes, then read until the server closes: (status, body, seconds until closed, closed)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks, closed = [], False
        try:
            while True:
                c = s.recv(65536)
                if not c:
                    closed = True
                    break
                chunks.append(c)
        except socket.timeout:
            pass
        except ConnectionResetError:
            closed = True
    elapsed = time.monotonic() - start
    raw = b"".join(chunks)
    if not raw:
        return None, b"", elapsed, closed
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body, elapsed, closed


# --- the request body


def test_malformed_json_is_400(img):
    status, _, body = http("POST", img.infer_url(), b'{"inputs": [{"name": "data", ', {"Content-Type": "application/json"})
    assert_error(status, body, 400, "JSON")
    img.good_request_succeeds()


def test_json_that_is_not_an_infer_request_is_400(img):
    assert_error(*post(img.infer_url(), [1, 2, 3]), 400, "JSON object")
    assert_error(*post(img.infer_url(), {"inputs": []}), 400, "inputs")
    img.good_request_succeeds()


def test_json_nested_deeper_than_100_is_400(img):
    deep = []
    for _ in range(150):
        deep = [deep]
    assert_error(*post(img.infer_url(), {"inputs": [fp32_input()], "parameters": {"x": deep}}), 400, "nested", "100")
    # nesting inside tensor data is refused too (numpy holds 32 dimensions at most)
    status, body = post(img.infer_url(), {"inputs": [fp32_input(data=deep)]})
    assert_error(status, body, 400, "data")
    img.good_request_succeeds()


def test_unknown_input_name_is_400_naming_it(img):
    assert_error(*post(img.infer_url(), {"inputs": [fp32_input(name="pixels")]}), 400, "pixels", "data")
    img.good_request_succeeds()


def test_input_given_twice_is_400_naming_it(img):
    status, body = post(img.infer_url(), {"inputs": [fp32_input(), fp32_input()]})
    assert_error(status, body, 400, "'data'", "more than once")
    img.good_request_succeeds()


def test_unknown_output_name_is_400_naming_it(img):
    status, body = post(img.infer_url(), {"inputs": [fp32_input()], "outputs": [{"name": "logits"}]})
    assert_error(status, body, 400, "logits", "prob")
    img.good_request_succeeds()


def test_wrong_shape_is_400_naming_the_input_and_the_expected_shape(img):
    status, body = post(img.infer_url(), {"inputs": [fp32_input(shape=[1, 3, 9, 9], data=[0.0] * 243)]})
    assert_error(status, body, 400, "'data'", "[1, 3, 9, 9]", "[-1, 3, 8, 8]")
    status, body = post(img.infer_url(), {"inputs": [fp32_input(shape=[192])]})
    assert_error(status, body, 400, "'data'")
    status, body = post(img.infer_url(), {"inputs": [fp32_input(shape=[1, -3, 8, -8])]})
    assert_error(status, body, 400, "'data'", "negative")
    img.good_request_succeeds()


def test_wrong_datatype_is_400(img):
    status, body = post(img.infer_url(), {"inputs": [fp32_input(datatype="INT32", data=[1] * 192)]})
    assert_error(status, body, 400, "'data'", "INT32", "FP32")
    status, body = post(img.infer_url(), {"inputs": [fp32_input(datatype="FLOAT")]})
    assert_error(status, body, 400, "'data'", "FLOAT")
    status, body = post(img.infer_url(), {"inputs": [fp32_input(data=["a"] * 192)]})
    assert_error(status, body, 400, "'data'", "FP32")
    img.good_request_succeeds()


def test_data_length_mismatch_is_400_with_both_counts(img):
    status, body = post(img.infer_url(), {"inputs": [fp32_input(data=[0.5] * 100)]})
    assert_error(status, body, 400, "'data'", "192", "100")
    # the same in the binary extension: binary_data_size disagrees with the shape
    head = json.dumps({"inputs": [{"name": "data", "shape": [1, 3, 8, 8], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 400}}]}).encode()
    status, _, body = http("POST", img.infer_url(), head + b"\0" * 400, {"Inference-Header-Content-Length": str(len(head))})
    assert_error(status, body, 400, "'data'", "768", "400")
    # and a binary_data_size that runs past the end of the body
    status, _, body = http("POST", img.infer_url(), head + b"\0" * 10, {"Inference-Header-Content-Length": str(len(head))})
    assert_error(status, body, 400, "'data'", "binary_data_size")
    img.good_request_succeeds()


def test_absurd_shape_is_400_naming_the_input_not_a_crash(img):
    status, body = post(img.infer_url(), {"inputs": [fp32_input(shape=[1, 2**30, 2**30], data=[0.5])]})
    assert_error(status, body, 400, "'data'", str(2**60))
    status, body = post(img.infer_url(), {"inputs": [fp32_input(shape=[2**64, 3, 8, 8], data=[0.5])]})
    assert_error(status, body, 400, "'data'")
    # a zero makes the element count 0, so a count check alone passes it (it was a 500 from reshape)
    status, body = post(img.infer_url(), {"inputs": [fp32_input(shape=[0, 4611686018427387904, 4], data=[])]})
    assert_error(status, body, 400, "'data'", "shape")
    head = json.dumps({"inputs": [{"name": "data", "shape": [0, 4611686018427387904, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 0}}]}).encode()
    status, _, raw = http("POST", img.infer_url(), head, {"Inference-Header-Content-Length": str(len(head))})
    assert_error(status, raw, 400, "'data'", "shape")
    img.good_request_succeeds()


def test_batch_over_the_limit_is_400(img):
    status, body = post(img.infer_url(), {"inputs": [fp32_input(shape=[65, 3, 8, 8], data=[0.5] * 65 * 192)]})
    assert_error(status, body, 400, "'data'", "batch size 65")
    img.good_request_succeeds()


# --- images


def bytes_input(*images: bytes) -> dict:
    return {"name": "data", "shape": [len(images)], "datatype": "BYTES",
            "data": [base64.b64encode(i).decode() for i in images]}


def test_a_valid_png_is_served(img):
    status, body = post(img.infer_url(), {"inputs": [bytes_input(png_bytes(), png_bytes((16, 12)))]})
    assert status == 200, body
    assert body["outputs"][0]["shape"] == [2, 5]


def test_undecodable_image_bytes_are_400(img):
    status, body = post(img.infer_url(), {"inputs": [bytes_input(b"this is not an image at all, only text")]})
    assert_error(status, body, 400, "'data'", "decode")
    truncated = png_bytes((32, 32))[:60]
    status, body = post(img.infer_url(), {"inputs": [bytes_input(png_bytes(), truncated)]})
    assert_error(status, body, 400, "'data'")
    img.good_request_succeeds()


def test_decompression_bomb_png_is_400_naming_the_configured_limit_without_decoding_it(img):
    bomb = png_bomb(20000, 20000)
    assert len(bomb) < 100_000  # small on disk: the header claims 400 million pixels
    start = time.monotonic()
    status, body = post(img.infer_url(), {"inputs": [bytes_input(bomb)]})
    assert_error(status, body, 400, "'data'", "decompression bomb", str(MAX_IMAGE_PIXELS))
    assert time.monotonic() - start < 5
    img.good_request_succeeds()


def test_image_just_over_the_configured_pixel_limit_is_400(img):
    status, body = post(img.infer_url(), {"inputs": [bytes_input(png_bytes((150, 100)))]})  # 15000 pixels
    assert_error(status, body, 400, "'data'", str(MAX_IMAGE_PIXELS))
    status, body = post(img.infer_url(), {"inputs": [bytes_input(png_bytes((100, 100)))]})  # at the limit: fine
    assert status == 200, body
    img.good_request_succeeds()


def test_image_shape_must_be_one_per_row(img):
    status, body = post(img.infer_url(), {"inputs": [{**bytes_input(png_bytes(), png_bytes()), "shape": [1, 2]}]})
    assert_error(status, body, 400, "'data'", "[N]")
    img.good_request_succeeds()


# --- HTTP level


def test_body_over_the_limit_is_413_before_it_is_sent(img):
    request = (f"POST /v2/models/img/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
               f"Content-Length: {MAX_REQUEST_BYTES + 1}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", img.port), timeout=10) as s:
        start = time.monotonic()
        s.sendall(request)
        first = s.recv(65536)
        answered = time.monotonic() - start
    assert first.startswith(b"HTTP/1.1 413") and answered < BODY_TIMEOUT_S  # at once, not after the body
    # the body it announced is read and dropped (so a client that sends it all still reads the 413),
    # and the connection closes when it does not come within the body deadline
    status, body, elapsed, closed = raw_exchange(img.port, request)
    assert_error(status, body, 413, str(MAX_REQUEST_BYTES))
    assert closed and elapsed < BODY_TIMEOUT_S + 2
    img.good_request_succeeds()


def test_chunked_body_over_the_limit_is_413(img):
    chunk = b"x" * 65536
    piece = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    request = (b"POST /v2/models/img/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               + piece * (MAX_REQUEST_BYTES // len(chunk) + 1))
    status, body, _, closed = raw_exchange(img.port, request)
    assert_error(status, body, 413, str(MAX_REQUEST_BYTES))
    assert closed
    img.good_request_succeeds()


def test_unknown_model_is_404(img):
    for method, path in (("POST", "/v2/models/nope/infer"), ("GET", "/v2/models/nope"), ("GET", "/v2/models/nope/ready")):
        status, _, body = http(method, img.url + path, b"{}" if method == "POST" else None)
        assert_error(status, body, 404, "nope")
    status, _, body = http("GET", img.url + "/v3/anything")
    assert_error(status, body, 404)
    img.good_request_succeeds()


def test_unknown_version_is_404_and_the_served_version_works(img):
    status, _, body = http("POST", img.url + "/v2/models/img/versions/9/infer", json.dumps({"inputs": [fp32_input()]}).encode())
    assert_error(status, body, 404, "'9'")
    status, _, body = http("GET", img.url + "/v2/models/img/versions/9")
    assert_error(status, body, 404, "'9'")
    status, meta = http_json("GET", img.url + "/v2/models/img/versions/1")
    assert status == 200 and meta["name"] == "img"
    status, body = post(img.url + "/v2/models/img/versions/1/infer", {"inputs": [fp32_input()]})
    assert status == 200, body
    img.good_request_succeeds()


def test_wrong_method_is_405_with_allow(img):
    status, headers, body = http("GET", img.infer_url())
    assert_error(status, body, 405)
    assert {k.lower(): v for k, v in headers.items()}["allow"] == "POST"
    status, headers, body = http("PUT", img.url + "/v2/models/img", b"{}")
    assert_error(status, body, 405)
    assert {k.lower(): v for k, v in headers.items()}["allow"] == "GET"
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/metrics", "/", "/v2/models/stats"):
        status, headers, body = http("DELETE", img.url + path)
        assert_error(status, body, 405)
        assert {k.lower(): v for k, v in headers.items()}["allow"] == "GET"
    status, headers, body = http("GET", img.url + "/v2/repository/index")
    assert_error(status, body, 405)
    assert {k.lower(): v for k, v in headers.items()}["allow"] == "POST"
    for method in ("GET", "POST"):  # a path no route has is 404 whatever the method
        for path in ("/v2/health/nope", "/v2/models/img/nope", "/v2/models/img/versions", "/v2/models/img/infer/x"):
            status, _, body = http(method, img.url + path, b"{}" if method == "POST" else None)
            assert_error(status, body, 404, "no route")
    img.good_request_succeeds()


def test_slow_body_gets_408_and_closes_while_other_clients_are_served(img):
    body = json.dumps({"inputs": [fp32_input()]}).encode()
    head = (f"POST /v2/models/img/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    result = {}

    def slow_client():
        # headers and half the body, then nothing: raw_exchange only reads from here on
        result["r"] = raw_exchange(img.port, head + body[: len(body) // 2], timeout=BODY_TIMEOUT_S + 5)

    t = threading.Thread(target=slow_client)
    t.start()
    time.sleep(0.2)
    for _ in range(3):  # served meanwhile, while the slow client holds its connection
        img.good_request_succeeds()
    assert t.is_alive(), "the slow client was answered before its body deadline"
    t.join(BODY_TIMEOUT_S + 10)
    status, err, elapsed, closed = result["r"]
    assert_error(status, err, 408, "body")
    assert closed, "the connection stayed open after the 408"
    assert BODY_TIMEOUT_S * 0.9 <= elapsed < BODY_TIMEOUT_S + 3
    img.good_request_succeeds()


def test_slow_headers_get_408_and_close(img):
    status, err, elapsed, closed = raw_exchange(img.port, b"POST /v2/models/img/infer HTTP/1.1\r\nHost: t\r\nContent-Le",
                                                timeout=HEADER_TIMEOUT_S + 5)
    assert_error(status, err, 408, "headers")
    assert closed and elapsed < HEADER_TIMEOUT_S + 3
    img.good_request_succeeds()


# --- models that are not ready


def wait_for_failed_load(url: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = http_json("GET", url + "/v2/health/ready")
        assert status == 503, body
        if "failed" in body.get("error", ""):
            return body
        time.sleep(0.1)
    raise AssertionError(f"the model did not fail to load within {timeout}s: {body}")


@pytest.fixture(scope="module")
def missing_weights(tmp_model_dir):
    proto, _ = save_net(image_net(5, relu=True), tmp_model_dir, "img")
    cfg = {"name": "broken", "model": {"prototxt": str(proto), "weights": str(tmp_model_dir / "gone.caffemodel")}}
    with ServerProcess(cfg, tmp_model_dir, wait_ready=False) as server:
        yield server


def test_model_with_missing_weights_is_live_but_not_ready_with_the_loaders_message(missing_weights, tmp_model_dir):
    url = missing_weights.url
    body = wait_for_failed_load(url)
    assert body["ready"] is False
    assert str(tmp_model_dir / "gone.caffemodel") in body["error"] and "does not exist" in body["error"]
    assert http_json("GET", url + "/v2/health/live") == (200, {"live": True})
    status, headers, err = http("POST", url + "/v2/models/broken/infer", json.dumps({"inputs": [fp32_input()]}).encode())
    assert_error(status, err, 503, "gone.caffemodel")
    retry_after = {k.lower(): v for k, v in headers.items()}["retry-after"]
    assert retry_after.isdigit() and int(retry_after) > 0
    for path in ("/v2/models/broken", "/v2/models/broken/ready"):
        status, _, err = http("GET", url + path)
        assert_error(status, err, 503, "gone.caffemodel")
    assert missing_weights.proc.poll() is None  # still running


@pytest.fixture(scope="module")
def wrong_sha(tmp_model_dir):
    proto, weights = save_net(image_net(5, relu=True), tmp_model_dir, "img")
    cfg = {"name": "tampered", "model": {"prototxt": str(proto), "weights": str(weights), "weightsSha256": "ab" * 32}}
    with ServerProcess(cfg, tmp_model_dir, wait_ready=False) as server:
        yield server, weights


def test_sha256_mismatch_refuses_to_load_naming_the_file(wrong_sha):
    server, weights = wrong_sha
    body = wait_for_failed_load(server.url)
    assert str(weights) in body["error"] and "sha256" in body["error"] and "ab" * 32 in body["error"]
    status, _, err = http("POST", server.url + "/v2/models/tampered/infer", json.dumps({"inputs": [fp32_input()]}).encode())
    assert_error(status, err, 503, "sha256")
    assert http_json("GET", server.url + "/v2/health/live")[0] == 200


def test_null_in_numeric_data_is_400_not_nan(img):
    data = [0.5] * 192
    data[7] = None
    status, body = post(img.infer_url(), {"inputs": [fp32_input(data=data)]})
    assert_error(status, body, 400, "'data'", "null")
    img.good_request_succeeds()


@pytest.mark.parametrize("bad, words", [
    ("2.5", ("'data'", "numbers")),    # a numeric string
    (True, ("'data'", "numbers")),     # a boolean among floats' place
    (1e300, ("'data'", "out of the range of FP32")),
])
def test_non_numbers_and_out_of_range_values_in_fp32_data_are_400(img, bad, words):
    data = [bad] * 192 if isinstance(bad, (str, bool)) else [0.5] * 191 + [bad]
    status, body = post(img.infer_url(), {"inputs": [fp32_input(data=data)]})
    assert_error(status, body, 400, *words)
    img.good_request_succeeds()

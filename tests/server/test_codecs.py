"""The request codec on its own (no server): shape arithmetic that cannot overflow or crash, and
the large-body JSON decoder, which must give exactly what the orjson path gives, or a 400."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from inference_server.errors import BadRequest
from inference_server.serving.codecs import decode_request

MAX = 1 << 20


def _binary(shape, datatype="FP32", payload=b"") -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": "data", "shape": shape, "datatype": datatype,
                                   "parameters": {"binary_data_size": len(payload)}}]}).encode()
    return head + payload, {"inference-header-content-length": str(len(head))}


@pytest.mark.parametrize("shape", [
    [0, 4611686018427387904, 4],  # the issue's: 0 elements, but no array of this shape can be built
    [4611686018427387904, 0],
    [0, 2**63 - 1, 2**63 - 1, 2],
    [0] + [2**20] * 31,
    [1] * 33,  # more dimensions than numpy allows
    [0, MAX + 1],
])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_crafted_shape_with_a_zero_is_a_400_naming_the_input_not_a_500(shape, binary):
    if binary:
        body, headers = _binary(shape)
    else:
        body, headers = json.dumps({"inputs": [{"name": "data", "shape": shape, "datatype": "FP32",
                                                "data": []}]}).encode(), {}
    with pytest.raises(BadRequest) as e:
        decode_request(body, headers, MAX)
    assert "input 'data'" in e.value.message and "shape" in e.value.message


@pytest.mark.parametrize("datatype", ["FP32", "INT8", "BOOL", "BYTES"])
def test_an_empty_tensor_with_a_sane_shape_still_decodes(datatype):
    body, headers = _binary([0, 3, 4], datatype)
    got = decode_request(body, headers, MAX).inputs[0].array
    assert got.size == 0
    if datatype != "BYTES":
        assert got.shape == (0, 3, 4)


def test_bytes_binary_elements_with_a_huge_shape_are_a_400():
    payload = struct.pack("<I", 1) + b"x"
    body, headers = _binary([1, 2**62], "BYTES", payload)
    with pytest.raises(BadRequest):
        decode_request(body, headers, MAX)


# --- the large-body decoder (jsonscan) gives what orjson gives


def _decode_both(payload: bytes):
    """(result of the small-body path, result of the large-body path): arrays, or the BadRequest."""
    out = []
    for stream_min in (1 << 30, 0):
        try:
            req = decode_request(payload, {}, MAX, stream_min_bytes=stream_min)
            out.append([(t.name, t.datatype, t.array) for t in req.inputs])
        except BadRequest as e:
            out.append(e)
    return out


def _inp(data, shape, datatype="FP32", name="data", **extra) -> dict:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data, **extra}


CASES = {
    "flat fp32": [_inp([0.5, -1, 2e-3, 1e10, 0], [5])],
    "nested fp32": [_inp([[[1, 2], [3, 4]], [[5, 6.5], [7, 8]]], [2, 2, 2])],
    "fp16 out of range": [_inp([1, 70000], [2], "FP16")],
    "fp32 out of range": [_inp([1, 1e300], [2])],
    "fp64": [_inp([1.0000000000000002, -3], [2], "FP64")],
    "int8": [_inp([-128, 0, 127], [3], "INT8")],
    "int8 out of range": [_inp([-129, 0], [2], "INT8")],
    "uint8 negative": [_inp([1, -1], [2], "UINT8")],
    "int32 with a float": [_inp([1, 2.0], [2], "INT32")],
    "int32 with an exponent": [_inp([1, 1e3], [2], "INT32")],
    "int64 large": [_inp([2**62, -(2**63)], [2], "INT64")],
    "uint64 above int64": [_inp([2**64 - 1, 0], [2], "UINT64")],
    "uint64 too large": [_inp([2**64], [1], "UINT64")],
    "bool": [_inp([True, False, True], [3], "BOOL")],
    "bool given numbers": [_inp([1, 0], [2], "BOOL")],
    "bytes": [_inp(["a", "b\"c", "d\\\\"], [3], "BYTES")],
    "bytes given numbers": [_inp([1, 2], [2], "BYTES")],
    "null among numbers": [_inp([1.0, None], [2])],
    "string among numbers": [_inp([1.0, "2"], [2])],
    "numbers after a string": [_inp(["2", 1.0], [2])],
    "strings for fp32": [_inp(["1", "2"], [2])],
    "count mismatch": [_inp([1, 2, 3], [2])],
    "empty": [_inp([], [0, 3])],
    "two inputs": [_inp([1, 2], [2], name="a"), _inp([[3], [4]], [2, 1], "INT16", name="b")],
    "a key named data elsewhere": [_inp([1, 2], [2], parameters={"data": [9, 9, 9]})],
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_large_body_decoder_agrees_with_orjson(name):
    payload = json.dumps({"id": 'x "data": [1]', "inputs": CASES[name]}).encode()
    small, large = _decode_both(payload)
    if isinstance(small, BadRequest):
        assert isinstance(large, BadRequest), (small.message, large)
        return
    assert not isinstance(large, BadRequest), (large.message, small)
    assert len(small) == len(large)
    for (n1, d1, a1), (n2, d2, a2) in zip(small, large, strict=True):
        assert (n1, d1) == (n2, d2)
        assert a1.dtype == a2.dtype and a1.shape == a2.shape, (a1, a2)
        assert (a1 == a2).all(), (a1, a2)


@pytest.mark.parametrize("text", [
    b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2,]}]}',
    b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1 2]}]}',
    b'{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2][3,4]]}]}',
    b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,,2]}]}',
    b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]]}]}',
    b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]',
    b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[+1,2]}]}',
    b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2e]}]}',
    b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[{"a":1}]}]}',
    b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["unterminated]}]}',
])
def test_malformed_tensor_data_is_a_400_on_both_paths(text):
    small, large = _decode_both(text)
    assert isinstance(small, BadRequest) and isinstance(large, BadRequest), (small, large)


def test_a_large_body_is_decoded_in_pieces_to_the_same_array():
    x = np.random.default_rng(0).normal(size=(3, 100_000)).astype(np.float32)
    for nested in (False, True):
        data = x.tolist() if nested else x.ravel().tolist()
        payload = json.dumps({"inputs": [_inp(data, [3, 100_000])]}).encode()
        assert len(payload) > 4 * 512 * 1024  # several pieces
        small, large = _decode_both(payload)
        assert (small[0][2] == large[0][2]).all() and large[0][2].dtype == np.float32


def test_non_numbers_among_many_numbers_are_refused_before_any_array_is_built():
    body = b'{"inputs":[{"name":"big","shape":[1000001],"datatype":"FP32","data":[' + b"1.5," * 1_000_000 + b'"x"]}]}'
    with pytest.raises(BadRequest) as e:
        decode_request(body, {}, 10**7)
    assert "input 'big'" in e.value.message and "mixes numbers" in e.value.message


def test_the_model_check_runs_before_any_tensor_is_built():
    seen = []

    def check(name, datatype, shape):
        seen.append((name, datatype, shape))
        raise BadRequest(f"input '{name}': batch size {shape[0]} is outside 1..64")

    body = json.dumps({"inputs": [_inp([0.5] * 200_000, [100_000, 2])]}).encode()
    with pytest.raises(BadRequest, match="batch size 100000"):
        decode_request(body, {}, MAX, check=check)
    assert seen == [("data", "FP32", [100_000, 2])]


def test_a_repeated_binary_header_decodes_each_request_s_own_data_and_still_refuses_a_bad_one():
    """The model's plans remember a header it has decoded (codecs.Plans): the second request with the same
    header gets its own values, and a header whose binary part no longer fits is still a 400."""
    plans: dict = {}
    checked: list = []
    x1, x2 = np.arange(4, dtype=np.float32), np.arange(4, 8, dtype=np.float32)
    for x in (x1, x2, x1):
        body, headers = _binary([1, 4], payload=x.tobytes())
        req = decode_request(body, headers, MAX, lambda *a: checked.append(a), plans=plans)
        np.testing.assert_array_equal(req.inputs[0].array, x.reshape(1, 4))
    assert len(plans) == 1 and len(checked) == 1  # checked once, by the model, when first seen
    head_len = int(headers["inference-header-content-length"])
    with pytest.raises(BadRequest, match="binary_data_size 16 runs past the binary data"):
        decode_request(body[: head_len + 12], headers, MAX, lambda *a: None, plans=plans)

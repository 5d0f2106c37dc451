"""The request codec on its own (no server): shape arithmetic that cannot overflow or crash, and
the large-body JSON decoder, which must give exactly what the orjson path gives, or a 400."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from inference_server.codecs import decode_request
from inference_server.errors import BadRequest

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

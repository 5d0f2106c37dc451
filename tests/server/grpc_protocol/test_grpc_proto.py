"""The gRPC service definition and codec, without a server: the checked-in descriptors match the
.proto files, the messages are wire-identical to the ones tritonclient.grpc ships (checked in a
subprocess: this process never imports tritonclient.grpc), and every datatype REST supports
decodes from typed `contents` and from raw contents to the same numpy array."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from caffe_testing import REPO
from inference_server.errors import GRPC_STATUS_OF_HTTP, BadRequest, InferenceError, Unavailable
from inference_server.grpc import messages as pb
from inference_server.grpc.codec import decode_infer_request, encode_infer_response
from inference_server.grpc.generate import PROTOS, compile_descriptors, render
from inference_server.grpc.status import error_status
from inference_server.serving.codecs import DTYPES

GRPC_DIR = REPO / "inference_server" / "grpc"
OIP_MESSAGES = [m for m in pb.POOL.FindFileByName("open_inference_grpc.proto").message_types_by_name]


def test_checked_in_descriptors_match_the_proto_files():
    assert (GRPC_DIR / "_descriptors.py").read_text() == render(compile_descriptors()), \
        "inference_server/grpc/_descriptors.py is stale: run python -m inference_server.grpc.generate"
    assert set(PROTOS) == {p.name for p in GRPC_DIR.glob("*.proto")}


def _fields(desc, prefix="") -> dict:
    out = {}
    for f in desc.fields:
        out[prefix + f.name] = [f.number, f.type, f.label if hasattr(f, "label") else None,
                                f.message_type.full_name if f.message_type else None]
    for nested in desc.nested_types:
        if not nested.GetOptions().map_entry:
            out.update(_fields(nested, f"{prefix}{nested.name}."))
    return out


DUMP_TRITON = """
import json, sys
import tritonclient.grpc.service_pb2 as s
from google.protobuf import descriptor_pool
pool = descriptor_pool.Default()
def fields(desc, prefix=""):
    out = {}
    for f in desc.fields:
        out[prefix + f.name] = [f.number, f.type, f.label if hasattr(f, "label") else None,
                                f.message_type.full_name if f.message_type else None]
    for n in desc.nested_types:
        if not n.GetOptions().map_entry:
            out.update(fields(n, f"{prefix}{n.name}."))
    return out
names = json.loads(sys.argv[1])
svc = pool.FindServiceByName("inference.GRPCInferenceService")
print(json.dumps({
    "messages": {n: fields(pool.FindMessageTypeByName("inference." + n)) for n in names},
    "methods": {m.name: [m.input_type.full_name, m.output_type.full_name] for m in svc.methods},
}))
"""


def test_messages_and_rpcs_are_wire_identical_to_tritonclients():
    """Triton's grpc_service.proto extends the OIP: every message and RPC we define exists there with
    the same field names, numbers and types (a field it adds on top is fine)."""
    r = subprocess.run([sys.executable, "-c", DUMP_TRITON, json.dumps(OIP_MESSAGES)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    theirs = json.loads(r.stdout)
    for name in OIP_MESSAGES:
        ours = _fields(pb.POOL.FindMessageTypeByName("inference." + name))
        for field, spec in ours.items():
            assert theirs["messages"][name].get(field) == spec, (name, field)
    svc = pb.POOL.FindServiceByName(pb.SERVICE)
    for m in svc.methods:
        assert theirs["methods"][m.name] == [m.input_type.full_name, m.output_type.full_name]
    assert [m.name for m in svc.methods] == ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                             "ModelMetadata", "ModelInfer", "ModelConfig", "ModelStatistics",
                                             "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"]


def test_our_messages_import_beside_tritonclient_grpc_in_one_process():
    """Our private descriptor pool never meets the default one: no "duplicate symbol" (kserve/kserve#3099)."""
    code = ("import tritonclient.grpc, tritonclient.grpc.service_pb2 as s\n"
            "from inference_server.grpc import messages as pb\n"
            "m = pb.ModelInferRequest(model_name='x', id='7')\n"
            "print(s.ModelInferRequest.FromString(m.SerializeToString()).id)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "7", r.stderr


# --- the codec: every datatype, typed and raw

SAMPLES = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], np.uint8),
    "UINT16": np.array([[0, 7, 65535]], np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], np.uint64),
    "INT8": np.array([[-128, 7, 127]], np.int8),
    "INT16": np.array([[-32768, 7, 32767]], np.int16),
    "INT32": np.array([[-(2**31), 7, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), 7, 2**63 - 1]], np.int64),
    "FP16": np.array([[0.5, -1.25, 65504]], np.float16),
    "FP32": np.array([[0.5, -1.25, 3.4e38]], np.float32),
    "FP64": np.array([[0.5, -1.25, 1e300]], np.float64),
    "BYTES": np.array([b"ab", b"", b"\x00\xff"], dtype=object),
}
TYPED_FIELD = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
               "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
               "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
               "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def raw_bytes(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in arr.ravel())
    return arr.tobytes()


def request(datatype: str, arr: np.ndarray, raw: bool):
    msg = pb.ModelInferRequest(model_name="m")
    shape = [3] if datatype == "BYTES" else list(arr.shape)
    t = msg.inputs.add(name="x", datatype=datatype, shape=shape)
    if raw:
        msg.raw_input_contents.append(raw_bytes(arr, datatype))
    else:
        getattr(t.contents, TYPED_FIELD[datatype]).extend(arr.ravel().tolist())
    return msg


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("datatype", list(DTYPES))
def test_every_datatype_decodes_to_the_same_array(datatype, raw):
    arr = SAMPLES[datatype]
    if datatype == "FP16" and not raw:  # the protocol has no typed field for FP16
        msg = pb.ModelInferRequest(model_name="m")
        msg.inputs.add(name="x", datatype="FP16", shape=[1, 3]).contents.fp32_contents.extend([1, 2, 3])
        with pytest.raises(BadRequest, match="'x'.*raw_input_contents"):
            decode_infer_request(msg, 1000)
        return
    req = decode_infer_request(request(datatype, arr, raw), 1000)
    (t,) = req.inputs
    assert t.name == "x" and t.datatype == datatype
    if datatype == "BYTES":
        assert list(t.array) == list(arr)
    else:
        assert t.array.dtype == DTYPES[datatype] and t.array.shape == arr.shape
        assert np.array_equal(t.array, arr)
    assert req.binary_output is raw


@pytest.mark.parametrize("datatype, bad", [("INT8", 300), ("UINT8", 256), ("INT16", -40000), ("UINT16", 70000)])
def test_narrow_integers_out_of_range_in_typed_contents_are_refused_not_wrapped(datatype, bad):
    msg = pb.ModelInferRequest(model_name="m")
    t = msg.inputs.add(name="x", datatype=datatype, shape=[1, 2])
    getattr(t.contents, TYPED_FIELD[datatype]).extend([1, bad])
    with pytest.raises(BadRequest, match=r"'x'.*integers in"):
        decode_infer_request(msg, 1000)


def test_bad_requests_name_what_is_wrong():
    def bad(msg, *words):
        with pytest.raises(BadRequest) as e:
            decode_infer_request(msg, 1000)
        for w in words:
            assert w in e.value.message, (w, e.value.message)

    bad(pb.ModelInferRequest(model_name="m"), "inputs")
    m = pb.ModelInferRequest(model_name="m")
    m.inputs.add(name="x", datatype="FP32", shape=[1, 2]).contents.int_contents.extend([1, 2])
    bad(m, "'x'", "fp32_contents", "int_contents")
    m = pb.ModelInferRequest(model_name="m")
    m.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1, 2])
    bad(m, "'x'", "3", "2")
    m = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\0" * 8, b"\0" * 8])
    m.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    bad(m, "raw_input_contents", "2 entries", "1 input")
    m = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\0" * 7])
    m.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    bad(m, "'x'", "8", "7")
    m = pb.ModelInferRequest(model_name="m")
    m.inputs.add(name="x", datatype="FLOAT", shape=[1])
    bad(m, "'x'", "FLOAT")
    m = pb.ModelInferRequest(model_name="m")
    m.inputs.add(name="x", datatype="FP32", shape=[1, 2**30, 2**30])
    bad(m, "'x'", str(2**60))
    m = pb.ModelInferRequest(model_name="m")
    m.inputs.add(name="x", datatype="FP32", shape=[1, -2])
    bad(m, "'x'", "negative")
    m = pb.ModelInferRequest(model_name="m")
    m.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    bad(m, "'x'", "neither")
    m = pb.ModelInferRequest(model_name="m")
    m.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1)
    m.outputs.add(name="y").parameters["classification"].string_param = "3"
    bad(m, "'y'", "classification")


def test_responses_are_raw_for_raw_requests_and_typed_for_typed_ones():
    outs = [("prob", "FP32", np.array([[0.25, 0.75]], np.float32), True),
            ("top", "BYTES", np.array([[b"0.75:1:dog"]], dtype=object), True)]
    raw = pb.ModelInferResponse.FromString(encode_infer_response("m", "1", "r", outs, raw=True))
    assert raw.id == "r" and [o.name for o in raw.outputs] == ["prob", "top"]
    assert np.frombuffer(raw.raw_output_contents[0], np.float32).tolist() == [0.25, 0.75]
    assert raw.raw_output_contents[1] == struct.pack("<I", 10) + b"0.75:1:dog"
    assert list(raw.outputs[0].shape) == [1, 2] and not raw.outputs[0].HasField("contents")
    typed = pb.ModelInferResponse.FromString(encode_infer_response("m", "1", None, outs, raw=False))
    assert not typed.raw_output_contents and typed.id == ""
    assert list(typed.outputs[0].contents.fp32_contents) == [0.25, 0.75]
    assert list(typed.outputs[1].contents.bytes_contents) == [b"0.75:1:dog"]


def test_one_table_maps_our_errors_to_grpc_codes_and_a_full_queue_says_when_to_retry():
    import grpc

    assert {GRPC_STATUS_OF_HTTP[c] for c in (400, 404, 503, 504, 499)} == {
        "INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}
    assert all(name in grpc.StatusCode.__members__ for name in GRPC_STATUS_OF_HTTP.values())
    code, details, trailing = error_status(BadRequest("input 'x': nope"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details == "input 'x': nope" and trailing == ()
    code, details, trailing = error_status(Unavailable("the model's queue is full", retry_after_s=2))
    assert code == grpc.StatusCode.UNAVAILABLE
    meta = dict(trailing)
    assert meta["retry-after"] == "2" and meta["grpc-retry-pushback-ms"] == "2000"
    status = pb.Status.FromString(meta["grpc-status-details-bin"])
    assert status.code == grpc.StatusCode.UNAVAILABLE.value[0] and status.message == details
    (detail,) = status.details
    assert detail.type_url == "type.googleapis.com/google.rpc.RetryInfo"
    assert pb.RetryInfo.FromString(detail.value).retry_delay.seconds == 2
    assert "caffe-not-run" not in meta  # a full queue: the server answered for itself
    assert dict(error_status(Unavailable("model 'm' is loading", not_run=True))[2])["caffe-not-run"] == "true"
    assert error_status(InferenceError("boom"))[0] == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("request_id", [None, "", "r", "é" * 200])
@pytest.mark.parametrize("version", ["", "1"])
def test_a_raw_answer_is_byte_for_byte_what_protobuf_writes(request_id, version):
    """The raw answer is laid out without building the message (codec.py): a client must parse exactly what
    protobuf itself would have written, for any id, version, output type and size (empty included)."""
    outs = [("prob", "FP32", np.arange(40, dtype=np.float32).reshape(1, 40), True),
            ("top", "BYTES", np.array([[b"0.75:1:dog", b""]], dtype=object), True),
            ("half", "FP16", np.ones((2, 3), np.float16), True),
            ("none", "INT64", np.zeros((0, 2), np.int64), True)]
    for outputs in (outs, outs[:1], outs[2:]):
        expected = pb.ModelInferResponse(model_name="digits", model_version=version, id=request_id or "")
        for name, datatype, arr, _ in outputs:
            expected.outputs.add(name=name, datatype=datatype, shape=arr.shape)
            expected.raw_output_contents.append(
                b"".join(struct.pack("<I", len(v)) + v for v in arr.ravel()) if datatype == "BYTES"
                else arr.tobytes())
        for _ in range(2):  # the second time from the kept heads
            got = encode_infer_response("digits", version, request_id, outputs, raw=True)
            assert got == expected.SerializeToString()


def _decoded_as_the_server_does(data: bytes, max_elements: int = 1000):
    """ModelInfer's decoding (service.py): the fast path when every input was seen, else protobuf, which
    then teaches the fast path. Returns (which path, the request)."""
    from inference_server.grpc.codec import (
        decode_laid_out,
        decode_scanned,
        known_inputs,
        laid_out,
        learn_inputs,
        learn_layout,
        scan_infer_request,
    )

    lay = laid_out(data)
    if lay is not None:
        req = decode_laid_out(data, lay, max_elements)
        if req is not None:
            return "layout", req
    scanned = scan_infer_request(data)
    known = None if scanned is None else known_inputs(scanned)
    req = None if known is None or scanned is None else decode_scanned(scanned, known, max_elements)
    if req is not None:
        assert scanned is not None and known is not None
        learn_layout(data, scanned, known)
        return "fast", req
    req = decode_infer_request(pb.ModelInferRequest.FromString(data), max_elements)
    if scanned is not None:
        learn_inputs(scanned, req)
    return "protobuf", req


@pytest.mark.parametrize("datatype", [d for d in DTYPES if d != "BYTES"])
def test_a_repeated_raw_request_decodes_without_protobuf_to_the_same_tensors(datatype):
    """The second request with the same inputs takes the fast path (codec.py), the third the layout of the
    second (no scan), and get the same tensors, id and model name; other data of the same shape is read from
    the new message, never the first one's."""
    arr = SAMPLES[datatype]
    first = request(datatype, arr, raw=True)
    first.id, first.model_version = "r1", "2"
    paths, tensors = [], []
    for msg in (first, first, first):
        path, req = _decoded_as_the_server_does(msg.SerializeToString())
        paths.append(path)
        tensors.append(req)
        assert req.id == "r1" and req.binary_output and req.outputs is None and req.parameters == {}
        (t,) = req.inputs
        assert t.name == "x" and t.datatype == datatype and t.array.dtype == DTYPES[datatype]
        assert np.array_equal(t.array, arr) and t.array.flags.aligned
    assert paths == ["protobuf", "fast", "layout"]
    other = request(datatype, arr[::-1].copy(), raw=True)
    other.id, other.model_version = "r1", "2"
    path, req = _decoded_as_the_server_does(other.SerializeToString())
    assert path == "layout" and np.array_equal(req.inputs[0].array, arr[::-1]) and req.id == "r1"
    other.id = "r2"  # the same length, other bytes before the tensor: scanned, not taken for the first one
    path, req = _decoded_as_the_server_does(other.SerializeToString())
    assert path == "fast" and req.id == "r2"
    from inference_server.grpc.codec import laid_out

    data = bytearray(other.SerializeToString())
    at = len(data) - arr.nbytes - (2 if arr.nbytes < 0x80 else 3)  # the tensor's head: its key, its length
    assert data[at] == 0x3A and laid_out(bytes(data)) is not None
    data[at] = 0x42  # the tensor's field key: another field, the same length
    assert laid_out(bytes(data)) is None


def test_the_fast_path_leaves_every_other_request_and_every_error_to_protobuf():
    """Requests with outputs or parameters, data of the wrong size, a model's smaller element limit, and
    bytes that do not parse: the protobuf path answers them, with its own words."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    base = request("FP32", x, raw=True)
    assert _decoded_as_the_server_does(base.SerializeToString())[0] in ("protobuf", "fast")  # now known
    with_outputs = pb.ModelInferRequest()
    with_outputs.CopyFrom(base)
    with_outputs.outputs.add(name="y")
    path, req = _decoded_as_the_server_does(with_outputs.SerializeToString())
    assert path == "protobuf" and [o.name for o in req.outputs] == ["y"]
    with_params = pb.ModelInferRequest()
    with_params.CopyFrom(base)
    with_params.parameters["k"].int64_param = 3
    path, req = _decoded_as_the_server_does(with_params.SerializeToString())
    assert path == "protobuf" and req.parameters == {"k": 3}
    short = pb.ModelInferRequest()
    short.CopyFrom(base)
    short.raw_input_contents[0] = x.tobytes()[:-4]
    with pytest.raises(BadRequest, match=r"input 'x': shape \[2, 3\] of FP32 needs 24 bytes, binary data has 20"):
        _decoded_as_the_server_does(short.SerializeToString())
    with pytest.raises(BadRequest, match=r"input 'x': shape \[2, 3\] has 6 elements, more than the 5"):
        _decoded_as_the_server_does(base.SerializeToString(), max_elements=5)
    two_names = base.SerializeToString() + pb.ModelInferRequest(model_name="last").SerializeToString()
    from inference_server.grpc.codec import scan_infer_request

    scanned = scan_infer_request(two_names)
    assert scanned is not None and scanned.model_name == pb.ModelInferRequest.FromString(two_names).model_name
    assert scan_infer_request(base.SerializeToString()[:-3]) is None  # truncated: protobuf words the error

"""OIP gRPC messages ⇄ the data plane's requests and outputs: typed `contents` and raw contents.

The checks and messages are REST's (serving/codecs.py): the same shape, element-count and datatype rules,
each error a BadRequest naming the input, which the service answers with INVALID_ARGUMENT.
Responses mirror the request: raw inputs get `raw_output_contents` (what tritonclient reads),
typed inputs get typed `contents`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import BadRequest
from ..serving.codecs import (
    DTYPES,
    InferRequest,
    InputTensor,
    RequestedOutput,
    _binary_array,
    _bytes_payload,
    _check_shape,
    _object_array,
)
from . import messages as pb

if TYPE_CHECKING:
    from .inline_call import InlineCall

# datatype -> (the InferTensorContents field that carries it, the field's own numpy dtype)
CONTENTS_FIELD: dict[str, tuple[str, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
    "BYTES": ("bytes_contents", np.dtype(object)),
}
_ALL_FIELDS = tuple(dict.fromkeys(f for f, _ in CONTENTS_FIELD.values()))


def parameter_value(p):
    """An InferParameter's value as a Python bool/int/str/float (None when unset)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _typed_array(name: str, contents, datatype: str, shape: list[int], count: int) -> np.ndarray:
    if datatype not in CONTENTS_FIELD:  # FP16
        raise BadRequest(f"input '{name}': {datatype} data travels in raw_input_contents only "
                         f"(the protocol has no typed contents field for it)")
    field, field_dtype = CONTENTS_FIELD[datatype]
    values = getattr(contents, field)
    if len(values) != count:
        others = [f for f in _ALL_FIELDS if f != field and len(getattr(contents, f))]
        if others:
            raise BadRequest(f"input '{name}': {datatype} data goes in contents.{field}, "
                             f"the request filled contents.{others[0]}")
        raise BadRequest(f"input '{name}': shape {shape} needs {count} elements, contents.{field} has {len(values)}")
    if datatype == "BYTES":
        return _object_array(list(values))  # flat, as REST's codec holds BYTES
    arr = np.fromiter(values, dtype=field_dtype, count=count)
    target = DTYPES[datatype]
    if target != field_dtype:  # INT8/16 in int32, UINT8/16 in uint32: numpy would wrap 300 to 44
        info = np.iinfo(target)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise BadRequest(f"input '{name}': {datatype} data must be integers in [{info.min}, {info.max}]")
        arr = arr.astype(target)
    return arr.reshape(shape)


def decode_infer_request(msg, max_elements: int) -> InferRequest:
    """A ModelInferRequest as the data plane's InferRequest (numpy inputs); BadRequest when it is not valid."""
    if not msg.inputs:
        raise BadRequest("the request needs a non-empty 'inputs' list")
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs; "
                         f"send one per input, in the order of 'inputs'")
    inputs: list[InputTensor] = []
    for i, t in enumerate(msg.inputs):
        name = t.name
        if not name:
            raise BadRequest("each input needs a 'name'")
        datatype = t.datatype
        if datatype not in DTYPES:
            raise BadRequest(f"input '{name}': unknown datatype {datatype!r}; expected one of {', '.join(DTYPES)}")
        shape = list(t.shape)
        count = _check_shape(name, shape, max_elements)
        has_contents = t.HasField("contents")
        if raw:
            if has_contents and any(len(getattr(t.contents, f)) for f in _ALL_FIELDS):
                raise BadRequest(f"input '{name}': data is in both contents and raw_input_contents; send one")
            arr = _binary_array(name, memoryview(raw[i]), datatype, shape, count)
        elif has_contents:
            arr = _typed_array(name, t.contents, datatype, shape, count)
        elif count == 0:
            arr = np.empty(shape, dtype=DTYPES[datatype])
        else:
            raise BadRequest(f"input '{name}' has neither contents nor raw_input_contents")
        inputs.append(InputTensor(name, shape, datatype, arr))

    outputs = None
    if msg.outputs:
        outputs = []
        for o in msg.outputs:
            if not o.name:
                raise BadRequest("each requested output needs a 'name'")
            cls = 0
            if "classification" in o.parameters:
                cls = parameter_value(o.parameters["classification"])
                if type(cls) is not int or cls < 0:
                    raise BadRequest(f"output '{o.name}': classification must be a non-negative integer")
            outputs.append(RequestedOutput(o.name, True, cls))
    params = {k: parameter_value(v) for k, v in msg.parameters.items()} if msg.parameters else {}
    return InferRequest(msg.id or None, inputs, outputs, bool(raw), params)


# The fast path for the usual request (fields model_name, model_version, id, inputs and raw_input_contents
# only): what decode_infer_request found for an input's serialized InferInputTensor is kept by those bytes,
# so a client that sends the same inputs again is decoded without protobuf: a scan of the top-level fields,
# the tensors as views of the message (no copy). Anything else, or an input not seen before, takes the
# protobuf path, which checks and words every error; a request it accepts teaches the fast path its inputs.
_INPUTS: dict[bytes, tuple[str, str, tuple[int, ...], int]] = {}  # -> (name, datatype, shape, element count)
_INPUTS_MAX = 1024
_INPUT_KEY_MAX = 512  # larger serialized inputs (a long name, many dimensions) are not kept: 512 kB at most
_FAST_FIELDS = frozenset((1, 2, 3, 5, 7))  # model_name, model_version, id, inputs, raw_input_contents


class ScannedRequest:
    """A ModelInferRequest's top-level fields as views of its bytes (`scan_infer_request`), and where each raw
    field's key and data begin (`raw_at`; None when another field follows a raw one)."""

    __slots__ = ("model_name", "model_version", "id", "inputs", "raw", "raw_at")

    def __init__(self, model_name: str, model_version: str, request_id: str, inputs: list, raw: list,
                 raw_at: list[tuple[int, int]] | None = None):
        self.model_name, self.model_version, self.id = model_name, model_version, request_id
        self.inputs, self.raw, self.raw_at = inputs, raw, raw_at


def scan_infer_request(data: bytes | memoryview) -> ScannedRequest | None:
    """The request's fields when it carries only those the fast path knows (all length-delimited, as
    protobuf writes them); None otherwise, or when it does not scan (protobuf then says what is wrong)."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    strings: list[bytes | memoryview] = [b"", b"", b""]
    inputs: list[memoryview] = []
    raw: list[memoryview] = []
    raw_at: list[tuple[int, int]] | None = []
    pos, end = 0, len(view)
    while pos < end:
        key_at = pos
        key = view[pos]
        if key >= 0x80 or key & 7 != 2:  # a field number over 15, or not length-delimited
            return None
        field = key >> 3
        if field not in _FAST_FIELDS:
            return None
        pos += 1
        n = shift = 0
        while True:  # the length, a varint
            if pos >= end or shift > 35:
                return None
            b = view[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
        if pos + n > end:
            return None
        value = view[pos : pos + n]
        pos += n
        if field == 7:
            raw.append(value)
            if raw_at is not None:
                raw_at.append((key_at, pos - n))
            continue
        if raw:
            raw_at = None  # a field after the tensors: no layout to keep (learn_layout)
        if field == 5:
            inputs.append(value)
        else:
            strings[field - 1] = value  # the last occurrence wins, as protobuf's
    try:
        name, version, rid = (str(v, "utf-8") for v in strings)
    except UnicodeDecodeError:
        return None
    return ScannedRequest(name, version, rid, inputs, raw, raw_at)


def known_inputs(scanned: ScannedRequest) -> list[tuple[str, str, tuple[int, ...], int]] | None:
    """What the protobuf path found for each input of a scanned request (raw contents, one per input), or
    None when one was not seen before (or the request is not of that form): the protobuf path decides."""
    inputs = scanned.inputs
    if not inputs or len(scanned.raw) != len(inputs):
        return None
    known = []
    for t in inputs:
        k = _INPUTS.get(bytes(t))
        if k is None:
            return None
        known.append(k)
    return known


def decode_scanned(scanned: ScannedRequest, known: list[tuple[str, str, tuple[int, ...], int]],
                   max_elements: int) -> InferRequest | None:
    """The InferRequest of a scanned request whose inputs are `known`, its tensors views of the message;
    None when the protobuf path must decide (over this model's element limit, data of the wrong size)."""
    tensors: list[InputTensor] = []
    raw = scanned.raw
    for i, (name, datatype, shape, count) in enumerate(known):
        data = raw[i]
        if count > max_elements or datatype == "BYTES" or len(data) != count * DTYPES[datatype].itemsize:
            return None
        arr = np.frombuffer(data, DTYPES[datatype]).reshape(shape)
        if not arr.flags.aligned:  # where the tensor sits in the message: backends may need aligned data
            arr = arr.copy()
        tensors.append(InputTensor(name, list(shape), datatype, arr))
    return InferRequest(scanned.id or None, tensors, None, True, {})


def learn_inputs(scanned: ScannedRequest, req: InferRequest) -> None:
    """Keep what the protobuf path decoded for each input of an accepted raw request (decode_scanned's table)."""
    if not req.binary_output or len(scanned.inputs) != len(req.inputs):
        return
    if len(_INPUTS) + len(req.inputs) > _INPUTS_MAX:
        _INPUTS.clear()
    for t, tensor in zip(scanned.inputs, req.inputs, strict=True):
        if tensor.datatype == "BYTES" or len(t) > _INPUT_KEY_MAX:  # numbers only; a bounded table
            continue
        count = 1
        for d in tensor.shape:
            count *= d
        _INPUTS[bytes(t)] = (tensor.name, tensor.datatype, tuple(tensor.shape), count)


# The usual client sends the same message but for its tensors' bytes, and protobuf writes raw_input_contents
# (field 7) last: the bytes before the first tensor are the same as before (model, version, id, inputs), and each
# tensor's key and length at the same places. A message of a length seen before, with those same bytes and
# tensor heads, is read from where the tensors were: no scan at all. Learnt from a request the scan decoded.
class Layout:
    """A scanned request's bytes up to its first tensor, its tensors' heads, and what its inputs were."""

    __slots__ = ("prefix", "heads", "model_name", "model_version", "id", "known", "call")

    def __init__(self, prefix: bytes, heads: list[tuple[int, bytes]], scanned: ScannedRequest,
                 known: list[tuple[str, str, tuple[int, ...], int]]):
        self.prefix, self.heads, self.known = prefix, heads, known
        self.model_name, self.model_version, self.id = scanned.model_name, scanned.model_version, scanned.id
        self.call: InlineCall | None = None  # what such a message means on the model that answered it (inline_call.py)


_LAYOUTS: dict[int, Layout] = {}  # by the message's length
_LAYOUTS_MAX = 256


def laid_out(data: bytes | memoryview) -> Layout | None:
    """The layout `data` has, if it is one seen before (its length, its bytes up to the tensors, their heads)."""
    lay = _LAYOUTS.get(len(data))
    if lay is None or data[: len(lay.prefix)] != lay.prefix:
        return None
    for pos, head in lay.heads:
        if data[pos : pos + len(head)] != head:
            return None
    return lay


def decode_laid_out(data: bytes | memoryview, lay: Layout, max_elements: int) -> InferRequest | None:
    """decode_scanned for a message of a known layout; None over this model's element limit."""
    tensors: list[InputTensor] = []
    for (pos, head), (name, datatype, shape, count) in zip(lay.heads, lay.known, strict=True):
        if count > max_elements:
            return None
        arr = np.frombuffer(data, DTYPES[datatype], count, pos + len(head)).reshape(shape)
        if not arr.flags.aligned:  # where the tensor sits in the message: backends may need aligned data
            arr = arr.copy()
        tensors.append(InputTensor(name, list(shape), datatype, arr))
    return InferRequest(lay.id or None, tensors, None, True, {})


def learn_layout(data: bytes | memoryview, scanned: ScannedRequest,
                 known: list[tuple[str, str, tuple[int, ...], int]]) -> None:
    """Keep the layout of a message decode_scanned accepted, when its tensors come last (laid_out)."""
    if not scanned.raw_at or len(scanned.raw_at) != len(known):
        return
    if len(_LAYOUTS) >= _LAYOUTS_MAX:
        _LAYOUTS.clear()
    heads = [(key_at, bytes(data[key_at:data_at])) for key_at, data_at in scanned.raw_at]
    _LAYOUTS[len(data)] = Layout(bytes(data[: scanned.raw_at[0][0]]), heads, scanned, known)


_RAW_HEADS: dict[tuple, tuple[bytes, bytes]] = {}  # (model, version, outputs' names, types, shapes) -> see below
_RAW_HEADS_MAX = 256


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_infer_response(model_name: str, model_version: str, request_id: str | None,
                          outputs: list[tuple[str, str, np.ndarray, bool]], raw: bool) -> bytes:
    """The serialized ModelInferResponse: raw_output_contents when `raw`, typed contents otherwise.

    A raw answer is laid out here, byte for byte as protobuf would: fields 1-2 (name, version) and 5 (the
    outputs' names, types and shapes) are serialized by protobuf once per model and output shapes, then
    field 3 (the id) and each output's bytes (field 6) go around them. Building the message per call cost
    more than the rest of the encoding."""
    raw = raw or any(dt not in CONTENTS_FIELD for _, dt, _, _ in outputs)  # FP16 has no typed field
    if raw:
        key = (model_name, model_version, tuple((name, dt, arr.shape) for name, dt, arr, _ in outputs))
        heads = _RAW_HEADS.get(key)
        if heads is None:
            described = pb.ModelInferResponse()
            for name, datatype, arr, _ in outputs:
                described.outputs.add(name=name, datatype=datatype, shape=arr.shape)
            heads = (pb.ModelInferResponse(model_name=model_name, model_version=model_version).SerializeToString(),
                     described.SerializeToString())
            if len(_RAW_HEADS) >= _RAW_HEADS_MAX:
                _RAW_HEADS.clear()
            _RAW_HEADS[key] = heads
        parts = [heads[0]]
        if request_id:
            rid = request_id.encode()
            parts += (b"\x1a", _varint(len(rid)), rid)  # field 3, length-delimited
        parts.append(heads[1])
        for _, datatype, arr, _ in outputs:
            data = _bytes_payload(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()
            parts += (b"\x32", _varint(len(data)), data)  # field 6, length-delimited
        return b"".join(parts)
    resp = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id or "")
    for name, datatype, arr, _ in outputs:
        o = resp.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        if datatype == "BYTES":
            o.contents.bytes_contents.extend(v if isinstance(v, bytes) else str(v).encode() for v in arr.ravel())
        else:
            getattr(o.contents, CONTENTS_FIELD[datatype][0]).extend(arr.ravel().tolist())
    return resp.SerializeToString()

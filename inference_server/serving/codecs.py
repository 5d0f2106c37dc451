"""Open Inference Protocol tensors ⇄ numpy: JSON `data` and the binary tensor data extension.

No pydantic here on purpose: request bodies are parsed with orjson into dicts and checked by hand,
so the hot path pays only for what it uses. Every error names the input and is a 400.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from typing import Any

import numpy as np
import orjson

from ..errors import BadRequest
from . import jsonscan

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
DATATYPE_OF = {v: k for k, v in DTYPES.items() if k != "BYTES"}
MAX_JSON_DEPTH = 100
HEADER_LENGTH = "inference-header-content-length"


@dataclass(slots=True)
class InputTensor:
    name: str
    shape: list[int]
    datatype: str
    array: np.ndarray  # numeric arrays already shaped; BYTES: 1-D object array of bytes


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool = False
    classification: int = 0


@dataclass(slots=True)
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: all outputs
    binary_output: bool = False  # request-level binary_data_output
    parameters: dict = field(default_factory=dict)
    checked: bool = False  # every input passed the model's own check (decode_request's `check`)


def _depth_ok(obj, depth: int = 0) -> bool:
    """JSON nesting check outside tensor data (numpy bounds that: 32 dimensions at most)."""
    if depth > MAX_JSON_DEPTH:
        return False
    if isinstance(obj, dict):
        return all(_depth_ok(v, depth + 1) for k, v in obj.items() if k != "data")
    if isinstance(obj, list):
        return all(_depth_ok(v, depth + 1) for v in obj if isinstance(v, (dict, list)))
    return True


MAX_DIMS = 32  # numpy's limit


def _check_shape(name: str, shape, max_elements: int) -> int:
    """The element count of a valid shape; a 400 naming the input otherwise.

    Safe against zeros and overflow: the product of the non-zero dimensions (so every dimension) must
    stay within `max_elements`, so that `[0, 2**62, 4]` (0 elements, but no array of that shape
    can be built) is refused here and never reaches numpy's reshape.
    """
    if type(shape) is list and len(shape) <= MAX_DIMS:  # the usual shape, positive dimensions: one pass
        n = 1
        for d in shape:
            if type(d) is not int or d <= 0:
                break
            n *= d
        else:
            if n <= max_elements:
                return n
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise BadRequest(f"input '{name}': shape must be a list of integers, got {shape!r}")
    if len(shape) > MAX_DIMS:
        raise BadRequest(f"input '{name}': shape has {len(shape)} dimensions, more than {MAX_DIMS}")
    for d in shape:
        if d < 0:
            raise BadRequest(f"input '{name}': shape {shape} has a negative dimension")
    nonzero = prod(d for d in shape if d)  # Python ints: no overflow; at most 32 factors
    if nonzero > max_elements:
        what = f"has {nonzero} elements" if 0 not in shape else f"has non-zero dimensions that multiply to {nonzero}"
        raise BadRequest(f"input '{name}': shape {shape} {what}, more than the {max_elements} this server accepts")
    return 0 if 0 in shape else nonzero


def _json_array(name: str, data, datatype: str, shape: list[int], count: int) -> np.ndarray:
    if datatype == "BYTES":
        flat = _flatten_bytes(name, data)
        if len(flat) != count:
            raise BadRequest(f"input '{name}': shape {shape} needs {count} elements, data has {len(flat)}")
        return _object_array(flat)
    dt = DTYPES[datatype]
    try:
        arr = (
            _json_integers(name, data, datatype, dt)
            if dt.kind in "iu"
            else _json_floats_or_bools(name, data, datatype, dt)
        )
    except (ValueError, TypeError, OverflowError) as e:
        raise BadRequest(f"input '{name}': data does not match datatype {datatype}: {e}") from None
    if arr.size != count:
        raise BadRequest(f"input '{name}': shape {shape} needs {count} elements, data has {arr.size}")
    return arr.reshape(shape)


def _json_floats_or_bools(name: str, data, datatype: str, dt: np.dtype) -> np.ndarray:
    """FP16/32/64 take JSON numbers only, BOOL takes true/false only.

    `np.array(data, dtype=float32)` would quietly take "2.5", true and null (as NaN), and BOOL would
    take any truthy value; numpy's own type inference tells them apart for one extra pass.
    """
    raw = np.array(data)
    if raw.size and raw.dtype.kind not in ("b" if dt.kind == "b" else "fiu"):
        what = "true or false" if dt.kind == "b" else "numbers (no strings, booleans or nulls)"
        raise BadRequest(f"input '{name}': {datatype} data must be {what}")
    with np.errstate(over="ignore"):
        arr = raw.astype(dt, copy=False)
    if dt.kind == "f" and not np.isfinite(arr).all():
        raise BadRequest(f"input '{name}': a value is out of the range of {datatype}")
    return arr


def _json_integers(name: str, data, datatype: str, dt: np.dtype) -> np.ndarray:
    """Integer tensors: numpy would wrap out-of-range values (300 → 44 in UINT8) and truncate 2.7 to 2."""
    raw = np.array(data)
    info = np.iinfo(dt)
    if raw.dtype.kind not in "iu":  # floats, strings, booleans, or integers numpy would not hold as int64/uint64
        raw = np.array(data, dtype=object)
        if not all(type(v) is int for v in raw.flat):
            raise BadRequest(f"input '{name}': {datatype} data must be integers in [{info.min}, {info.max}]")
    if raw.size and (raw.min() < info.min or raw.max() > info.max):
        raise BadRequest(f"input '{name}': {datatype} data must be integers in [{info.min}, {info.max}]")
    return raw.astype(dt)


def _object_array(items: list[bytes]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)  # 1-D even when every item has the same length
    arr[:] = items
    return arr


def _flatten_bytes(name: str, data) -> list[bytes]:
    out: list[bytes] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            out.append(item.encode())
        elif isinstance(item, (bytes, bytearray)):
            out.append(bytes(item))
        else:
            raise BadRequest(f"input '{name}': BYTES data must hold strings, got {type(item).__name__}")
    return out


def _binary_array(name: str, raw: memoryview, datatype: str, shape: list[int], count: int) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise BadRequest(f"input '{name}': truncated BYTES element length")
            (n,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + n > len(raw):
                raise BadRequest(f"input '{name}': BYTES element of {n} bytes runs past the tensor data")
            items.append(bytes(raw[pos : pos + n]))
            pos += n
        if len(items) != count:
            raise BadRequest(f"input '{name}': shape {shape} needs {count} elements, binary data has {len(items)}")
        return _object_array(items)
    dt = DTYPES[datatype]
    if len(raw) != count * dt.itemsize:
        raise BadRequest(
            f"input '{name}': shape {shape} of {datatype} needs {count * dt.itemsize} bytes, binary data has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dt).reshape(shape)


# Bodies (their JSON part) from this size on are decoded by jsonscan: bounded memory, short steps.
STREAM_MIN_BYTES = 64 * 1024

# Called with (name, datatype, shape) for every input before any tensor is built: the model's own
# checks (known input, datatype, shape, batch size), so that a request it would refuse costs nothing.
InputCheck = Callable[[str, str, list], None]


@dataclass(slots=True)
class PlannedInput:
    """One input's checked fields and where its values lie, before any array is built."""

    fields: dict  # the input's JSON object
    name: str
    datatype: str
    shape: list[int]
    count: int
    binary: tuple[int, int] | None = None  # (offset, size) in the binary part: binary_data_size
    span: jsonscan.Span | None = None  # where jsonscan found `data` in a large JSON part


# What a binary request's JSON header decoded to (plans, the outputs, binary_data_output, id, parameters),
# by the header's bytes and the binary part's length: a client sends the same header with every request.
Plans = dict[tuple[bytes, int], tuple[list[PlannedInput], list[RequestedOutput] | None, bool, str | None, dict]]
PLANS_KEPT = 64  # headers remembered per model (then forgotten all at once)


def decode_request(body: bytes | bytearray, headers: dict[str, str], max_elements: int, check: InputCheck | None = None,
                   stream_min_bytes: int = STREAM_MIN_BYTES, plans: Plans | None = None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON header + binary tensors) into numpy inputs.

    A JSON part of `stream_min_bytes` or more is decoded by `jsonscan` (its docstring says why); a
    smaller one by orjson at once, the fastest way for the small requests that are most of them.
    Every input is checked before any tensor is built: a bad last input costs no array.
    `plans` (the model's, with the model's `check`): a binary request whose header and binary length
    were seen before skips the JSON and its checks, which gave the same answer then; only the arrays are
    built (and BYTES elements checked) from its own binary part.
    """
    json_part, binary = split_body(body, headers)
    key = None
    if plans is not None and binary:
        key = (bytes(json_part), len(binary))
        known = plans.get(key)
        if known is not None:
            plan, outputs, binary_output, rid, req_params = known
            inputs = [InputTensor(p.name, p.shape, p.datatype, input_array(p, json_part, binary)) for p in plan]
            return InferRequest(rid, inputs, outputs, binary_output, req_params, check is not None)
    req, spans = parse_json(json_part, stream_min_bytes)
    plan = plan_inputs(req.get("inputs"), spans, len(binary), max_elements, check)
    inputs = [InputTensor(p.name, p.shape, p.datatype, input_array(p, json_part, binary)) for p in plan]
    req_params = req.get("parameters") or {}
    binary_output = bool(isinstance(req_params, dict) and req_params.get("binary_data_output"))
    rid = req.get("id")
    rid = rid if isinstance(rid, str) else None
    outputs = requested_outputs(req, binary_output)
    if plans is not None and key is not None and all(p.binary is not None for p in plan):
        if len(plans) >= PLANS_KEPT:
            plans.clear()
        plans[key] = (plan, outputs, binary_output, rid, req_params)
    return InferRequest(rid, inputs, outputs, binary_output, req_params, check is not None)


def split_body(body: bytes | bytearray, headers: dict[str, str]) -> tuple[bytes | bytearray, memoryview]:
    """(the JSON part, the binary part) by the binary extension's Inference-Header-Content-Length."""
    header_len = headers.get(HEADER_LENGTH)
    if header_len is None:
        return body, memoryview(b"")
    if not header_len.isdecimal() or int(header_len) > len(body):  # isdigit() takes '²', int() does not
        raise BadRequest(f"Inference-Header-Content-Length {header_len!r} is not a length within the body")
    return body[: int(header_len)], memoryview(body)[int(header_len) :]


def parse_json(json_part: bytes | bytearray, stream_min_bytes: int) -> tuple[dict, list[jsonscan.Span]]:
    """The request object, and where jsonscan found the `data` arrays (none when orjson parsed it all)."""
    spans: list[jsonscan.Span] = []
    if len(json_part) >= stream_min_bytes:
        req, spans = jsonscan.skeleton(json_part)
    else:
        try:
            req = orjson.loads(json_part)
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"malformed JSON request body: {e}") from None
    if not isinstance(req, dict):
        raise BadRequest("the request body must be a JSON object")
    # each level of nesting opens a bracket: with no more brackets than the limit in all, the walk is moot
    if json_part.count(b"[") + json_part.count(b"{") > MAX_JSON_DEPTH and not _depth_ok(req):
        raise BadRequest(f"the request JSON is nested deeper than {MAX_JSON_DEPTH} levels")
    return req, spans


def plan_inputs(raw_inputs, spans: list[jsonscan.Span], binary_len: int, max_elements: int,
                check: InputCheck | None) -> list[PlannedInput]:
    """Every input's fields, sizes and data source checked (and the model's `check` run on each)."""
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("the request needs a non-empty 'inputs' list")
    plan = []
    offset = 0
    for t in raw_inputs:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise BadRequest("each input needs a 'name'")
        name = t["name"]
        datatype = t.get("datatype")
        if datatype not in DTYPES:
            raise BadRequest(f"input '{name}': unknown datatype {datatype!r}; expected one of {', '.join(DTYPES)}")
        shape: Any = t.get("shape")  # _check_shape validates it next
        p = PlannedInput(t, name, datatype, shape, _check_shape(name, shape, max_elements))
        params = t.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > binary_len:
                raise BadRequest(f"input '{name}': binary_data_size {size!r} runs past the binary data")
            p.binary = (offset, size)
            offset += size
        elif "data" in t:
            k = jsonscan.span_index(t["data"]) if spans else None
            p.span = spans[k] if k is not None and k < len(spans) else None
            if p.span is not None and p.span.elements != p.count:
                raise BadRequest(f"input '{name}': shape {shape} needs {p.count} elements, data has {p.span.elements}")
        else:
            raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
        if check is not None:
            check(name, datatype, shape)
        plan.append(p)
    if offset != binary_len:
        raise BadRequest(f"{binary_len - offset} bytes of binary data are not claimed by any input")
    return plan


def input_array(p: PlannedInput, json_part: bytes | bytearray, binary: memoryview) -> np.ndarray:
    """A planned input's values as the array the model gets."""
    if p.binary is not None:
        start, size = p.binary
        return _binary_array(p.name, binary[start : start + size], p.datatype, p.shape, p.count)
    if p.span is not None:
        return jsonscan.span_array(json_part, p.span, p.name, p.datatype, DTYPES[p.datatype], p.shape, p.count)
    return _json_array(p.name, p.fields["data"], p.datatype, p.shape, p.count)


def requested_outputs(req: dict, binary_output: bool) -> list[RequestedOutput] | None:
    """The request's `outputs` (None: all of them), each as binary or JSON and with its classification."""
    if req.get("outputs") is None:
        return None
    if not isinstance(req["outputs"], list):
        raise BadRequest("'outputs' must be a list")
    outputs = []
    for o in req["outputs"]:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise BadRequest("each requested output needs a 'name'")
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise BadRequest(f"output '{o['name']}': parameters must be a JSON object")
        cls = p.get("classification", 0)
        if type(cls) is not int or cls < 0:
            raise BadRequest(f"output '{o['name']}': classification must be a non-negative integer")
        outputs.append(RequestedOutput(o["name"], bool(p.get("binary_data", binary_output)), cls))
    return outputs


def _bytes_payload(values: np.ndarray) -> bytes:
    parts = []
    for v in values.ravel():
        b = v if isinstance(v, bytes) else str(v).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def encode_response(
    model_name: str, model_version: str, request_id: str | None, outputs: list[tuple[str, str, np.ndarray, bool]],
    parameters: dict | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Build the response body; `outputs` holds (name, datatype, array, as_binary). Returns (body, extra headers)."""
    tensors, blobs = [], []
    for name, datatype, arr, as_binary in outputs:
        t: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if as_binary:
            payload = _bytes_payload(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()
            t["parameters"] = {"binary_data_size": len(payload)}
            blobs.append(payload)
        elif datatype == "BYTES":
            t["data"] = [v.decode() if isinstance(v, bytes) else str(v) for v in arr.ravel()]
        else:
            t["data"] = np.ascontiguousarray(arr).ravel()
        tensors.append(t)
    resp: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": tensors}
    if request_id is not None:
        resp["id"] = request_id
    if parameters:
        resp["parameters"] = parameters
    head = orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, {}
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}

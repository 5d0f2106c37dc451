"""Large JSON infer requests, decoded in bounded memory and in short steps.

orjson turns a 60 MiB `data` array of 12.6 M numbers into 12.6 M Python floats (about 400 MB)
before anything can look at them, and holds the GIL for the whole parse: a request within the body
limit could take a replica's memory to gigabytes and stall its event loop for seconds. Here a large
body is read in two steps instead:

1. `skeleton(js)` walks the JSON text once, string by string (`bytes.find`, so at C speed), and
   cuts every `"data": [...]` array that holds only numbers out of the text, leaving a placeholder;
   orjson then parses what is left (names, shapes, datatypes: small). An array that is not all
   numbers is refused here if it mixes numbers with strings, booleans or nulls (no datatype takes
   that), or if it holds more than `MAX_LOOSE_ELEMENTS` non-numbers (large BYTES or BOOL tensors go
   in the binary extension); otherwise it stays in the text for orjson.
2. `span_array` turns one cut-out array into a numpy array of the input's datatype, allocated once
   at its final size after its element count was checked against the shape, and filled piece by
   piece (`PIECE_BYTES` of text each: orjson on the piece, then numpy): the temporary Python
   objects never exceed one piece.

Every step is a C call over at most `PIECE_BYTES`, so a thread decoding a body gives the GIL back
to the event loop every few milliseconds. The numbers are parsed by orjson itself, so what is a
valid number is exactly what the small-body path accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import orjson

from ..errors import BadRequest

PIECE_BYTES = 256 * 1024
MAX_LOOSE_ELEMENTS = 65536  # strings, booleans and nulls in one request's tensor data
MAX_SKELETON_BYTES = 1024 * 1024  # JSON outside tensor data, its strings aside
MAX_SKELETON_STRINGS = 65536
MAX_DEPTH = 32  # nesting of one tensor's data (numpy's dimension limit)

_NUMERIC = b"0123456789eE.+-,[] \t\r\n"  # every byte an all-numbers array can hold
_NOT_NUMERIC = re.compile(rb"[^0-9eE.+\-,\[\]\s]")
_DIGIT = re.compile(rb"[0-9]")
_BRACKETS_TO_SPACES = bytes.maketrans(b"[]", b"  ")
_WS = b" \t\r\n"
_NAME = re.compile(rb'"name"\s*:\s*"([^"\\]{1,200})"')
PLACEHOLDER = "\x00span:"


@dataclass(slots=True)
class Span:
    """An all-numbers array in the JSON text: `[` at `start`, its `]` at `end`."""

    start: int
    end: int
    elements: int
    nested: bool


def _bad(js: bytes | bytearray, at: int, message: str) -> BadRequest:
    """A 400 naming the input whose data starts at `at` (from the nearest "name" before it)."""
    m = None
    for m in _NAME.finditer(js, max(0, at - 4096), at):  # noqa: B007 - the last match is the one wanted
        pass
    who = f"input '{m.group(1).decode(errors='replace')}'" if m else "an input"
    return BadRequest(f"{who}: {message}")


def _skip_ws(js: bytes | bytearray, i: int) -> int:
    n = len(js)
    while i < n and js[i] in _WS:
        i += 1
    return i


def _string_end(js: bytes | bytearray, q: int) -> int:
    """The index of the quote that closes the string opened at `q`."""
    i = q + 1
    while True:
        e = js.find(b'"', i)
        if e < 0:
            raise BadRequest("malformed JSON request body: unterminated string")
        k = e - 1
        while js[k] == 0x5C:  # backslashes before the quote: an odd number escapes it
            k -= 1
        if (e - 1 - k) % 2 == 0:
            return e
        i = e + 1


def _first_not_numeric(js: bytes | bytearray, i: int) -> int:
    n = len(js)
    while i < n:
        stop = min(i + PIECE_BYTES, n)
        if js[i:stop].translate(None, _NUMERIC):  # a copy of one piece; translate is fast, a regex is not
            return _NOT_NUMERIC.search(js, i, stop).start()  # type: ignore[union-attr]  # translate() found one
        i = stop
    return n


def _count(js: bytes | bytearray, what: bytes, a: int, b: int) -> int:
    return sum(js.count(what, i, min(i + PIECE_BYTES, b)) for i in range(a, b, PIECE_BYTES))


def _nested_end(js: bytes | bytearray, a: int, b: int) -> int:
    """Where the array opened at `a` closes (its depth back to 0) before `b`; -1 if it does not."""
    depth = 0
    for i in range(a, b, PIECE_BYTES):
        stop = min(i + PIECE_BYTES, b)
        c = np.frombuffer(js, np.uint8, stop - i, i)
        steps = (c == 0x5B).astype(np.int8) - (c == 0x5D)
        running = np.cumsum(steps, dtype=np.int32) + depth
        if running.size and running.max() > MAX_DEPTH:
            raise _bad(js, a, f"data is nested deeper than {MAX_DEPTH} levels")
        closed = np.flatnonzero(running <= 0)
        if closed.size:
            return i + int(closed[0])
        depth = int(running[-1]) if running.size else depth
    return -1


def _scan_array(js: bytes | bytearray, j: int, loose: list[int]) -> tuple[Span | None, int]:
    """The array that opens at `j`: (its Span, its end) if all numbers, else (None, its end).
    `loose[0]`: the non-numbers seen so far in the request, which this array adds to."""
    p = _first_not_numeric(js, j)
    opens = _count(js, b"[", j, p)
    end = js.find(b"]", j, p) if opens == 1 else _nested_end(js, j, p)
    if end >= 0:
        commas = _count(js, b",", j, end)
        blank = commas == 0 and not _DIGIT.search(js, j, end)
        return Span(j, end, 0 if blank else commas + 1, opens > 1), end
    # Not all numbers. Numbers before the first non-number: mixed, which no datatype takes.
    if _DIGIT.search(js, j, p):
        raise _bad(js, j, "data mixes numbers with strings, booleans or nulls (numeric data must be "
                          "numbers only, BYTES data strings only)")
    depth = opens - _count(js, b"]", j, p)
    elements, i, n = loose[0], p, len(js)
    while i < n:
        c = js[i]
        if c == 0x22:  # "
            i = _string_end(js, i) + 1
            elements += 1
        elif js.startswith((b"true", b"null"), i):
            i += 4
            elements += 1
        elif js.startswith(b"false", i):
            i += 5
            elements += 1
        elif c == 0x5B:
            depth += 1
            i += 1
        elif c == 0x5D:
            depth -= 1
            if depth == 0:
                loose[0] = elements
                return None, i
            i += 1
        elif c == 0x2C or c in _WS:
            i += 1
        elif c in b"-0123456789":
            raise _bad(js, j, "data mixes numbers with strings, booleans or nulls (numeric data must be "
                              "numbers only, BYTES data strings only)")
        else:
            raise BadRequest(f"malformed JSON request body: unexpected {chr(c)!r} in tensor data at byte {i}")
        if elements > MAX_LOOSE_ELEMENTS:
            raise _bad(js, j, f"data holds more than {MAX_LOOSE_ELEMENTS} strings, booleans or nulls; send a "
                              "larger BYTES or BOOL tensor with the binary tensor data extension")
    raise BadRequest("malformed JSON request body: unterminated array")


def skeleton(js: bytes | bytearray) -> tuple[object, list[Span]]:
    """Parse `js` with every all-numbers `"data"` array replaced by a placeholder string
    (`PLACEHOLDER` + its index in the returned list of Spans)."""
    parts: list[bytes | bytearray] = []
    spans: list[Span] = []
    n = len(js)
    pos = last = 0
    plain = strings = 0  # bytes outside strings that orjson will parse; strings it will parse
    loose = [0]
    while True:
        q = js.find(b'"', pos)
        plain += (n if q < 0 else q) - pos
        if plain > MAX_SKELETON_BYTES:
            raise BadRequest(f"the request JSON outside tensor data is larger than {MAX_SKELETON_BYTES} bytes")
        if q < 0:
            break
        end = _string_end(js, q)
        strings += 1
        if strings > MAX_SKELETON_STRINGS:
            raise BadRequest(f"the request JSON holds more than {MAX_SKELETON_STRINGS} strings outside tensor data")
        pos = end + 1
        if end - q != 5 or js[q + 1 : end] != b"data":
            continue
        i = _skip_ws(js, pos)
        if i >= n or js[i] != 0x3A:  # not a key
            continue
        j = _skip_ws(js, i + 1)
        if j >= n or js[j] != 0x5B:
            continue
        span, close = _scan_array(js, j, loose)
        if span is not None:
            parts.append(js[last:j])
            parts.append(b'"\\u0000span:%d"' % len(spans))
            spans.append(span)
            last = close + 1
        pos = close + 1
    parts.append(js[last:])
    try:
        return orjson.loads(b"".join(parts)), spans
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"malformed JSON request body: {e}") from None


def span_index(value) -> int | None:
    if isinstance(value, str) and value.startswith(PLACEHOLDER):
        tail = value[len(PLACEHOLDER):]
        if tail.isdecimal():
            return int(tail)
    return None


def span_array(js: bytes | bytearray, span: Span, name: str, datatype: str, dt: np.dtype, shape: list[int],
               count: int) -> np.ndarray:
    """The numbers of `span` as a `dt` array of `shape` (`count` elements, checked first)."""
    if span.elements != count:
        raise BadRequest(f"input '{name}': shape {shape} needs {count} elements, data has {span.elements}")
    if datatype == "BYTES":
        raise BadRequest(f"input '{name}': BYTES data must hold strings, got numbers")
    if dt.kind == "b":
        raise BadRequest(f"input '{name}': {datatype} data must be true or false")
    out = np.empty(count, dtype=dt)
    filled = 0
    pos, stop = span.start + 1, span.end
    while pos < stop:
        cut = js.find(b",", pos + PIECE_BYTES, stop) if pos + PIECE_BYTES < stop else -1
        end = stop if cut < 0 else cut
        piece = js[pos:end]
        if span.nested:
            piece = piece.translate(_BRACKETS_TO_SPACES)
        try:
            values = orjson.loads(b"[" + piece + b"]")
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"malformed JSON request body: input '{name}' data near byte {pos}: {e}") from None
        if not values or filled + len(values) > count:
            raise BadRequest(f"input '{name}': shape {shape} needs {count} elements, data does not match")
        out[filled : filled + len(values)] = _convert(name, values, piece, datatype, dt)
        filled += len(values)
        pos = end + 1
    if filled != count:
        raise BadRequest(f"input '{name}': shape {shape} needs {count} elements, data has {filled}")
    return out.reshape(shape)


def _convert(name: str, values: list, text: bytes | bytearray, datatype: str, dt: np.dtype) -> np.ndarray:
    """One piece's numbers (ints and floats from orjson) as `dt`, with the small-body path's checks."""
    if dt.kind == "f":
        with np.errstate(over="ignore"):
            arr = np.array(values, dtype=np.float64).astype(dt, copy=False)
        if not np.isfinite(arr).all():
            raise BadRequest(f"input '{name}': a value is out of the range of {datatype}")
        return arr
    info = np.iinfo(dt)
    integers = f"input '{name}': {datatype} data must be integers in [{info.min}, {info.max}]"
    if b"." in text or b"e" in text or b"E" in text:  # a float among them (JSON 1.0 is one, as orjson reads it)
        raise BadRequest(integers)
    try:
        arr = np.array(values, dtype=np.int64)
    except OverflowError:
        try:
            arr = np.array(values, dtype=np.uint64)
        except OverflowError:
            raise BadRequest(integers) from None
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise BadRequest(integers)
    return arr

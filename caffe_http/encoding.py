"""HTTP content codings: gzip and deflate request bodies (`Content-Encoding`) and responses
(`Accept-Encoding`), as Triton supports them (`tritonclient`'s `request_compression_algorithm` and
`response_compression_algorithm`).

`with_content_coding(handler, max_body_bytes)` wraps a request handler:
- a request body in `gzip`, `x-gzip` or `deflate` (zlib, as RFC 9110 means it; raw deflate streams,
  which some clients send, are accepted too) is decompressed before the handler sees it, and the
  request's size limit applies to the **decompressed** size: decompression stops at the limit and
  answers 413, so a small body that would inflate to a gigabyte (a "gzip bomb") costs at most the
  limit in memory. Large bodies are decompressed off the event loop.
- any other coding is 415 with the codings we accept (`Accept-Encoding` response header, RFC 9110
  §15.5.16); `identity` is the same as none.
- a 2xx answer is compressed with the client's preferred coding among gzip and deflate (q-values
  honoured; `identity` when it asks for neither), with `Vary: Accept-Encoding`. Error answers stay
  plain (small, and readable in any log). An answer that already carries a Content-Encoding (the
  gateway passing on a server's) is left as it is.

`passthrough(req)` (a predicate) names requests whose compressed body is handed on unread (the
gateway forwards model requests byte for byte; the server behind it decompresses and applies its
own limit); their coding is still checked (415).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable

import orjson

from .server import Handler, Request, Response

SUPPORTED = ("gzip", "deflate")
_ALIASES = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}
CHUNK = 256 * 1024
OFF_LOOP_BYTES = 256 * 1024  # compressed bodies larger than this are decompressed in a thread


class CodingError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def request_coding(header: str | None) -> str | None:
    """The coding of a request body: None for identity, 'gzip' or 'deflate'; CodingError(415) otherwise."""
    if not header:
        return None
    codings = [c.strip().lower() for c in header.split(",") if c.strip() and c.strip().lower() != "identity"]
    if not codings:
        return None
    if len(codings) > 1:
        raise CodingError(415, f"Content-Encoding '{header}': only one coding is supported (gzip or deflate)")
    coding = _ALIASES.get(codings[0])
    if coding is None:
        raise CodingError(415, f"unsupported Content-Encoding '{header}'; supported: gzip, deflate, identity")
    return coding


def _decompressor(coding: str, first: bytes | bytearray) -> zlib._Decompress:
    if coding == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    # RFC 9110's "deflate" is the zlib format; a raw deflate stream (no zlib header) is common too.
    if len(first) >= 2 and (first[0] & 0x0F) == 8 and ((first[0] << 8) | first[1]) % 31 == 0:
        return zlib.decompressobj(zlib.MAX_WBITS)
    return zlib.decompressobj(-zlib.MAX_WBITS)


def decompress(body: bytes | bytearray, coding: str, limit: int) -> bytes:
    """`body` decoded; CodingError 413 as soon as the output passes `limit` bytes, 400 if it is corrupt."""
    parts: list[bytes] = []
    size = 0
    data = body
    try:
        d = _decompressor(coding, body)
        while True:
            # max_length bounds each step's output: memory never grows past the limit plus one chunk
            out = d.decompress(data, CHUNK)
            size += len(out)
            if size > limit:
                raise CodingError(413, f"request body exceeds the limit of {limit} bytes once decompressed "
                                       f"({coding}, {len(body)} bytes compressed)")
            if out:
                parts.append(out)
            data = d.unconsumed_tail
            if d.eof:
                rest = d.unused_data
                if coding == "gzip" and rest.strip(b"\x00"):  # concatenated gzip members (RFC 1952)
                    d, data = _decompressor(coding, rest), rest
                    continue
                break
            if not data and not out:
                raise CodingError(400, f"the {coding} request body is truncated")
    except zlib.error as e:
        raise CodingError(400, f"the request body is not valid {coding} data: {e}") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _q(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0


def response_coding(accept: str | None) -> str | None:
    """The coding to answer with for an `Accept-Encoding` header: 'gzip', 'deflate' or None (identity)."""
    if not accept:
        return None
    prefs: dict[str, float] = {}
    for item in accept.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        if not name:
            continue
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip().lower() == "q":
                q = _q(v.strip())
        prefs[_ALIASES.get(name, name)] = q
    star = prefs.get("*")
    best, best_q = None, 0.0
    for coding in SUPPORTED:  # gzip first on a tie
        q = prefs.get(coding, star if star is not None else 0.0)
        if q > best_q:
            best, best_q = coding, q
    return best


def compress(body: bytes, coding: str) -> bytes:
    if coding == "gzip":
        c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    else:
        c = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS)
    return c.compress(body) + c.flush()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(status, orjson.dumps({"error": message}), headers=headers or {})


def with_content_coding(handler: Handler, max_body_bytes: int,
                        passthrough: Callable[[Request], bool] | None = None, min_compress_bytes: int = 0) -> Handler:
    """`handler` with compressed requests decoded and answers compressed on request (module docstring). A
    request with neither Content-Encoding nor Accept-Encoding (most of them) is the handler's own awaitable:
    no coroutine of ours around it."""

    def handle(req: Request) -> Awaitable[Response]:
        headers = req.headers
        if "content-encoding" not in headers and "accept-encoding" not in headers:
            return handler(req)
        return coded(req)

    async def coded(req: Request) -> Response:
        headers = req.headers
        raw = headers.get("content-encoding")
        if raw:
            try:
                coding = request_coding(raw)
                if coding is not None and not (passthrough is not None and passthrough(req)):
                    if len(req.body) > OFF_LOOP_BYTES:
                        req.body = await asyncio.to_thread(decompress, req.body, coding, max_body_bytes)
                    else:
                        req.body = decompress(req.body, coding, max_body_bytes)
                    del headers["content-encoding"]
                    headers["content-length"] = str(len(req.body))
            except CodingError as e:
                extra = {"Accept-Encoding": "gzip, deflate"} if e.status == 415 else None
                return _error(e.status, e.message, extra)
        resp = await handler(req)
        accept = headers.get("accept-encoding")
        if (accept and 200 <= resp.status < 300 and len(resp.body) >= min_compress_bytes and resp.body
                and not any(k.lower() == "content-encoding" for k in resp.headers)):
            coding = response_coding(accept)
            if coding is not None:
                body = resp.body
                if len(body) > OFF_LOOP_BYTES:
                    body = await asyncio.to_thread(compress, body, coding)
                else:
                    body = compress(body, coding)
                resp.body = body
                resp.headers = {**resp.headers, "Content-Encoding": coding, "Vary": "Accept-Encoding"}
        return resp

    return handle

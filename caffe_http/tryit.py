"""The try-it page (`GET /` on the server and the gateway): one static HTML file with its own small
script (static/try.html, package data: no build step, nothing from a CDN).

The page lists the models (`POST /v2/repository/index`), reads the chosen one's metadata, and sends
an image (models whose input has image preprocessing: a BYTES tensor) or a pasted JSON tensor to
`/v2/models/{m}/infer` with the classification extension (top 5, with labels where the model has
them). It shows the labels and scores, the round-trip latency and the backend that answered (the
`X-Caffeserve-Backend` header), and a server's error message as it is.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

from .server import Response

CONTENT_TYPE = "text/html; charset=utf-8"
# Only our own script and styles: no other origin may be loaded, framed or posted to.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self' blob: data:; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=1)
def page() -> bytes:
    return files(__package__).joinpath("static", "try.html").read_bytes()


def page_response() -> Response:
    return Response(200, page(), CONTENT_TYPE, dict(HEADERS))


def is_page(path: str) -> bool:
    return path in ("/", "/index.html")

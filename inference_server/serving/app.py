"""Routes only: the Open Inference Protocol (KServe V2) REST paths onto the data plane.

Built by `create_app`, which returns the handler the HTTP server calls. Every InferenceError is
turned into `{"error": message}` with its status code here, and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

from caffe_http.server import Request, Response
from caffe_http.tryit import is_page, page_response

from .dataplane import DataPlane
from ..errors import InferenceError, NotFound
from .metrics import ServerMetrics

log = logging.getLogger(__name__)

LIVE = orjson.dumps({"live": True})
READY = orjson.dumps({"ready": True})
# HEAD is GET without the body (the transport drops it): probes and curl -I use it.
READ_METHODS = ("GET", "HEAD")


def error_response(e: InferenceError) -> Response:
    return Response(e.status_code, orjson.dumps({"error": e.message}), headers=e.headers)


def create_app(plane: DataPlane, metrics: ServerMetrics):
    """The request handler: one dispatch on method and path segments, no framework."""

    async def infer(req: Request, model: str, version: str | None) -> Response:
        start = time.monotonic()
        metrics.in_flight.inc()
        code = 200
        try:
            m = plane.get(model, version)
            # while draining (SIGTERM), requests are still served: only readiness says we are going
            body, extra = await m.infer(req.body, req.headers)
            if extra:
                return Response(200, body, "application/octet-stream", {**extra, **m.answer_headers})
            return Response(200, body, "application/json", m.answer_headers)
        except InferenceError as e:
            code = e.status_code
            return error_response(e)
        except asyncio.CancelledError:
            code = 499  # the client went away (nginx's code): the queued work was dropped
            raise
        finally:
            metrics.in_flight.dec()
            metrics.count(code)
            metrics.request_seconds.observe(time.monotonic() - start)

    def model_get(model: str, version: str | None, tail: str) -> Response:
        m = plane.get(model, version)
        if tail == "stats":  # counters exist from the start, loaded or not (Triton's statistics extension)
            return Response(200, orjson.dumps({"model_stats": [m.stats.as_json(m.name, m.version)]}))
        m.check_ready()  # 503 with the loader's message while loading or after a failed load
        if tail == "ready":
            return Response(200, orjson.dumps({"name": m.name, "ready": True}))
        if tail == "config":
            return Response(200, m.config_json)
        return Response(200, m.metadata)

    async def handle(req: Request) -> Response:
        path, method = req.path, req.method
        try:
            parts = path.strip("/").split("/")
            if parts[0] == "v2":
                n = len(parts)
                if n == 3 and parts[1] == "models" and parts[2] == "stats":  # every model's statistics
                    if method not in READ_METHODS:
                        return _method_not_allowed("GET")
                    return Response(200, orjson.dumps(
                        {"model_stats": [m.stats.as_json(m.name, m.version) for m in plane.models.values()]}))
                if n >= 3 and parts[1] == "models":
                    model = parts[2]
                    version, rest = (parts[4], parts[5:]) if n >= 5 and parts[3] == "versions" else (None, parts[3:])
                    tail = rest[0] if len(rest) == 1 else ("" if not rest else None)
                    if tail == "infer":
                        if method != "POST":
                            return _method_not_allowed("POST")
                        return await infer(req, model, version)
                    if tail in ("", "ready", "stats", "config"):
                        if method not in READ_METHODS:
                            return _method_not_allowed("GET")
                        return model_get(model, version, tail)
                elif n == 1 or (n == 3 and parts[1] == "health"):
                    if method not in READ_METHODS:
                        return _method_not_allowed("GET")
                    if n == 1:
                        return Response(200, plane.server_metadata)
                    if parts[2] == "live":
                        return Response(200, LIVE)
                    if parts[2] == "ready":
                        if plane.ready():
                            return Response(200, READY)
                        return Response(503, orjson.dumps({"ready": False, "error": plane.not_ready_reason()}))
                elif n == 3 and parts[1:] == ["repository", "index"]:
                    if method != "POST":
                        return _method_not_allowed("POST")
                    return Response(200, orjson.dumps([
                        {"name": m.name, "version": m.version, "state": m.state.upper(), "reason": m.error or ""}
                        for m in plane.models.values()
                    ]))
            elif is_page(path) and method in READ_METHODS:  # the try-it page
                return page_response()
            elif path == "/metrics":
                if method not in READ_METHODS:
                    return _method_not_allowed("GET")
                return Response(200, metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
            raise NotFound(f"no route for {method} {path}")
        except InferenceError as e:
            return error_response(e)

    return handle


def _method_not_allowed(allowed: str) -> Response:
    return Response(405, orjson.dumps({"error": f"method not allowed; use {allowed}"}), headers={"Allow": allowed})

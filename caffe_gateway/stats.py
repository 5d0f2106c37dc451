"""Triton's statistics extension through the gateway: a model's counters summed over its replicas.

`GET /v2/models/{m}[/versions/{v}]/stats` asks every ready (not ejected) endpoint of model m for its
own statistics, concurrently and outside the forwarding queue (it is cheap and must answer while the
model is overloaded), and answers their sum: counts and durations add up, `last_inference` is the
latest. `GET /v2/models/stats` does that for every model the gateway knows. An endpoint that does
not answer within `STATS_TIMEOUT_S` is left out of the sum; a model none of whose endpoints answers
is 503 (for `/v2/models/stats` it is left out).

The configuration extension (`/v2/models/{m}/config`) needs nothing here: every replica of a model
serves the same config, so it is forwarded like any other model request.
"""

from __future__ import annotations

import asyncio

import orjson

from caffe_http.server import Request, Response
from caffe_http.upstream import UpstreamError
from inference_server.serving.stats import add_stats

STATS_TIMEOUT_S = 5.0
ALL_STATS_PATH = "/v2/models/stats"


def stats_target(path: str) -> tuple[str, str | None] | None:
    """(model, version or None) when `path` asks for one model's statistics, else None."""
    parts = path.strip("/").split("/")
    if len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "stats":
        return parts[2], None
    if len(parts) == 6 and parts[:2] == ["v2", "models"] and parts[3] == "versions" and parts[5] == "stats":
        return parts[2], parts[4]
    return None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(status, orjson.dumps({"error": message}), headers=headers or {})


async def _ask(ep, target: str, deadline: float):
    try:
        up = await ep.pool.request("GET", target, [("accept", "application/json")], b"", deadline)
    except UpstreamError:
        return None
    if up.status != 200:
        return up.status, up.body
    try:
        return 200, orjson.loads(up.body).get("model_stats") or []
    except (orjson.JSONDecodeError, AttributeError):
        return None


async def model_stats(route, model: str, version: str | None) -> tuple[int, object]:
    """(200, [summed stats]) or (status, error message)."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    endpoints = [e for e in route.endpoints if e.ejected_until <= now] or list(route.endpoints)
    if not endpoints:
        return 503, f"model '{model}' has no ready endpoint"
    target = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/stats"
    answers = await asyncio.gather(*(_ask(e, target, now + STATS_TIMEOUT_S) for e in endpoints))
    by_version: dict[str, dict] = {}
    errors = []
    for a in answers:
        if a is None:
            continue
        status, payload = a
        if status != 200:
            errors.append((status, payload))
            continue
        for s in payload:
            key = str(s.get("version", ""))
            if key in by_version:
                add_stats(by_version[key], s)
            else:
                by_version[key] = s
    if by_version:
        return 200, [by_version[k] for k in sorted(by_version)]
    if errors:  # e.g. 404 for an unknown version: the replicas' own answer
        status, body = errors[0]
        try:
            return status, orjson.loads(body).get("error") or f"HTTP {status}"
        except (orjson.JSONDecodeError, AttributeError):
            return status, f"HTTP {status}"
    return 503, f"no endpoint of model '{model}' answered its statistics within {STATS_TIMEOUT_S:g} s"


async def answer(balancer, req: Request, retry_after: dict[str, str]) -> Response | None:
    """The statistics answer for `req`, or None when it is not a statistics request."""
    path = req.path
    if path.rstrip("/") == ALL_STATS_PATH:
        if req.method not in ("GET", "HEAD"):
            return _error(405, f"method {req.method} is not allowed on {path}; use GET", {"Allow": "GET"})
        routes = sorted(balancer.models.items())
        results = await asyncio.gather(*(model_stats(route, name, None) for name, route in routes))
        stats = [s for status, payload in results if status == 200 for s in payload]
        return Response(200, orjson.dumps({"model_stats": stats}))
    target = stats_target(path)
    if target is None:
        return None
    model, version = target
    route = balancer.models.get(model)
    if route is None:
        return _error(404, f"model '{model}' is not known to the gateway")
    if req.method not in ("GET", "HEAD"):
        return _error(405, f"method {req.method} is not allowed on {path}; use GET", {"Allow": "GET"})
    status, payload = await model_stats(route, model, version)
    if status != 200:
        return _error(status, payload, retry_after if status == 503 else None)
    return Response(200, orjson.dumps({"model_stats": payload}))

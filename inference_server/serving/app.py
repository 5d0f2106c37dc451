"""Routes only: the Open Inference Protocol (KServe V2) REST paths onto the data plane.

Built by `create_app`, which returns the handler the HTTP server calls; routing is two tables, one
dict lookup for a fixed path and one for a model's path, and a path seen before is one lookup in all.
Every InferenceError is turned into `{"error": message}` with its status code here, and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from prometheus_client import generate_latest

from caffe_http.server import Request, Response
from caffe_http.tryit import page_response

from ..admin import REPOSITORY_INDEX_PATH, repository_model_path
from ..errors import InferenceError, NotFound
from .dataplane import DataPlane, Model
from .inline_path import answer_inline
from .repository import Repository, index_ready_only, load_parameters

log = logging.getLogger(__name__)

LIVE = orjson.dumps({"live": True})
READY = orjson.dumps({"ready": True})
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Handler = Callable[..., Awaitable[Response]]
ROUTES_KEPT = 1024  # paths resolved before, remembered (then forgotten all at once: model names are the clients')


def error_response(e: InferenceError) -> Response:
    return Response(e.status_code, orjson.dumps({"error": e.message}), headers=e.headers)


@dataclass(frozen=True, slots=True)
class Route:
    """A path's handler and the method it answers ("GET" answers HEAD too: the transport drops the body)."""

    method: str
    handler: Handler
    maps_errors: bool = False  # the handler answers its own InferenceErrors (handle need not wrap it)

    def allows(self, method: str) -> bool:
        return method == self.method or (self.method == "GET" and method == "HEAD")


def model_path(parts: tuple[str, ...]) -> tuple[str, str | None, str | None] | None:
    """`v2/models/{m}[/versions/{v}][/{tail}]` → (model, version, tail): tail "" for the model itself,
    None for a deeper path; None where the path is not a model's."""
    n = len(parts)
    if n < 3 or parts[0] != "v2" or parts[1] != "models":
        return None
    version, rest = (parts[4], parts[5:]) if n >= 5 and parts[3] == "versions" else (None, parts[3:])
    return parts[2], version, rest[0] if len(rest) == 1 else ("" if not rest else None)


class Endpoints:
    """What each route answers: one method per route, the data plane behind them."""

    def __init__(self, plane: DataPlane, repository: Repository):
        self.plane, self.repository = plane, repository
        self.registry = plane.fallback_metrics.registry  # every model's metrics are in the one registry

    async def infer(self, req: Request, model: str, version: str | None) -> Response:
        metrics = self.plane.metrics_of(model)
        start = time.monotonic()
        metrics.in_flight.inc()
        code = 200
        try:
            m = self.plane.get(model, version)
            # while draining (SIGTERM), requests are still served: only readiness says we are going
            done = answer_inline(m, req.body, req.headers)  # the common request, in one step (inline_path.py)
            if done is not None:
                return Response(200, done[0], "application/octet-stream", done[1])
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

    def _ready_model(self, model: str, version: str | None) -> Model:
        m = self.plane.get(model, version)
        m.check_ready()  # 503 with the loader's message while loading or after a failed load
        return m

    async def model_metadata(self, req: Request, model: str, version: str | None) -> Response:
        return Response(200, self._ready_model(model, version).metadata)

    async def model_ready(self, req: Request, model: str, version: str | None) -> Response:
        return Response(200, orjson.dumps({"name": self._ready_model(model, version).name, "ready": True}))

    async def model_config(self, req: Request, model: str, version: str | None) -> Response:
        return Response(200, self._ready_model(model, version).config_json)

    async def model_stats(self, req: Request, model: str, version: str | None) -> Response:
        m = self.plane.get(model, version)  # counters exist from the start, loaded or not (Triton's statistics)
        return Response(200, orjson.dumps({"model_stats": [m.stats_json()]}))

    async def all_stats(self, req: Request) -> Response:
        models = self.plane.models.values()
        return Response(200, orjson.dumps({"model_stats": [m.stats_json() for m in models]}))

    # --- Triton's model repository extension (admin.py names these routes for whoever guards them)
    async def repository_index(self, req: Request) -> Response:
        return Response(200, orjson.dumps(self.repository.index(index_ready_only(req.body))))

    async def repository_load(self, req: Request, model: str) -> Response:
        await self.repository.load(model, load_parameters(req.body))
        return Response(200, b"{}")

    async def repository_unload(self, req: Request, model: str) -> Response:
        await self.repository.unload(model)  # parameters (unload_dependents) mean nothing without ensembles
        return Response(200, b"{}")

    async def server_metadata(self, req: Request) -> Response:
        return Response(200, self.plane.server_metadata)

    async def live(self, req: Request) -> Response:
        return Response(200, LIVE)

    async def ready(self, req: Request) -> Response:
        if self.plane.ready():
            return Response(200, READY)
        return Response(503, orjson.dumps({"ready": False, "error": self.plane.not_ready_reason()}))

    async def prometheus(self, req: Request) -> Response:
        return Response(200, generate_latest(self.registry), METRICS_TYPE)

    async def try_it(self, req: Request) -> Response:
        return page_response()


def create_app(plane: DataPlane, repository: Repository) -> Callable[[Request], Awaitable[Response]]:
    """The request handler: a fixed path is one dict lookup, a model's path one more by its last segment."""
    e = Endpoints(plane, repository)
    paths = {  # by the path's segments, slashes at either end ignored
        ("v2",): Route("GET", e.server_metadata),
        ("v2", "health", "live"): Route("GET", e.live),
        ("v2", "health", "ready"): Route("GET", e.ready),
        ("v2", "models", "stats"): Route("GET", e.all_stats),  # every model's statistics
        REPOSITORY_INDEX_PATH: Route("POST", e.repository_index),
        ("metrics",): Route("GET", e.prometheus),
        ("",): Route("GET", e.try_it),
        ("index.html",): Route("GET", e.try_it),
    }
    model_tails: dict[str | None, Route] = {  # v2/models/{m}[/versions/{v}]/{tail}; None: no such tail
        "infer": Route("POST", e.infer, maps_errors=True),
        "": Route("GET", e.model_metadata),
        "ready": Route("GET", e.model_ready),
        "stats": Route("GET", e.model_stats),
        "config": Route("GET", e.model_config),
    }
    repository_actions = {"load": Route("POST", e.repository_load), "unload": Route("POST", e.repository_unload)}

    resolved: dict[str, tuple[Route, tuple[str | None, ...]]] = {}  # by path: a client sends the same ones

    def resolve(path: str) -> tuple[Route, tuple[str | None, ...]] | None:
        parts = tuple(path.strip("/").split("/"))
        route = paths.get(parts)
        if route is not None:
            return route, ()
        if (found := model_path(parts)) is not None:
            route = model_tails.get(found[2])
            return None if route is None else (route, found[:2])
        if (action := repository_model_path(parts)) is not None:
            return repository_actions[action[1]], action[:1]
        return None

    def handle(req: Request) -> Awaitable[Response]:
        """The route's own awaitable where it maps its errors itself (infer: no coroutine of ours around it)."""
        found = resolved.get(req.path)
        if found is None:
            found = resolve(req.path)
            if found is None:
                return _answer(error_response(NotFound(f"no route for {req.method} {req.path}")))
            if len(resolved) >= ROUTES_KEPT:
                resolved.clear()
            resolved[req.path] = found
        route, args = found
        if not route.allows(req.method):
            return _answer(_method_not_allowed(route.method))
        if route.maps_errors:
            return route.handler(req, *args)
        return _mapped(route.handler(req, *args))

    return handle


async def _answer(resp: Response) -> Response:
    return resp


async def _mapped(answer: Awaitable[Response]) -> Response:
    """A route's answer, an InferenceError it raises as its JSON error."""
    try:
        return await answer
    except InferenceError as err:
        return error_response(err)


def _method_not_allowed(allowed: str) -> Response:
    return Response(405, orjson.dumps({"error": f"method not allowed; use {allowed}"}), headers={"Allow": allowed})

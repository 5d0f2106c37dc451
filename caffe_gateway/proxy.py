"""The gateway's request handler: its own health/listing routes, and forwarding `/v2/models/{m}/...`.

What a client sees:
- `/v2/health/live`, `/v2/health/ready`, `GET /v2`, `GET /v2/models`, `POST /v2/repository/index`
  and `/metrics` are the gateway's own; everything under `/v2/models/{m}` goes to a ready
  server of model `m` with the path and query unchanged; an unknown model is 404 `{"error"}`.
- The body is passed through byte for byte (JSON or the binary tensor extension); only the
  headers in `REQUEST_HEADERS` go upstream and only those in `RESPONSE_HEADERS` come back.
- Overload (queue full, or no free endpoint within the maximum wait) and a model with no ready
  endpoint are answered **503** with an integer `Retry-After`, as Triton, Envoy and Knative do.
  A request whose deadline passed before it could be forwarded is answered 504 and never sent.
- A model scaled to zero (no ready endpoint, a cold-start time set) holds its requests until an
  endpoint is ready, up to that time, which is added to the request's own deadline; past it, 503
  with `Retry-After`. Never a 4xx for "not ready".
- A model with a canary: each request goes to one variant by weight, or by the version its URL
  names (traffic.py); `GET /autoscaling/{model}[/{variant}]` serves the load signal for KEDA.
- A request that did not run is retried on another endpoint, within the retry budget and the
  request's deadline: a connection failure (nothing of the answer received, e.g. a pod that closed
  its listener), a 503 that says the server did not start it (`Caffe-Not-Run`, or "shutting down"),
  and a request waiting on an endpoint whose readiness probe then failed (a hung replica: the
  balancer takes it back, see `ModelRoute.set_endpoints`). A connection that breaks mid-answer is a 502.
- Those rules live in forward.py, shared with gRPC; this module sends one attempt over HTTP and
  maps the outcome to an HTTP answer (`REFUSALS`).
- Why readiness and not a per-try timeout (Envoy's `per_try_timeout`): a per-try timeout cannot
  tell a hung replica from a slow answer (a large batch, a cold cache), so it either fires on
  healthy work, duplicating it when the servers are loaded, or is set long enough to barely help;
  the readiness probe asks the replica itself and already marks a hung one within seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson

from caffe_http.server import NOT_RUN_HEADER, Request, Response
from caffe_http.tryit import is_page, page_response
from caffe_http.upstream import ConnectFailed, EndpointLost, ResponseBroken, UpstreamResponse, UpstreamTimeout
from inference_server.admin import repository_model_path

from . import traffic
from .balancer import Balancer, Endpoint, ModelRoute
from .forward import (
    BROKEN,
    DEADLINE,
    NOT_SERVED,
    UNAVAILABLE,
    UNKNOWN,
    Forwarder,
    Lost,
    NotRun,
    ProxySettings,
    Refused,
    Transport,
    Unreachable,
    not_forwarded,
)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, GatewayMetrics
from .repository import broadcast, endpoints_of, unknown_model
from .stats import answer as stats_answer
from .tracing import GatewayTracing, with_trace_context

__all__ = ["Gateway", "ProxySettings", "MODELS_PREFIX", "FORWARDED_EXTENSIONS", "GATEWAY_NAME"]

# Forwarded to the server (lower-case names as the server parses them).
REQUEST_HEADERS = (
    "content-type", "content-encoding", "accept", "accept-encoding", "inference-header-content-length",
    "x-request-id", "traceparent", "tracestate", "user-agent",
)
# Returned to the client, with the spelling clients look for.
RESPONSE_HEADERS = {
    "content-encoding": "Content-Encoding",
    "inference-header-content-length": "Inference-Header-Content-Length",
    "retry-after": "Retry-After",
    "x-request-id": "X-Request-Id",
    "vary": "Vary",
    "x-caffeserve-backend": "X-Caffeserve-Backend",
}
# The gateway's own answers (forward.Refused kinds) as HTTP codes; 503s carry Retry-After.
REFUSALS = {UNKNOWN: 404, UNAVAILABLE: 503, DEADLINE: 504, BROKEN: 502, NOT_SERVED: 501}

_NOT_RUN = NOT_RUN_HEADER.lower()
MODELS_PREFIX = "/v2/models/"
REPOSITORY_MODELS_PREFIX = "/v2/repository/models/"
GATEWAY_NAME = "caffe-serving-gateway"
# OIP/Triton extensions that work through the gateway (it forwards the bytes unchanged; statistics
# are summed over a model's replicas by stats.py).
FORWARDED_EXTENSIONS = ("binary_tensor_data", "classification", "statistics", "model_configuration")
FORWARDED_METHODS = frozenset({"GET", "HEAD", "POST"})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(status, orjson.dumps({"error": message}), headers=headers or {})


def _json(obj, status: int = 200) -> Response:
    return Response(status, orjson.dumps(obj))


class HTTPTransport:
    """forward.Transport over HTTP/1.1: one attempt is one request on the endpoint's keep-alive pool;
    the request is (method, target, headers, body)."""

    needs_grpc = False
    cancelled_code = 499  # the client went away (nginx's code); nothing was answered

    def __init__(self, settings: ProxySettings):
        self.settings = settings

    async def send(self, route: ModelRoute, ep: Endpoint, request: tuple, deadline: float) -> UpstreamResponse:
        method, target, headers, body = request
        try:
            up = await ep.pool.request(method, target, headers, body, deadline)
        except ConnectFailed as e:
            raise Unreachable(f"cannot reach model '{route.name}': {e}") from None
        except EndpointLost as e:
            # its readiness probe failed while the request waited there (hung): the request is
            # taken back and, inference being idempotent, sent to a healthy endpoint
            raise Lost(f"model '{route.name}' at {e}") from None
        except ResponseBroken as e:
            raise Refused(BROKEN, f"model '{route.name}' at {ep.address}: {e}") from None
        except UpstreamTimeout as e:
            if not e.sent:  # never reached the server: said as forward.py says a deadline that passed in the queue
                raise Refused(DEADLINE, not_forwarded(route, str(e))) from None
            raise Refused(DEADLINE, f"model '{route.name}' did not answer within "
                                    f"{self.settings.request_timeout_s:g} s") from None
        if up.status == 503 and _not_run(up):
            # the server did not start it (shutting down, loading): another replica may
            raise NotRun(f"model '{route.name}' at {ep.address} did not run the request: {_error_of(up)}")
        return up

    @staticmethod
    def with_trace_context(request: tuple, context: dict[str, str]) -> tuple:
        """`request` carrying the trace context `context` (tracing.py) in place of the client's."""
        method, target, headers, body = request
        return method, target, with_trace_context(headers, context), body

    @staticmethod
    def failed(up: UpstreamResponse) -> bool:
        return up.status >= 500 and up.status != 503  # a 503 is the server saying "busy"

    @staticmethod
    def code(up: UpstreamResponse) -> int:
        return up.status

    @staticmethod
    def refused_code(kind: str) -> int:
        return REFUSALS[kind]


class Gateway:
    """Routes requests; `ready()` says whether discovery has completed its first sync."""

    def __init__(self, balancer: Balancer, settings: ProxySettings | None = None,
                 ready: Callable[[], bool] = lambda: True, version: str = "0.1.0",
                 tracing: GatewayTracing | None = None):
        self.balancer = balancer
        self.tracing = tracing  # None: tracing off (tracing.py)
        self.settings = settings or ProxySettings()
        self.metrics = GatewayMetrics(balancer)
        self.forwarder = Forwarder(balancer, self.metrics, self.settings)
        self.transport = HTTPTransport(self.settings)
        self.is_ready = ready
        self.version = version
        self._retry_after = {"Retry-After": str(int(self.settings.retry_after_s))}
        # The gateway's own routes: path -> (methods, handler). Model paths and the prefixed
        # routes (try-it page, autoscaling) are matched in `handle`.
        get = frozenset({"GET", "HEAD"})
        any_method = FORWARDED_METHODS
        self._routes: dict[str, tuple[frozenset[str], Callable[[Request], Awaitable[Response]]]] = {
            "/v2/health/live": (any_method, self._live),
            "/v2/health/ready": (any_method, self._ready),
            "/v2": (any_method, self._server_metadata),
            "/v2/": (any_method, self._server_metadata),
            "/v2/models": (any_method, self._models),
            "/v2/models/": (any_method, self._models),
            "/v2/repository/index": (frozenset({"POST"}), self._index),
            "/metrics": (any_method, self._metrics),
        }
        self._page_methods = get

    async def handle(self, req: Request) -> Response:
        path = req.path
        if path.startswith(MODELS_PREFIX) and len(path) > len(MODELS_PREFIX):  # the hot path first
            if path.endswith("stats") and (stats := await stats_answer(self.balancer, req, self._retry_after)):
                return stats
            rest = path[len(MODELS_PREFIX):]
            if self.tracing is not None:
                return await self._traced(req, rest.split("/", 1)[0], traffic.pinned_version(rest))
            return await self._forward(req, rest.split("/", 1)[0], traffic.pinned_version(rest))
        if req.method not in FORWARDED_METHODS:
            return _error(405, f"method {req.method} is not allowed on {path}")
        if path.startswith(REPOSITORY_MODELS_PREFIX) and (
                target := repository_model_path(tuple(path.strip("/").split("/")))) is not None:
            if req.method != "POST":
                return _error(405, f"method {req.method} is not allowed on {path}; use POST", {"Allow": "POST"})
            return await self._repository_call(req, *target)
        own = self._routes.get(path)
        if own is not None and req.method in own[0]:
            return await own[1](req)
        if is_page(path) and req.method in self._page_methods:  # the try-it page
            return page_response()
        if path.startswith(traffic.AUTOSCALING_PREFIX) or path == traffic.AUTOSCALING_PREFIX.rstrip("/"):
            status, answer = traffic.autoscaling_answer(self.balancer, path + "/")
            return _json(answer, status)
        return _error(404, f"no route for {req.method} {path}")

    # --- the gateway's own routes
    async def _live(self, req: Request) -> Response:
        return _json({"live": True})

    async def _ready(self, req: Request) -> Response:
        ready = self.is_ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def _server_metadata(self, req: Request) -> Response:
        return _json({"name": GATEWAY_NAME, "version": self.version, "extensions": list(FORWARDED_EXTENSIONS)})

    async def _models(self, req: Request) -> Response:
        return _json({"models": sorted(self.balancer.models)})

    async def _metrics(self, req: Request) -> Response:
        return Response(200, self.metrics.render(), content_type=METRICS_CONTENT_TYPE)

    async def _index(self, req: Request) -> Response:
        only_ready = False
        if req.body.strip():
            try:
                only_ready = bool(orjson.loads(req.body).get("ready", False))
            except (orjson.JSONDecodeError, AttributeError):
                return _error(400, "repository index request must be a JSON object like {\"ready\": true}")
        return _json(await self.index_entries(only_ready, req.arrived))

    async def index_entries(self, only_ready: bool = False, arrived: float = 0.0) -> list[dict]:
        """Triton's repository index: every model with its version, state and reason (REST and gRPC).

        A model with a ready endpoint answers for itself (its replica's own index entry: version,
        READY); one without is UNAVAILABLE with the reason, as a server reports a model it cannot serve.
        """
        routes = sorted(self.balancer.models.items())
        asked = Request("POST", "/v2/repository/index", "", {"content-type": "application/json"}, b"{}",
                        arrived=arrived)
        asking = [name for name, route in routes if route.ready_count()]
        answers = await asyncio.gather(*(self._ask(asked, self.balancer.models[name]) for name in asking))
        by_name: dict[str, dict] = {}
        for name, resp in zip(asking, answers, strict=True):
            if resp.status == 200:  # a server holding many models lists them all: take the asked one's entry
                by_name.update((e["name"], e) for e in orjson.loads(resp.body)
                               if isinstance(e, dict) and e.get("name") == name)
        out = []
        for name, route in routes:
            entry = by_name.get(name)
            if entry is None:
                entry = {"name": name, "version": "", "state": "UNAVAILABLE",
                         "reason": "no ready endpoint" if not route.ready_count() else "its endpoint did not answer"}
            if only_ready and entry.get("state") != "READY":
                continue
            out.append({k: entry.get(k, "") for k in ("name", "version", "state", "reason")})
        return out

    async def _repository_call(self, req: Request, model: str, action: str) -> Response:
        """A load or unload: sent to every server of the model (repository.py); success when all succeed."""
        targets = endpoints_of(self.balancer, model)
        if not targets:
            return _error(404, unknown_model(model))
        for address, answer in await broadcast(self.transport, targets, _upstream_request(req)):
            if isinstance(answer, Refused):
                return _error(REFUSALS[answer.kind], f"{action} of model '{model}' at {address}: {answer.message}")
            if isinstance(answer, Exception):  # could not reach it, or it did not take the call
                return _error(503, f"{action} of model '{model}' at {address}: {answer}", dict(self._retry_after))
            if answer.status != 200:
                return _passthrough(answer)
        return _json({})

    # --- forwarding
    async def _traced(self, req: Request, model: str, version: str | None) -> Response:
        """`_forward` with the request's spans (tracing.py)."""
        assert self.tracing is not None
        transport = self.tracing.rest(self.transport, req.method, req.path, req.headers, model,
                                      req.arrived or asyncio.get_running_loop().time())
        status = HTTPTransport.cancelled_code
        try:
            resp = await self._forward(req, model, version, transport)
            status = resp.status
            return resp
        finally:
            transport.end(status, status >= 500 and status != 503)

    async def _forward(self, req: Request, model: str, version: str | None = None,
                       transport: Transport | None = None) -> Response:
        if req.method not in FORWARDED_METHODS:
            known = model in self.balancer.models
            resp = (_error(405, f"method {req.method} is not allowed on {req.path}") if known
                    else _error(404, f"model '{model}' is not known to the gateway"))
            self.metrics.count(model if known else "", resp.status)
            return resp
        try:
            up = await self.forwarder.forward(transport or self.transport, _upstream_request(req), model, version,
                                              req.arrived or asyncio.get_running_loop().time())
        except Refused as e:
            resp = self._refusal(e)
            self.metrics.count(model if e.kind != UNKNOWN else "", resp.status)
            return resp
        except asyncio.CancelledError:
            self.metrics.count(model, HTTPTransport.cancelled_code)
            raise
        self.metrics.count(model, up.status)
        return _passthrough(up)

    async def _ask(self, req: Request, route: ModelRoute) -> Response:
        """`req` forwarded to the variant `route` (not counted: the gateway asks for itself)."""
        try:
            up = await self.forwarder.forward(self.transport, _upstream_request(req), route.name, None,
                                              req.arrived or asyncio.get_running_loop().time(), route=route)
        except Refused as e:
            return self._refusal(e)
        return _passthrough(up)

    def _refusal(self, e: Refused) -> Response:
        status = REFUSALS[e.kind]
        return _error(status, e.message, dict(self._retry_after) if status == 503 else None)


def _upstream_request(req: Request) -> tuple[str, str, list[tuple[str, str]], bytes | bytearray]:
    """What goes upstream: method, target, the allow-listed headers plus x-forwarded-for, body."""
    target = f"{req.path}?{req.query}" if req.query else req.path
    rh = req.headers
    headers = [(k, rh[k]) for k in REQUEST_HEADERS if k in rh]
    if req.client:
        ip = req.client.rsplit(":", 1)[0]
        prior = rh.get("x-forwarded-for")
        headers.append(("x-forwarded-for", f"{prior}, {ip}" if prior else ip))
    return req.method, target, headers, req.body


def _not_run(up: UpstreamResponse) -> bool:
    """A 503 that says the server did not start the request: its Caffe-Not-Run header, or the
    "shutting down" answer of servers older than that header."""
    return any(name == _NOT_RUN for name, _ in up.headers) or b"shutting down" in up.body


def _error_of(up: UpstreamResponse) -> str:
    try:
        return str(orjson.loads(up.body).get("error") or f"HTTP {up.status}")
    except (orjson.JSONDecodeError, AttributeError):
        return f"HTTP {up.status}"


def _passthrough(up: UpstreamResponse) -> Response:
    content_type = ""
    headers: dict[str, str] = {}
    for name, value in up.headers:
        if name == "content-type":
            content_type = value
        else:
            spelled = RESPONSE_HEADERS.get(name)
            if spelled is not None:
                headers[spelled] = value
    return Response(up.status, up.body, content_type=content_type, headers=headers)

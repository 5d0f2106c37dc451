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
- Why readiness and not a per-try timeout (Envoy's `per_try_timeout`): a per-try timeout cannot
  tell a hung replica from a slow answer (a large batch, a cold cache), so it either fires on
  healthy work, duplicating it when the servers are loaded, or is set long enough to barely help;
  the readiness probe asks the replica itself and already marks a hung one within seconds.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

import orjson

from caffe_http.server import NOT_RUN_HEADER, Request, Response
from caffe_http.tryit import is_page, page_response
from caffe_http.upstream import ConnectFailed, EndpointLost, ResponseBroken, UpstreamTimeout

from . import traffic
from .balancer import Balancer, DeadlinePassed, NoEndpoints, Overloaded
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import GatewayMetrics
from .stats import answer as stats_answer

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

_NOT_RUN = NOT_RUN_HEADER.lower()
MODELS_PREFIX = "/v2/models/"
GATEWAY_NAME = "caffe-serving-gateway"
# OIP/Triton extensions that work through the gateway (it forwards the bytes unchanged; statistics
# are summed over a model's replicas by stats.py).
FORWARDED_EXTENSIONS = ("binary_tensor_data", "classification", "statistics", "model_configuration")


@dataclass
class ProxySettings:
    request_timeout_s: float = 30.0  # from the request's arrival to its whole answer
    max_retries: int = 2  # each on a different endpoint
    retry_after_s: int = 1  # Retry-After on the gateway's own 503s


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(status, orjson.dumps({"error": message}), headers=headers or {})


def _json(obj, status: int = 200) -> Response:
    return Response(status, orjson.dumps(obj))


class Gateway:
    """Routes requests; `ready()` says whether discovery has completed its first sync."""

    def __init__(self, balancer: Balancer, settings: ProxySettings | None = None,
                 ready: Callable[[], bool] = lambda: True, version: str = "0.1.0"):
        self.balancer = balancer
        self.settings = settings or ProxySettings()
        self.metrics = GatewayMetrics(balancer)
        self.is_ready = ready
        self.version = version
        self._retry_after = {"Retry-After": str(int(self.settings.retry_after_s))}

    async def handle(self, req: Request) -> Response:
        path = req.path
        if path.endswith("stats") and (stats := await stats_answer(self.balancer, req, self._retry_after)):
            return stats
        if path.startswith(MODELS_PREFIX) and len(path) > len(MODELS_PREFIX):
            rest = path[len(MODELS_PREFIX):]
            return await self._forward(req, rest.split("/", 1)[0], traffic.pinned_version(rest))
        if req.method not in ("GET", "HEAD", "POST"):
            return _error(405, f"method {req.method} is not allowed on {path}")
        if path == "/v2/health/live":
            return _json({"live": True})
        if path == "/v2/health/ready":
            ready = self.is_ready()
            return _json({"ready": ready}, 200 if ready else 503)
        if path in ("/v2", "/v2/"):
            return _json({"name": GATEWAY_NAME, "version": self.version, "extensions": list(FORWARDED_EXTENSIONS)})
        if path in ("/v2/models", "/v2/models/"):
            return _json({"models": sorted(self.balancer.models)})
        if path == "/v2/repository/index" and req.method == "POST":
            return await self._index(req)
        if path == "/metrics":
            return Response(200, self.metrics.render(), content_type=METRICS_CONTENT_TYPE)
        if is_page(path) and req.method in ("GET", "HEAD"):  # the try-it page
            return page_response()
        if path.startswith(traffic.AUTOSCALING_PREFIX) or path == traffic.AUTOSCALING_PREFIX.rstrip("/"):
            status, answer = traffic.autoscaling_answer(self.balancer, path + "/")
            return _json(answer, status)
        return _error(404, f"no route for {req.method} {path}")

    async def _index(self, req: Request) -> Response:
        """Triton's repository index: every model with its version, state and reason.

        A model with a ready endpoint answers for itself (its replica's own index entry: version,
        READY); one without is UNAVAILABLE with the reason, as a server reports a model it cannot serve.
        """
        only_ready = False
        if req.body.strip():
            try:
                only_ready = bool(orjson.loads(req.body).get("ready", False))
            except (orjson.JSONDecodeError, AttributeError):
                return _error(400, "repository index request must be a JSON object like {\"ready\": true}")
        routes = sorted(self.balancer.models.items())
        asked = Request("POST", "/v2/repository/index", "", {"content-type": "application/json"}, b"{}",
                        arrived=req.arrived)
        answers = await asyncio.gather(*(self._forward_to(asked, route) for _, route in routes if route.ready_count()))
        by_name: dict[str, dict] = {}
        for resp in answers:
            if resp.status == 200:
                by_name.update((e["name"], e) for e in orjson.loads(resp.body) if isinstance(e, dict) and "name" in e)
        out = []
        for name, route in routes:
            entry = by_name.get(name)
            if entry is None:
                entry = {"name": name, "version": "", "state": "UNAVAILABLE",
                         "reason": "no ready endpoint" if not route.ready_count() else "its endpoint did not answer"}
            if only_ready and entry.get("state") != "READY":
                continue
            out.append({k: entry.get(k, "") for k in ("name", "version", "state", "reason")})
        return _json(out)

    async def _forward(self, req: Request, model: str, version: str | None = None) -> Response:
        route = traffic.choose(self.balancer, model, version)
        if route is None:
            self.metrics.count("", 404)
            return _error(404, f"model '{model}' is not known to the gateway")
        if req.method not in ("GET", "HEAD", "POST"):
            resp = _error(405, f"method {req.method} is not allowed on {req.path}")
            self.metrics.count(model, 405)
            return resp
        try:
            resp = await self._forward_to(req, route)
        except asyncio.CancelledError:
            self.metrics.count(model, 499)  # the client went away (nginx's code); nothing was answered
            raise
        self.metrics.count(model, resp.status)
        self.metrics.count_variant(model, route.variant, resp.status)
        return resp

    async def _forward_to(self, req: Request, route) -> Response:
        loop = asyncio.get_running_loop()
        deadline = (req.arrived or loop.time()) + self.settings.request_timeout_s
        if not route.endpoints and route.cold_start_s > 0:
            deadline += route.cold_start_s  # a cold start is not charged to the request's own time
        target = f"{req.path}?{req.query}" if req.query else req.path
        rh = req.headers
        headers = [(k, rh[k]) for k in REQUEST_HEADERS if k in rh]
        if req.client:
            ip = req.client.rsplit(":", 1)[0]
            prior = rh.get("x-forwarded-for")
            headers.append(("x-forwarded-for", f"{prior}, {ip}" if prior else ip))
        exclude: frozenset[str] = frozenset()
        retries = 0
        holds_retry = False  # this attempt counts against the model's retry budget
        last_failure = ""
        fell_back = False
        route.active += 1
        try:
            while True:
                try:
                    ep = await route.acquire(deadline, exclude)
                except NoEndpoints as e:
                    other = traffic.fallback(self.balancer, route) if not (exclude or fell_back) else None
                    if other is not None:  # its variant went away while it waited: the other takes it
                        fell_back = True
                        route.active -= 1
                        route = other
                        route.active += 1
                        continue
                    msg = f"cannot reach model '{route.name}': {last_failure}; {e}" if last_failure else str(e)
                    return _error(503, msg, dict(self._retry_after))
                except Overloaded as e:
                    msg = f"cannot reach model '{route.name}': {last_failure}; {e}" if last_failure else str(e)
                    return _error(503, msg, dict(self._retry_after))
                except DeadlinePassed as e:
                    return _error(504, str(e))
                if loop.time() >= deadline:
                    route.release(ep, None)
                    return _error(504, f"request deadline passed before it could be forwarded to model '{route.name}'")
                t0 = time.perf_counter()
                not_run = None  # a reason to send the request elsewhere: it did not run (or was taken back)
                rescued = False
                try:
                    up = await ep.pool.request(req.method, target, headers, req.body, deadline)
                except ConnectFailed as e:
                    route.unreachable(ep)
                    route.release(ep, True)
                    not_run = f"cannot reach model '{route.name}': {e}"
                except EndpointLost as e:
                    # its readiness probe failed while the request waited there (hung): the request is
                    # taken back and, inference being idempotent, sent to a healthy endpoint
                    route.release(ep, None)
                    not_run = f"model '{route.name}' at {e}"
                    rescued = True
                except ResponseBroken as e:
                    route.release(ep, True)
                    return _error(502, f"model '{route.name}' at {ep.address}: {e}")
                except UpstreamTimeout:
                    route.release(ep, True)
                    return _error(504, f"model '{route.name}' did not answer within "
                                       f"{self.settings.request_timeout_s:g} s")
                except BaseException:
                    route.release(ep, None)
                    raise
                else:
                    self.metrics.observe_upstream(route.name, time.perf_counter() - t0)
                    route.release(ep, up.status >= 500 and up.status != 503)
                    if not _not_run(up):
                        return _passthrough(up)
                    # the server did not start it (shutting down, loading): another replica may
                    not_run = f"model '{route.name}' at {ep.address} did not run the request: {_error_of(up)}"
                last_failure = not_run
                exclude = exclude | {ep.address}
                if holds_retry:
                    route.end_retry()
                    holds_retry = False
                if retries >= self.settings.max_retries or loop.time() >= deadline:
                    return _error(503, not_run, dict(self._retry_after))
                if rescued:
                    # Outside the concurrent-retry budget, which exists so that retries do not multiply
                    # the load on struggling servers: a rescue moves work off a server that does none
                    # (it stopped answering), and is bounded by what that server held (max concurrency).
                    route.retries_total += 1
                elif not route.try_start_retry():
                    return _error(503, f"{not_run} (retry budget exhausted)", dict(self._retry_after))
                else:
                    holds_retry = True
                retries += 1
        finally:
            route.active -= 1
            if holds_retry:
                route.end_retry()


def _not_run(up) -> bool:
    """A 503 that says the server did not start the request: its Caffe-Not-Run header, or the
    "shutting down" answer of servers older than that header."""
    if up.status != 503:
        return False
    return any(name == _NOT_RUN for name, _ in up.headers) or b"shutting down" in up.body


def _error_of(up) -> str:
    try:
        return str(orjson.loads(up.body).get("error") or f"HTTP {up.status}")
    except (orjson.JSONDecodeError, AttributeError):
        return f"HTTP {up.status}"


def _passthrough(up) -> Response:
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

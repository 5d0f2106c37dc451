"""The gateway's one forwarding loop, for REST and gRPC alike.

For each request it chooses the model's variant (traffic.choose: the canary split, a pinned
version), acquires an endpoint (balancer.py: least request, the wait queue, the hold while the
model is scaled to zero), applies the deadline, exclusions and retry budget, falls back to the
other variant when its own went away while it waited, rescues a request from a hung replica,
releases the endpoint and counts the outcome. A transport (proxy.py, grpc_proxy.py) only sends
one attempt and maps the outcome to its own status: its `send` returns the server's answer or
raises one of the exceptions below, and its tables map a `Refused` kind to an HTTP or gRPC code.

Why one loop: the two transports had each their own copy, and the gRPC copy had drifted (no
canary, no pin, no fallback, no rescue). Rules written once hold for both, and one table of tests
(tests/gateway/test_gateway_transports.py) runs every case over both.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

from . import traffic
from .balancer import Balancer, DeadlinePassed, Endpoint, ModelRoute, NoEndpoints, Overloaded
from .metrics import GatewayMetrics

# What the gateway itself answers (a `Refused` kind); each transport maps them to its codes.
UNKNOWN = "unknown"  # no such model: 404 / NOT_FOUND
UNAVAILABLE = "unavailable"  # no endpoint, overloaded, retries spent: 503 / UNAVAILABLE, with a retry hint
DEADLINE = "deadline"  # the request's deadline passed: 504 / DEADLINE_EXCEEDED
BROKEN = "broken"  # the answer began and its connection broke: 502
NOT_SERVED = "not-served"  # the model's servers do not speak this transport: UNIMPLEMENTED
KINDS = (UNKNOWN, UNAVAILABLE, DEADLINE, BROKEN, NOT_SERVED)

_EMPTY: frozenset[str] = frozenset()


@dataclass
class ProxySettings:
    request_timeout_s: float = 30.0  # from the request's arrival to its whole answer
    max_retries: int = 2  # each on a different endpoint
    retry_after_s: int = 1  # the retry hint on the gateway's own UNAVAILABLE answers


class Refused(Exception):
    """The gateway's own answer, one of KINDS, with the message the client reads."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


class NotRun(Exception):
    """The attempt did not run the request (the server said so): another endpoint may."""

    failed: bool | None = False  # what it tells outlier detection (a "did not run" 503 is not a failure)
    unreachable = False  # skip the endpoint for a moment (nothing answered)
    rescued = False  # taken back from a hung replica: outside the retry budget


class Unreachable(NotRun):
    """Nothing of an answer came back (connection refused or closed before answering)."""

    failed = True
    unreachable = True


class Lost(NotRun):
    """The endpoint failed its readiness probe (hung) while the request waited there."""

    failed = None
    rescued = True


class Transport(Protocol):
    """One transport's side of forwarding: send one attempt, say what its answer means."""

    needs_grpc: bool  # an endpoint without a gRPC port cannot take it
    cancelled_code: Any  # the code counted when the client went away

    async def send(self, route: ModelRoute, ep: Endpoint, request: Any, deadline: float) -> Any:
        """The server's answer, or NotRun (try elsewhere) or Refused (final, counts as a failure)."""

    def failed(self, answer: Any) -> bool:
        """Whether the answer counts against the endpoint (outlier detection)."""

    def code(self, answer: Any) -> Any:
        """The answer's code, for the per-variant metric."""

    def refused_code(self, kind: str) -> Any:
        """The code of one of the gateway's own answers, for the per-variant metric."""


class Forwarder:
    """The loop both transports forward through, over the one balancer and metrics.

    One coroutine per request on the hot path (choose, acquire, send, release); the rare paths
    (fallback, retry, the gRPC-less endpoints) are small functions. Speed: bench/gateway.py (whole
    process) and bench/gateway_core.py (this code alone)."""

    def __init__(self, balancer: Balancer, metrics: GatewayMetrics, settings: ProxySettings):
        self.balancer = balancer
        self.metrics = metrics
        self.settings = settings

    async def forward(self, transport: Transport, request: Any, model: str, version: str | None,
                      arrived: float, client_deadline: float | None = None, route: ModelRoute | None = None) -> Any:
        """The answer of the endpoint that ran `request`; Refused with the gateway's own answer.

        The deadline runs from `arrived` for the request timeout (a cold start's hold is added),
        and never past the client's own deadline. `route`: this variant, not one chosen by traffic."""
        if route is None:
            route = traffic.choose(self.balancer, model, version)
            if route is None:
                raise Refused(UNKNOWN, f"model '{model}' is not known to the gateway")
        deadline = arrived + self.settings.request_timeout_s
        if not route.endpoints and route.cold_start_s > 0:
            deadline += route.cold_start_s  # a cold start is not charged to the request's own time
        if client_deadline is not None and client_deadline < deadline:
            deadline = client_deadline
        needs_grpc = transport.needs_grpc
        exclude = _rest_only(route) if needs_grpc else _EMPTY
        tries = _NO_TRIES  # made on the first failure: the hot path allocates nothing for it
        code = transport.cancelled_code
        loop = asyncio.get_running_loop()
        route.active += 1
        try:
            while True:
                try:
                    ep = await route.acquire(deadline, exclude)
                except NoEndpoints as e:
                    if tries is _NO_TRIES:
                        tries = _Tries()
                    other = tries.fallback(self.balancer, route, e)
                    route.active -= 1
                    route = other
                    route.active += 1
                    exclude = _rest_only(route) if needs_grpc else _EMPTY
                    continue
                except Overloaded as e:
                    raise Refused(UNAVAILABLE, tries.why(route, e)) from None
                except DeadlinePassed as e:
                    raise Refused(DEADLINE, str(e)) from None
                if loop.time() >= deadline:
                    route.release(ep, None)
                    raise Refused(DEADLINE, not_forwarded(route))
                if needs_grpc and ep.grpc_port is None:  # discovery changed it while the call waited
                    route.release(ep, None)
                    exclude = exclude | {ep.address}
                    continue
                t0 = time.perf_counter()
                try:
                    answer = await transport.send(route, ep, request, deadline)
                except NotRun as e:
                    if e.unreachable:
                        route.unreachable(ep)
                    route.release(ep, e.failed)
                    exclude = exclude | {ep.address}
                    if tries is _NO_TRIES:
                        tries = _Tries()
                    tries.next(route, e, loop.time() >= deadline, self.settings.max_retries)
                    continue
                except Refused:
                    route.release(ep, True)
                    raise
                except BaseException:
                    route.release(ep, None)
                    raise
                self.metrics.observe_upstream(route.name, time.perf_counter() - t0)
                route.release(ep, transport.failed(answer))
                code = transport.code(answer)
                return answer
        except Refused as e:
            code = transport.refused_code(e.kind)
            raise
        finally:
            route.active -= 1
            if tries.holds_retry:
                route.end_retry()
            self.metrics.count_variant(model, route.variant, code)


def not_forwarded(route: ModelRoute, why: str = "") -> str:
    """The message of a 504 for a request that never reached a server (its deadline passed first)."""
    message = f"request deadline passed before it could be forwarded to model '{route.name}'"
    return f"{message} ({why})" if why else message


def _rest_only(route: ModelRoute) -> frozenset[str]:
    """The endpoints a gRPC call cannot use (no gRPC port); NOT_SERVED when that is all of them."""
    exclude = frozenset(e.address for e in route.endpoints if e.grpc_port is None)
    if route.endpoints and len(exclude) == len(route.endpoints):
        raise Refused(NOT_SERVED, f"model '{route.name}' is not served over gRPC: its servers expose no gRPC "
                                  "port (spec.runtime.grpc.enabled is false?)")
    return exclude


class _Tries:
    """A request's attempts so far: whether another may be made (retries, budget), and why not."""

    __slots__ = ("retries", "holds_retry", "last_failure", "fell_back")

    def __init__(self):
        self.retries = 0
        self.holds_retry = False  # the next attempt counts against the model's retry budget
        self.last_failure = ""
        self.fell_back = False

    def next(self, route: ModelRoute, e: NotRun, past_deadline: bool, max_retries: int) -> None:
        """After an attempt that did not run: allow the next one, or raise Refused."""
        reason = str(e)
        self.last_failure = reason
        if self.holds_retry:
            route.end_retry()
            self.holds_retry = False
        if self.retries >= max_retries or past_deadline:
            raise Refused(UNAVAILABLE, reason)
        if e.rescued:
            # Outside the concurrent-retry budget, which exists so that retries do not multiply
            # the load on struggling servers: a rescue moves work off a server that does none
            # (it stopped answering), and is bounded by what that server held (max concurrency).
            route.retries_total += 1
        elif not route.try_start_retry():
            raise Refused(UNAVAILABLE, f"{reason} (retry budget exhausted)")
        else:
            self.holds_retry = True
        self.retries += 1

    def fallback(self, balancer: Balancer, route: ModelRoute, e: NoEndpoints) -> ModelRoute:
        """The other variant, when this one went away while the request waited (a canary rolled
        back) and nothing was tried yet; else Refused."""
        other = None if (self.last_failure or self.fell_back) else traffic.fallback(balancer, route)
        if other is None:
            raise Refused(UNAVAILABLE, self.why(route, e)) from None
        self.fell_back = True
        return other

    def why(self, route: ModelRoute, e: Exception) -> str:
        if self.last_failure:
            return f"cannot reach model '{route.name}': {self.last_failure}; {e}"
        return str(e)


_NO_TRIES = _Tries()  # shared, never changed: a request that has not failed yet

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
    """The loop both transports forward through, over the one balancer and metrics."""

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
        call = _Call(self, transport, request, route, deadline)
        code = transport.cancelled_code
        try:
            answer = await call.run()
            code = transport.code(answer)
            return answer
        except Refused as e:
            code = transport.refused_code(e.kind)
            raise
        finally:
            self.metrics.count_variant(model, call.route.variant, code)


def _without_grpc(route: ModelRoute) -> frozenset[str]:
    return frozenset(e.address for e in route.endpoints if e.grpc_port is None)


class _Call:
    """One request's way through the loop: its route, deadline, exclusions and retries."""

    __slots__ = ("fwd", "transport", "request", "route", "deadline", "exclude", "retries", "holds_retry",
                 "last_failure", "fell_back")

    def __init__(self, fwd: Forwarder, transport: Transport, request: Any, route: ModelRoute, deadline: float):
        self.fwd, self.transport, self.request, self.deadline = fwd, transport, request, deadline
        self.route = route
        self.exclude = _EMPTY
        self.retries = 0
        self.holds_retry = False  # this attempt counts against the model's retry budget
        self.last_failure = ""
        self.fell_back = False

    def _exclude_rest_only(self) -> None:
        route = self.route
        self.exclude = _without_grpc(route)
        if route.endpoints and len(self.exclude) == len(route.endpoints):
            raise Refused(NOT_SERVED, f"model '{route.name}' is not served over gRPC: its servers expose no gRPC "
                                      "port (spec.runtime.grpc.enabled is false?)")

    async def run(self) -> Any:
        if self.transport.needs_grpc:
            self._exclude_rest_only()
        self.route.active += 1
        try:
            while True:
                ep = await self._acquire()
                if ep is None:
                    continue
                try:
                    return await self._attempt(ep)
                except NotRun as e:
                    self._after_not_run(ep, e)
        finally:
            self.route.active -= 1
            if self.holds_retry:
                self.route.end_retry()

    async def _acquire(self) -> Endpoint | None:
        """A slot for the next attempt; None to go round again (fell back, or an endpoint to skip)."""
        route = self.route
        try:
            ep = await route.acquire(self.deadline, self.exclude)
        except NoEndpoints as e:
            if not (self.last_failure or self.fell_back):
                other = traffic.fallback(self.fwd.balancer, route)
                if other is not None:  # its variant went away while it waited: the other takes it
                    self._switch(other)
                    return None
            raise Refused(UNAVAILABLE, self._why(e)) from None
        except Overloaded as e:
            raise Refused(UNAVAILABLE, self._why(e)) from None
        except DeadlinePassed as e:
            raise Refused(DEADLINE, str(e)) from None
        if asyncio.get_running_loop().time() >= self.deadline:
            route.release(ep, None)
            raise Refused(DEADLINE, f"request deadline passed before it could be forwarded to model '{route.name}'")
        if self.transport.needs_grpc and ep.grpc_port is None:  # discovery changed it while the call waited
            route.release(ep, None)
            self.exclude = self.exclude | {ep.address}
            return None
        return ep

    def _switch(self, other: ModelRoute) -> None:
        self.fell_back = True
        self.route.active -= 1
        self.route = other
        other.active += 1
        self.exclude = _EMPTY
        if self.transport.needs_grpc:
            self._exclude_rest_only()

    async def _attempt(self, ep: Endpoint) -> Any:
        route = self.route
        t0 = time.perf_counter()
        try:
            answer = await self.transport.send(route, ep, self.request, self.deadline)
        except NotRun as e:
            if e.unreachable:
                route.unreachable(ep)
            route.release(ep, e.failed)
            raise
        except Refused:
            route.release(ep, True)
            raise
        except BaseException:
            route.release(ep, None)
            raise
        self.fwd.metrics.observe_upstream(route.name, time.perf_counter() - t0)
        route.release(ep, self.transport.failed(answer))
        return answer

    def _after_not_run(self, ep: Endpoint, e: NotRun) -> None:
        """Prepare the next attempt on another endpoint, or raise Refused when none may be made."""
        route = self.route
        reason = str(e)
        self.last_failure = reason
        self.exclude = self.exclude | {ep.address}
        if self.holds_retry:
            route.end_retry()
            self.holds_retry = False
        if self.retries >= self.fwd.settings.max_retries or asyncio.get_running_loop().time() >= self.deadline:
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

    def _why(self, e: Exception) -> str:
        if self.last_failure:
            return f"cannot reach model '{self.route.name}': {self.last_failure}; {e}"
        return str(e)

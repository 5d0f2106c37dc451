"""Which endpoint serves a request: least outstanding requests, a per-model wait queue, ejection.

- Pick: Envoy's "least request" with two choices: of the endpoints that are not ejected and are
  below the per-endpoint concurrency limit, sample two at random and take the one with fewer
  active requests. If every ready endpoint is ejected, ejection is ignored (Envoy's panic mode):
  a model is never made unreachable by ejection alone.
- Wait: when every endpoint is at its limit, the request waits in a bounded FIFO queue for the
  first free slot, at most `max_wait_s` and never past its own deadline.
- Eject: `eject_after` consecutive failures (connect failures, timeouts, 5xx other than 503)
  eject an endpoint for `eject_base_s` × the number of times it was ejected (capped), as Envoy's
  outlier detection does. A 503 is the server saying "busy" and does not count.
- Connection refused: an endpoint that could not be reached is also skipped for
  `connect_backoff_s` (as nginx's `max_fails=1 fail_timeout` does), so that a crashed server does not
  attract the requests that least-request would otherwise send to an idle-looking endpoint.
- Retry budget: concurrent retries per model stay below max(min, percent × active requests),
  active meaning every request of the model the gateway is handling (Envoy's retry budget).
- Hold (scale to zero): a model with a cold-start time (`cold_start_s`) and no ready endpoint
  keeps its requests in the wait queue, up to that long, until an endpoint appears; they count as
  queued (the demand that wakes the model) and the queue limit applies. Past it: 503 + Retry-After.
- Variants (canary): a model may have a second route, its canary, with a share of the requests;
  traffic.py chooses between them per request.
- Rescue: an endpoint that leaves the ready set without draining (its readiness probe failed:
  hung) has the requests waiting on it failed with EndpointLost, which the proxy sends to another
  endpoint within the request's deadline and its retry count. A rescue is outside the concurrent
  retry budget, which keeps retries from multiplying the load on struggling servers: a rescue
  moves work off a server that does none, bounded by what it held (`max_concurrency`). A draining
  endpoint (a terminating pod, a local replica answering "shutting down") finishes its own.

An endpoint is one server (one pod): its REST port and, when it serves gRPC, its gRPC port. REST
and gRPC requests share its slots, failure count and ejection, as they share the server.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING

from caffe_http.upstream import EndpointPool

if TYPE_CHECKING:
    from caffe_http.tls import ClientTLS

    from .grpc_proxy import Upstream
    from .grpc_upstream import H2Upstream


@dataclass
class BalancerSettings:
    max_concurrency: int = 16  # per endpoint
    max_queue: int = 256  # waiting requests per model
    max_wait_s: float = 10.0
    eject_after: int = 5  # consecutive failures
    eject_base_s: float = 30.0
    eject_max_s: float = 300.0
    retry_budget_percent: float = 20.0
    retry_budget_min: int = 3
    connect_timeout_s: float = 2.0
    connect_backoff_s: float = 1.0
    upstream_tls: ClientTLS | None = None  # TLS to the servers (--upstream-ca), REST and gRPC; None: plain text


# A server as discovery reports it: (host, REST port) or (host, REST port, gRPC port or None).
Address = tuple[str, int] | tuple[str, int, int | None]


class Endpoint:
    """One ready server of one model."""

    __slots__ = ("address", "pool", "grpc_port", "grpc", "active", "failures", "ejected_until", "ejections",
                 "removed")

    def __init__(self, host: str, port: int, connect_timeout_s: float, grpc_port: int | None = None,
                 tls: ClientTLS | None = None):
        self.pool = EndpointPool(host, port, connect_timeout_s, tls=tls)
        self.address = self.pool.authority
        self.grpc_port = grpc_port
        self.grpc: H2Upstream | Upstream | None = None  # the gRPC proxy's connection to it, made on first use
        self.active = 0
        self.failures = 0  # consecutive
        self.ejected_until = 0.0
        self.ejections = 0
        self.removed = False

    def set_grpc_port(self, grpc_port: int | None) -> None:
        if grpc_port != self.grpc_port:
            self.grpc_port = grpc_port
            self._close_grpc()

    def _close_grpc(self) -> None:
        upstream, self.grpc = self.grpc, None
        if upstream is not None:
            upstream.close()

    def abort(self, reason: str) -> int:
        """Take back every request in flight here, REST and gRPC (the server stopped answering):
        each fails with EndpointLost (forward.Lost) and is sent elsewhere. Returns how many."""
        taken = self.pool.abort(reason)
        if self.grpc is not None:
            taken += self.grpc.abort(reason)
        return taken

    def close(self) -> None:
        """Close its idle connections (REST) and its gRPC channel."""
        self.pool.close()
        self._close_grpc()

    def __repr__(self):
        return f"Endpoint({self.address}, active={self.active})"


class Overloaded(Exception):
    """No slot could be had: the queue is full or the wait ran out (503 + Retry-After)."""


class NoEndpoints(Exception):
    """The model has no ready endpoint at all (503 + Retry-After)."""


class ColdStartTimeout(NoEndpoints):
    """A request held for a model scaled to zero waited its whole cold-start time (503 + Retry-After)."""


class DeadlinePassed(Exception):
    """The request's own deadline passed while it waited (504); it was not forwarded."""


class _WaitEnded(Exception):
    """A waiter's time ran out (its future's exception, set by `_end_wait`)."""


def _end_wait(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(_WaitEnded())


class _Waiter:
    __slots__ = ("future", "exclude")

    def __init__(self, future: asyncio.Future, exclude: frozenset[str]):
        self.future = future
        self.exclude = exclude


class ModelRoute:
    """The endpoints of one model and the requests waiting for them."""

    def __init__(self, name: str, settings: BalancerSettings, variant: str = "primary"):
        self.name = name
        self.variant = variant
        self.version: str | None = None  # the model version its servers serve, when known
        self.percent: float = 100.0  # its share of the model's requests (a canary's is set)
        self.credit = 0.0  # the weighted split's running credit (traffic.py)
        self.settings = settings
        self.endpoints: list[Endpoint] = []
        self.waiters: deque[_Waiter] = deque()
        self.queued = 0
        self.in_flight = 0  # holding an endpoint slot
        self.active = 0  # being handled by the gateway (waiting, in flight or between attempts)
        self.retries_active = 0
        self.ejections_total = 0
        self.retries_total = 0
        # Scale to zero: while the model has no ready endpoint, a request waits (in the queue, so
        # queue limits apply and it counts as demand) up to this long for one; 0: answered 503 at once.
        self.cold_start_s = 0.0
        self.held_total = 0  # requests that arrived while there was no ready endpoint, and waited
        self.rescued_total = 0  # requests taken back from an endpoint that stopped answering
        self._rearm: asyncio.TimerHandle | None = None
        self._rng = random.Random()

    # --- endpoint set (from discovery)
    def set_endpoints(self, addresses: AbstractSet[Address], draining: AbstractSet[Address] = frozenset()) -> None:
        """Replace the ready endpoints.

        A removed endpoint that is `draining` (shutting down, still answering: a terminating pod)
        finishes the requests in flight on it. One that is not (its readiness probe failed: hung,
        or gone) has them taken back: they fail with EndpointLost, which the proxy retries on a
        healthy endpoint within the request's deadline.
        """
        keep: list[Endpoint] = []
        current = {(e.pool.host, e.pool.port): e for e in self.endpoints}
        wanted: dict[tuple[str, int], int | None] = {}
        for address in addresses:  # one endpoint per (host, REST port); a gRPC port wins over none
            key = (address[0], address[1])
            wanted[key] = wanted.get(key) or (address[2] if len(address) > 2 else None)
        for (host, port), grpc_port in sorted(wanted.items()):
            ep = current.pop((host, port), None)
            if ep is None:
                ep = Endpoint(host, port, self.settings.connect_timeout_s, grpc_port, self.settings.upstream_tls)
            else:
                ep.set_grpc_port(grpc_port)
            keep.append(ep)
        self.endpoints = keep
        draining_keys = {(a[0], a[1]) for a in draining}
        for key, ep in current.items():
            ep.removed = True
            if ep.active == 0:
                ep.close()
            elif key not in draining_keys:
                self.rescued_total += ep.abort(f"{ep.address} stopped answering its readiness probe")
        self._dispatch()

    def ready_count(self) -> int:
        return len(self.endpoints)

    def concurrency(self) -> int:
        """In-flight plus queued (held ones included): the load an autoscaler scales on."""
        return self.in_flight + self.queued

    def ejected_count(self, now: float) -> int:
        return sum(1 for e in self.endpoints if e.ejected_until > now)

    # --- picking
    def _pick(self, now: float, exclude: frozenset[str]) -> Endpoint | None:
        limit = self.settings.max_concurrency
        healthy = [e for e in self.endpoints
                   if e.active < limit and e.ejected_until <= now and e.address not in exclude]
        if not healthy:
            if any(e.ejected_until <= now for e in self.endpoints):
                return None  # some are healthy, just busy (or excluded): wait for them
            healthy = [e for e in self.endpoints if e.active < limit and e.address not in exclude]  # panic
            if not healthy:
                return None
        if len(healthy) == 1:
            return healthy[0]
        a, b = self._rng.sample(healthy, 2)
        return a if a.active <= b.active else b

    async def acquire(self, deadline: float, exclude: frozenset[str] = frozenset()) -> Endpoint:
        """A slot on an endpoint, now or after waiting; raises NoEndpoints/Overloaded/DeadlinePassed."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        holding = not self.endpoints
        if holding and self.cold_start_s <= 0:
            raise NoEndpoints(f"model '{self.name}' has no ready endpoint")
        waiters = self.waiters
        while waiters and waiters[0].future.done():
            waiters.popleft()
        if not waiters or exclude:
            ep = self._pick(now, exclude)
            if ep is not None:
                ep.active += 1
                self.in_flight += 1
                return ep
        if exclude and not holding and all(e.address in exclude for e in self.endpoints):
            raise NoEndpoints("no other endpoint to try")
        if self.queued >= self.settings.max_queue:
            raise Overloaded(f"model '{self.name}' is overloaded: {self.queued} requests already waiting")
        if holding:
            self.held_total += 1
        wait_s = self.cold_start_s if holding else self.settings.max_wait_s
        wait_until = min(now + wait_s, deadline)
        fut = loop.create_future()
        waiters.append(_Waiter(fut, exclude))
        self.queued += 1
        self._dispatch()
        # a timer on the waiter's future, not asyncio.timeout_at: the gateway's HTTP server starts a request
        # in its parser's callback (caffe_http/eager.py), where there is no current task until the first wait
        timer = loop.call_at(wait_until, _end_wait, fut)
        try:
            return await fut
        except (_WaitEnded, asyncio.CancelledError) as e:
            got = fut.done() and not fut.cancelled() and fut.exception() is None
            if got:  # cancelled after its slot came: give the slot back
                self.release(fut.result(), None)
            if isinstance(e, asyncio.CancelledError):
                raise
            # the deadline ended the wait when it came before max_wait (the timer may fire a hair
            # before loop.time() reaches it: asyncio runs timers within its clock resolution)
            if loop.time() >= deadline or wait_until >= deadline:
                raise DeadlinePassed(f"request deadline passed while waiting for model '{self.name}'") from None
            if holding and not self.endpoints:
                raise ColdStartTimeout(f"model '{self.name}' has no ready endpoint: none became ready within "
                                       f"{self.cold_start_s:g} s (cold start)") from None
            raise Overloaded(f"model '{self.name}' is overloaded: no endpoint free within "
                             f"{self.settings.max_wait_s:g} s") from None
        finally:
            timer.cancel()
            self.queued -= 1
            if not fut.done():
                fut.cancel()
            if len(waiters) > 2 * self.settings.max_queue:
                self.waiters = deque(w for w in waiters if not w.future.done())

    def _dispatch(self) -> None:
        """Hand free slots to waiters, oldest first."""
        waiters = self.waiters
        if not waiters:
            return
        now = asyncio.get_running_loop().time()
        passed_over: list[_Waiter] = []  # retries waiting for an endpoint they did not exclude
        while waiters:
            w = waiters[0]
            if w.future.done():
                waiters.popleft()
                continue
            ep = self._pick(now, w.exclude)
            if ep is None:
                if not w.exclude:
                    break  # nothing is free for anyone
                passed_over.append(waiters.popleft())  # a later waiter may take what it excludes
                continue
            waiters.popleft()
            ep.active += 1
            self.in_flight += 1
            w.future.set_result(ep)
        waiters.extendleft(reversed(passed_over))
        if waiters:
            self._arm_for_ejection_expiry(now)

    def _arm_for_ejection_expiry(self, now: float) -> None:
        """Waiters blocked only by ejections are retried when the first ejection ends."""
        ends = [e.ejected_until for e in self.endpoints if e.ejected_until > now]
        if not ends or self._rearm is not None:
            return
        loop = asyncio.get_running_loop()

        def fire():
            self._rearm = None
            self._dispatch()

        self._rearm = loop.call_at(min(ends), fire)

    # --- outcomes
    def release(self, ep: Endpoint, failed: bool | None) -> None:
        """Give a slot back. `failed`: True/False feeds outlier detection; None says nothing."""
        ep.active -= 1
        self.in_flight -= 1
        if failed:
            ep.failures += 1
            if ep.failures >= self.settings.eject_after and not ep.removed:
                ep.failures = 0
                ep.ejections += 1
                self.ejections_total += 1
                loop = asyncio.get_running_loop()
                ep.ejected_until = loop.time() + min(self.settings.eject_base_s * ep.ejections,
                                                     self.settings.eject_max_s)
        elif failed is False:
            ep.failures = 0
        if ep.removed and ep.active == 0:
            ep.close()
        if self.waiters:
            self._dispatch()

    def unreachable(self, ep: Endpoint) -> None:
        """A connection to `ep` failed: skip it for a moment (not counted as an ejection)."""
        until = asyncio.get_running_loop().time() + self.settings.connect_backoff_s
        ep.ejected_until = max(ep.ejected_until, until)

    def try_start_retry(self) -> bool:
        """Whether one more retry fits the budget; the caller must call `end_retry` after it."""
        budget = max(self.settings.retry_budget_min, self.active * self.settings.retry_budget_percent / 100.0)
        if self.retries_active >= budget:
            return False
        self.retries_active += 1
        self.retries_total += 1
        return True

    def end_retry(self) -> None:
        self.retries_active -= 1

    def close_waiters(self) -> None:
        """Answer every waiting request now (503): the hold was turned off while none had come."""
        for w in self.waiters:
            if not w.future.done():
                w.future.set_exception(NoEndpoints(f"model '{self.name}' has no ready endpoint"))
        self.waiters.clear()

    def close(self) -> None:
        if self._rearm is not None:
            self._rearm.cancel()
        for ep in self.endpoints:
            ep.removed = True
            if ep.active == 0:  # one in use closes when its last request ends (release): those finish
                ep.close()
        for w in self.waiters:
            if not w.future.done():
                w.future.set_exception(NoEndpoints(f"model '{self.name}' was removed"))
        self.waiters.clear()


class Balancer:
    """All models the gateway knows, by name."""

    def __init__(self, settings: BalancerSettings | None = None):
        self.settings = settings or BalancerSettings()
        self.models: dict[str, ModelRoute] = {}
        self.canaries: dict[str, ModelRoute] = {}  # model -> its canary variant, when it has one

    def set_model(self, name: str, addresses: AbstractSet[Address],
                  draining: AbstractSet[Address] = frozenset()) -> None:
        route = self.models.get(name)
        if route is None:
            route = self.models[name] = ModelRoute(name, self.settings)
        route.set_endpoints(addresses, draining)

    def remove_model(self, name: str) -> None:
        route = self.models.pop(name, None)
        if route is not None:
            route.close()
        self.set_canary(name, None)

    def configure(self, name: str, *, version: str | None = None, cold_start_s: float = 0.0) -> None:
        """A known model's primary variant: its version (for pinning) and cold-start hold."""
        route = self.models.get(name)
        if route is not None:
            route.version = version
            route.cold_start_s = cold_start_s
            if not cold_start_s and not route.endpoints:
                route.close_waiters()

    def set_canary(self, name: str, addresses: AbstractSet[Address] | None, percent: float = 0.0,
                   version: str | None = None, cold_start_s: float = 0.0) -> None:
        """Give model `name` a canary variant with `percent` of its requests, or (None) remove it:
        requests in flight on it finish there."""
        route = self.canaries.get(name)
        if addresses is None:
            if route is not None:
                del self.canaries[name]
                route.close()
            return
        if route is None:
            route = self.canaries[name] = ModelRoute(name, self.settings, variant="canary")
        route.percent = max(0.0, min(100.0, percent))
        route.version = version
        route.cold_start_s = cold_start_s
        route.set_endpoints(addresses)

    def replace_all(self, models: dict[str, set[Address]],
                    draining: dict[str, set[Address]] | None = None) -> None:
        for name in list(self.models):
            if name not in models:
                self.remove_model(name)
        for name, addresses in models.items():
            self.set_model(name, addresses, (draining or {}).get(name, frozenset()))

    def close(self) -> None:
        for name in list(self.models):
            self.remove_model(name)
        for name in list(self.canaries):
            self.set_canary(name, None)

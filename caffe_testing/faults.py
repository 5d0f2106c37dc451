"""API faults in front of a real API server: a TLS proxy that the operator's and the gateway's
kubeconfigs point at.

    with FaultProxy(cp) as proxy:                         # cp: controlplane.ControlPlane, started
        kubeconfig = proxy.kubeconfig(path, token)        # the client authenticates with its own token
        proxy.fail(seconds=60, rate=0.3)                  # 429 + Retry-After / 500, Status bodies
        proxy.cut_watches()                               # abort every open watch (TCP level)
        with proxy.holding_watches(): ...                 # cut them and keep new ones waiting

Everything is forwarded byte for byte (the Authorization header included, so the API server
authenticates and authorizes the client itself: RBAC applies), and streamed, so watches stay watches.
Every request is recorded (`seen`: when, who by User-Agent, verb, path, the status the client got,
and whether the API server itself answered a watch with 410 Gone), so that a test counts requests
(a hot loop shows as a rate). When the API server is down (a restart), the proxy closes the
client's connection without an answer, as a refused connection looks to a client.
Only bearer-token clients can pass through (a client certificate ends at the proxy's TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import aiohttp.web
import yaml

from caffe_testing.servers import free_port

T = TypeVar("T")
HOP = {"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
       "content-length"}
GONE = re.compile(rb'"type"\s*:\s*"ERROR".*"code"\s*:\s*410')


@dataclass
class Seen:
    at: float  # time.monotonic() when it arrived
    agent: str  # User-Agent
    method: str
    path: str
    query: str
    watch: bool
    status: int | None = None  # what the client got (None: connection closed, no answer)
    injected: bool = False  # the proxy answered, not the API server
    gone: bool = False  # the API server answered this watch with 410 (status or ERROR event)


class FaultProxy:
    """A TLS reverse proxy on 127.0.0.1 to `cp.server`, with a serving certificate from `cp.ca`."""

    def __init__(
        self, cp: Any, agents: tuple[str, ...] = ("kopf", "caffe-serving-operator", "caffeserve-gateway")
    ) -> None:
        """agents: the User-Agent prefixes that faults apply to (others pass untouched)."""
        self.cp = cp
        self.agents = agents
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.seen: list[Seen] = []
        self.fault_until = 0.0
        self.fault_rate = 0.0
        self._rng = random.Random(23)
        self._refusals: list[list] = []  # [method, path part, answers left, status]: refuse_next's rules
        self._open_watches: list[tuple[Seen, aiohttp.web.Request]] = []
        self._watch_gate: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: aiohttp.web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        crt, key = self.cp.ca.issue("fault-proxy", "fault-proxy", server=True, hosts=["127.0.0.1", "localhost"])
        serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        serving.load_cert_chain(str(crt), str(key))
        upstream = ssl.create_default_context(cafile=str(self.cp.ca.cert_path))
        ready = threading.Event()

        async def serve() -> None:
            self._watch_gate = asyncio.Event()
            self._watch_gate.set()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=upstream, limit=0),
                timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=None), auto_decompress=False)
            app = aiohttp.web.Application(client_max_size=64 * 2**20)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = aiohttp.web.AppRunner(app, access_log=None, handler_cancellation=True)
            await self._runner.setup()
            await aiohttp.web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=serving).start()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(serve())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(15):
            raise RuntimeError("the fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def down() -> None:
            await self._runner.cleanup()
            await self._session.close()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(down(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self, path: Path, token: str, namespace: str = "default") -> Path:
        """A kubeconfig for a client that reaches the API server through this proxy with `token`."""
        doc = self.cp.kubeconfig_dict({"token": token}, namespace, name="proxied")
        doc["clusters"][0]["cluster"]["server"] = self.url
        path.write_text(yaml.safe_dump(doc))
        return path

    def in_loop(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()
        assert self._loop is not None, "the proxy is not started"
        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(15)

    # -- faults --------------------------------------------------------------------------------
    def fail(self, seconds: float, rate: float = 0.3) -> None:
        """For `seconds`, a `rate` share of the clients' requests fail before they reach the API
        server: half 429 with Retry-After: 1, half 500, each with a Kubernetes Status body."""
        def set_() -> None:
            self.fault_until, self.fault_rate = time.monotonic() + seconds, rate
        self.in_loop(set_)

    def refuse_next(self, method: str, path_contains: str, times: int, status: int = 500) -> None:
        """The next `times` requests of the clients with `method` to a path containing `path_contains`
        are answered `status` (a Kubernetes Status body) before they reach the API server."""
        self.in_loop(lambda: self._refusals.append([method, path_contains, times, status]))

    def refused_left(self) -> int:
        """How many refusals asked by refuse_next have not been answered yet."""
        return self.in_loop(lambda: sum(rule[2] for rule in self._refusals))

    def _refusal(self, seen: Seen) -> int | None:
        for rule in self._refusals:
            method, part, left, status = rule
            if left > 0 and seen.method == method and part in seen.path:
                rule[2] -= 1
                return status
        return None

    def cut_watches(self, path_contains: str = "") -> list[str]:
        """Abort the open watches (of paths containing `path_contains`) at the TCP level; their paths."""
        def cut() -> list[str]:
            out = []
            for seen, request in self._open_watches:
                if path_contains in seen.path and request.transport is not None and not request.transport.is_closing():
                    request.transport.abort()
                    out.append(seen.path)
            return out
        return self.in_loop(cut)

    @contextlib.contextmanager
    def holding_watches(self) -> Iterator[list[str]]:
        """Cut every open watch and keep new watch requests waiting (the clients know nothing new)
        until the block ends; then they go on to the API server with the resourceVersion they had."""
        self.in_loop(lambda: self._watch_gate.clear())
        cut = self.cut_watches()
        try:
            yield cut
        finally:
            self.in_loop(lambda: self._watch_gate.set())

    # -- what tests count ----------------------------------------------------------------------
    def requests(self, since: float = 0.0, agent: str = "") -> list[Seen]:
        return self.in_loop(lambda: [s for s in self.seen if s.at >= since and s.agent.startswith(agent)])

    # -- the proxy -----------------------------------------------------------------------------
    async def _handle(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        agent = request.headers.get("User-Agent", "")
        watch = request.query.get("watch") in ("true", "1")
        seen = Seen(time.monotonic(), agent, request.method, request.path, request.query_string, watch)
        self.seen.append(seen)
        ours = agent.startswith(self.agents)
        refused = self._refusal(seen) if ours else None
        if refused is None and ours and seen.at < self.fault_until and self._rng.random() < self.fault_rate:
            refused = 429 if self._rng.random() < 0.5 else 500
        if refused is not None:
            seen.status, seen.injected = refused, True
            reason = "TooManyRequests" if seen.status == 429 else "InternalError"
            return aiohttp.web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": seen.status,
                 "message": f"injected fault: {reason}"}, status=seen.status,
                headers={"Retry-After": "1"} if seen.status == 429 else {})
        if watch and ours:
            await self._watch_gate.wait()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        body = await request.read() if request.body_exists else None
        try:
            upstream = await self._session.request(request.method, self.cp.server + request.rel_url.raw_path_qs,
                                                   headers=headers, data=body, allow_redirects=False)
        except (aiohttp.ClientError, OSError):  # the API server is down: no answer, as a refused connection
            if request.transport is not None:
                request.transport.abort()
            raise aiohttp.web.HTTPServiceUnavailable() from None
        async with upstream:
            seen.status = upstream.status
            seen.gone = watch and upstream.status == 410
            response = aiohttp.web.StreamResponse(status=upstream.status, reason=upstream.reason, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP})
            entry = (seen, request)
            if watch:  # open until its response ends (its connection may live on, kept alive)
                self._open_watches.append(entry)
            try:
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    if watch and not seen.gone and GONE.search(chunk):
                        seen.gone = True
                    await response.write(chunk)
                await response.write_eof()
            except (TimeoutError, aiohttp.ClientError, OSError):  # either side went away mid-stream
                if request.transport is not None:
                    request.transport.abort()
            finally:
                self._open_watches = [e for e in self._open_watches if e is not entry]
            return response

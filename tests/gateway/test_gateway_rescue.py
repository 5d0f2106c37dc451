"""The gateway sends a request that did not run to another replica: a 503 that says so (shutting
down, loading) and a request left waiting on a replica whose readiness probe then failed (hung).

The upstreams here are our HTTPServer with handlers that hang or answer those 503s on cue: the
real server's hang (SIGSTOP) and drain are tested end to end in tests/local and tests/server; this
file pins the gateway's side of the contract, with the balancer's endpoint updates made directly
(as discovery makes them).
"""

from __future__ import annotations

import asyncio

import orjson

from caffe_gateway.app import GatewayApp
from caffe_gateway.balancer import BalancerSettings
from caffe_gateway.discovery import StaticDiscovery
from caffe_gateway.proxy import ProxySettings
from caffe_http.server import NOT_RUN_HEADER, HTTPServer, Response
from caffe_http.upstream import EndpointPool


class Upstream:
    """A fake replica: answers {"who": name}, or hangs, or answers a 503, as told."""

    def __init__(self, name: str):
        self.name, self.mode, self.hits = name, "ok", 0
        self.release = asyncio.Event()
        self.server = HTTPServer(self.handle)
        self.port = 0

    async def handle(self, req):
        self.hits += 1
        if self.mode == "hang":
            await self.release.wait()
        if self.mode == "not-run":
            return Response(503, b'{"error":"model is loading"}', headers={"Retry-After": "2", NOT_RUN_HEADER: "true"})
        if self.mode == "shutting-down":  # what servers before the header answered while draining
            return Response(503, b'{"error":"the server is shutting down"}', headers={"Retry-After": "1"})
        if self.mode == "busy":
            return Response(503, b'{"error":"queue full"}', headers={"Retry-After": "1"})
        return Response(200, orjson.dumps({"who": self.name}))

    async def start(self):
        self.port = await self.server.start("127.0.0.1", 0)
        return self

    @property
    def address(self):
        return ("127.0.0.1", self.port)


async def _setup(n: int = 2, **proxy):
    ups = [await Upstream(chr(ord("A") + i)).start() for i in range(n)]
    app = GatewayApp(StaticDiscovery({"m": {u.address for u in ups}}),
                     BalancerSettings(max_concurrency=64), ProxySettings(request_timeout_s=20, **proxy))
    port = await app.start("127.0.0.1", 0)
    await app.discovery.synced.wait()
    return ups, app, port


async def _ask(port: int, timeout: float = 30):
    pool = EndpointPool("127.0.0.1", port)
    try:
        loop = asyncio.get_running_loop()
        r = await pool.request("POST", "/v2/models/m/infer", [("content-type", "application/json")], b"{}",
                               loop.time() + timeout)
        return r.status, orjson.loads(r.body), dict(r.headers)
    finally:
        pool.close()


async def _teardown(ups, app):
    for u in ups:
        u.release.set()
    await app.stop(1)
    for u in ups:
        await u.server.stop(1)


def test_requests_waiting_on_a_replica_that_stops_answering_are_sent_to_a_healthy_one():
    async def run():
        ups, app, port = await _setup()
        a, b = ups
        a.mode = "hang"
        try:
            loop = asyncio.get_running_loop()
            tasks = [asyncio.create_task(_ask(port)) for _ in range(8)]
            while a.hits < 2:  # some are now stuck on A (least-request spreads them)
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            stuck = a.hits
            started = loop.time()
            app.balancer.set_model("m", {b.address})  # A's readiness probe failed: not ready, not draining
            results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
            assert loop.time() - started < 5  # rescued, not left to the 20 s deadline
            assert [r[0] for r in results] == [200] * 8, results
            assert all(r[1] == {"who": "B"} for r in results)
            assert app.balancer.models["m"].rescued_total == stuck
        finally:
            await _teardown(ups, app)

    asyncio.run(run())


def test_requests_on_a_draining_replica_are_left_to_finish_there():
    async def run():
        ups, app, port = await _setup()
        a, b = ups
        a.mode = "hang"
        try:
            tasks = [asyncio.create_task(_ask(port)) for _ in range(6)]
            while a.hits < 1:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            app.balancer.set_model("m", {b.address}, draining={a.address})  # terminating: it drains
            await asyncio.sleep(0.5)
            assert sum(t.done() for t in tasks) == 6 - a.hits  # A's are still waiting for A
            a.release.set()  # A finishes them
            results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
            assert [r[0] for r in results] == [200] * 6
            assert sum(r[1] == {"who": "A"} for r in results) == a.hits
            assert app.balancer.models["m"].rescued_total == 0
        finally:
            await _teardown(ups, app)

    asyncio.run(run())


def test_a_503_that_says_the_request_did_not_run_is_retried_on_another_replica():
    async def run():
        ups, app, port = await _setup()
        a, b = ups
        try:
            for mode in ("not-run", "shutting-down"):
                a.mode = mode
                hits = a.hits
                results = [await _ask(port) for _ in range(10)]
                assert [r[0] for r in results] == [200] * 10, (mode, results)
                assert all(r[1] == {"who": "B"} for r in results)
                assert a.hits > hits  # A was tried, and answered that it did not run them
                # many at once: retried within the retry budget (20% of active, at least 3)
                results = await asyncio.gather(*(_ask(port) for _ in range(10)))
                for status, body, headers in results:
                    assert status == 200 or ("retry budget" in body["error"] and "retry-after" in headers), body
            # a plain 503 (the server is busy: it answered for itself) passes through unchanged
            a.mode = b.mode = "busy"
            status, body, headers = await _ask(port)
            assert status == 503 and body == {"error": "queue full"} and headers["retry-after"] == "1"
            # every replica refusing to run it: 503 + Retry-After with the reason, not a hang
            a.mode = b.mode = "not-run"
            status, body, headers = await _ask(port)
            assert status == 503 and "did not run" in body["error"] and "retry-after" in headers
        finally:
            await _teardown(ups, app)

    asyncio.run(run())

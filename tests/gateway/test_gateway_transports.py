"""The gateway's traffic and reliability rules, each case run over REST and over gRPC from one table.

A client must see the same behaviour whichever transport it speaks (and, over gRPC, whichever
transport the gateway runs it on: our HTTP/2 framing, or grpc.aio with CAFFESERVE_GRPC_TRANSPORT=grpcio):
the canary split, a pinned version, the hold while a model is scaled to zero, the fallback when its
variant goes away, the rescue from a hung replica, the retry of a request a replica did not run, the
deadline and the queue limit. Each case below is written once against `Client` (REST or gRPC) and runs over both.

The gateway is the real GatewayApp (what `caffeserve gateway` runs) on loopback, REST and gRPC, in
this process, so a case can change its endpoints at a chosen moment as discovery would. The
replicas are our HTTPServer and a grpc.aio server that answer, hang or refuse on cue and say who
answered: a test double, because each case needs a replica to hang, refuse to run a request or
stay busy at a chosen moment. The real server's own hang (SIGSTOP), drain and loading are tested
end to end in tests/local and tests/server; its gRPC refusals are built here with its own
`error_status`, so the double answers what the server answers.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import orjson
import pytest

from caffe_gateway.app import GatewayApp
from caffe_gateway.balancer import BalancerSettings
from caffe_gateway.discovery import StaticDiscovery
from caffe_gateway.proxy import ProxySettings
from caffe_http.server import HTTPServer, Response
from caffe_http.upstream import EndpointPool
from inference_server.errors import InferenceError, Unavailable
from inference_server.grpc import messages as pb
from inference_server.grpc.status import error_status

# REST codes as the gRPC status a client of the other transport sees for the same answer.
AS_GRPC = {200: "OK", 404: "NOT_FOUND", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


# --------------------------------------------------------------------------- replicas


class Replica:
    """One model server, REST and gRPC: answers who it is, or hangs, or refuses, as `mode` says."""

    def __init__(self, name: str, version: str = "1"):
        self.name, self.version, self.mode, self.hits = name, version, "ok", 0
        self.release = asyncio.Event()
        self.http = HTTPServer(self._rest)
        self.grpc = grpc.aio.server()
        self.grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            pb.SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(self._grpc)}),))
        self.address: tuple[str, int, int] = ("127.0.0.1", 0, 0)

    async def start(self) -> Replica:
        rest = await self.http.start("127.0.0.1", 0)
        port = self.grpc.add_insecure_port("127.0.0.1:0")
        await self.grpc.start()
        self.address = ("127.0.0.1", rest, port)
        return self

    async def stop(self) -> None:
        self.release.set()
        await self.http.stop(1)
        await self.grpc.stop(0)

    async def _behave(self) -> InferenceError | None:
        """The refusal this replica answers with now (the server's own errors), or None to answer."""
        self.hits += 1
        if self.mode == "hang":
            await self.release.wait()
        if self.mode == "not-run":  # loading: the server says it did not start the request
            return Unavailable("model 'm' is loading", retry_after_s=2, not_run=True)
        if self.mode == "shutting-down":
            return InferenceError("the server is shutting down", 503, {"Retry-After": "1"})
        if self.mode == "busy":  # the server's own answer for itself: passed through, never retried
            return Unavailable("queue full", retry_after_s=1)
        return None

    async def _rest(self, req) -> Response:
        refused = await self._behave()
        if refused is not None:
            return Response(refused.status_code, orjson.dumps({"error": refused.message}), headers=refused.headers)
        return Response(200, orjson.dumps({"model_name": "m", "model_version": self.version, "id": self.name}))

    async def _grpc(self, data: bytes, context) -> bytes:
        refused = await self._behave()
        if refused is not None:
            code, details, trailing = error_status(refused)
            await context.abort(code, details, trailing_metadata=trailing)
        return pb.ModelInferResponse(model_name="m", model_version=self.version, id=self.name).SerializeToString()


# --------------------------------------------------------------------------- clients


@dataclass
class Outcome:
    code: str  # the gRPC status name (REST's code mapped by AS_GRPC)
    who: str = ""  # the replica that answered
    message: str = ""
    retry_after: str | None = None


class RestClient:
    name = "rest"

    def __init__(self, app: GatewayApp):
        self.pool = EndpointPool("127.0.0.1", app.port)

    async def infer(self, version: str | None = None, timeout: float = 30) -> Outcome:
        path = f"/v2/models/m/versions/{version}/infer" if version else "/v2/models/m/infer"
        loop = asyncio.get_running_loop()
        r = await self.pool.request("POST", path, [("content-type", "application/json")], b"{}", loop.time() + timeout)
        body, headers = orjson.loads(r.body), dict(r.headers)
        if r.status == 200:
            return Outcome("OK", who=body["id"])
        return Outcome(AS_GRPC.get(r.status, str(r.status)), message=body["error"],
                       retry_after=headers.get("retry-after"))

    async def close(self) -> None:
        self.pool.close()


class GrpcClient:
    name = "grpc"

    def __init__(self, app: GatewayApp):
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
        self.call = self.channel.unary_unary(f"/{pb.SERVICE}/ModelInfer")

    async def infer(self, version: str | None = None, timeout: float = 30) -> Outcome:
        msg = pb.ModelInferRequest(model_name="m", model_version=version or "")
        try:
            answer = await self.call(msg.SerializeToString(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            return Outcome(e.code().name, message=e.details() or "",
                           retry_after=dict(e.trailing_metadata() or ()).get("retry-after"))
        return Outcome("OK", who=pb.ModelInferResponse.FromString(answer).id)

    async def close(self) -> None:
        await self.channel.close()


CLIENTS = {"rest": RestClient, "grpc": GrpcClient, "grpc.aio": GrpcClient}
# the gateway's gRPC transport for each client: our HTTP/2 framing (the default), or grpc.aio (the switch back)
GRPC_TRANSPORT = {"grpc.aio": "grpcio"}


@asynccontextmanager
async def gateway(transport: str, primary: list[Replica], canary: list[Replica] | None = None, percent: float = 0,
                  cold_start_s: float = 0, **settings):
    """A gateway for model `m` (version 1) over `primary`, with a canary (version 2) when given,
    and a client of `transport`. `settings`: BalancerSettings fields, and request_timeout_s."""
    proxy = ProxySettings(request_timeout_s=settings.pop("request_timeout_s", 20))
    app = GatewayApp(StaticDiscovery({"m": {r.address for r in primary}}),
                     BalancerSettings(**{"max_concurrency": 64, **settings}), proxy)
    kind = GRPC_TRANSPORT.get(transport)
    if kind:
        os.environ["CAFFESERVE_GRPC_TRANSPORT"] = kind
    try:
        await app.start("127.0.0.1", 0, grpc_port=0)
    finally:
        os.environ.pop("CAFFESERVE_GRPC_TRANSPORT", None)
    await app.discovery.synced.wait()
    app.balancer.configure("m", version="1", cold_start_s=cold_start_s)
    if canary is not None:
        app.balancer.set_canary("m", {r.address for r in canary}, percent, version="2")
    client = CLIENTS[transport](app)
    try:
        yield app, client
    finally:
        for r in [*primary, *(canary or [])]:
            r.release.set()
        await client.close()
        await app.stop(1)


LIVE: list[Replica] = []  # the replicas of the running case, stopped after it whatever happens


async def replicas(*names: str, version: str = "1") -> list[Replica]:
    made = [await Replica(n, version).start() for n in names]
    LIVE.extend(made)
    return made


async def get_text(app: GatewayApp, path: str) -> str:
    pool = EndpointPool("127.0.0.1", app.port)
    try:
        r = await pool.request("GET", path, [], b"", asyncio.get_running_loop().time() + 10)
        return r.body.decode()
    finally:
        pool.close()


async def get_json(app: GatewayApp, path: str):
    return orjson.loads(await get_text(app, path))


async def until(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- the cases


async def canary_split(transport: str):
    """The canary gets exactly its share (a weighted round robin, not a coin toss)."""
    (p,), (c,) = await replicas("P"), await replicas("C", version="2")
    async with gateway(transport, [p], [c], percent=25) as (app, client):
        got = [await client.infer() for _ in range(40)]
        assert [o.code for o in got] == ["OK"] * 40, got
        assert sum(o.who == "C" for o in got) == 10, [o.who for o in got]


async def version_pin(transport: str):
    """A request that names a version goes to the variant serving it."""
    (p,), (c,) = await replicas("P"), await replicas("C", version="2")
    async with gateway(transport, [p], [c], percent=10) as (app, client):
        assert {(await client.infer(version="2")).who for _ in range(10)} == {"C"}
        assert {(await client.infer(version="1")).who for _ in range(10)} == {"P"}


async def hold_while_scaled_to_zero(transport: str):
    """A model with no ready replica and a cold-start time holds its requests until one is ready;
    the hold is not charged to the request's own timeout; without a hold it is refused at once."""
    (p,) = await replicas("P")
    async with gateway(transport, [], cold_start_s=30, request_timeout_s=1) as (app, client):
        t0 = time.monotonic()
        held = [asyncio.create_task(client.infer()) for _ in range(3)]
        await asyncio.sleep(1.5)  # longer than the request timeout
        assert not any(t.done() for t in held), [t.result() for t in held if t.done()]
        signal = await get_json(app, "/autoscaling/m")  # the demand that wakes the model
        assert signal["queued"] == 3 and signal["concurrency"] == 3 and signal["readyEndpoints"] == 0, signal
        assert 'caffeserve_gateway_held_requests_total{model="m",variant="primary"} 3.0' in await get_text(
            app, "/metrics"
        )
        app.balancer.set_model("m", {p.address})  # its pod turns ready
        got = await asyncio.wait_for(asyncio.gather(*held), 10)
        assert [o.code for o in got] == ["OK"] * 3 and {o.who for o in got} == {"P"}, got
        assert time.monotonic() - t0 > 1.5
        app.balancer.set_model("m", set())
        app.balancer.configure("m", version="1", cold_start_s=0)  # no hold: refused at once
        t0 = time.monotonic()
        o = await client.infer()
        assert o.code == "UNAVAILABLE" and o.retry_after == "1" and time.monotonic() - t0 < 1, o


async def hold_ends_at_the_cold_start_time(transport: str):
    """Past its cold-start time a held request is refused with a retry hint; the queue limit applies."""
    async with gateway(transport, [], cold_start_s=1.0, max_queue=2) as (app, client):
        t0 = time.monotonic()
        held = [asyncio.create_task(client.infer()) for _ in range(2)]
        await until(lambda: app.balancer.models["m"].queued == 2)
        o = await client.infer()  # the queue is full
        assert o.code == "UNAVAILABLE" and o.retry_after == "1" and "overloaded" in o.message, o
        got = await asyncio.wait_for(asyncio.gather(*held), 10)
        for o in got:
            assert o.code == "UNAVAILABLE" and o.retry_after == "1" and "cold start" in o.message, o
        assert 0.9 < time.monotonic() - t0 < 5


async def fallback(transport: str):
    """A request waiting for its variant when that variant is removed (a canary rolled back) is
    taken by the other variant."""
    (p,), (c,) = await replicas("P"), await replicas("C", version="2")
    c.mode = "hang"
    async with gateway(transport, [p], [c], percent=100, max_concurrency=1) as (app, client):
        first = asyncio.create_task(client.infer())  # on the canary, which hangs
        await until(lambda: c.hits == 1)
        second = asyncio.create_task(client.infer())  # waits for the canary's one slot
        await until(lambda: app.balancer.canaries["m"].queued == 1)
        assert not second.done()
        app.balancer.set_canary("m", None)  # rolled back
        o = await asyncio.wait_for(second, 5)
        assert o.code == "OK" and o.who == "P", o
        c.release.set()  # the request in flight on the canary finishes there
        o = await asyncio.wait_for(first, 5)
        assert o.code == "OK" and o.who == "C", o


async def rescue_from_a_hung_replica(transport: str):
    """Requests waiting on a replica whose readiness probe then fails (hung) go to a healthy one."""
    a, b = await replicas("A", "B")
    a.mode = "hang"
    async with gateway(transport, [a, b]) as (app, client):
        tasks = [asyncio.create_task(client.infer()) for _ in range(8)]
        await until(lambda: a.hits >= 2)  # least-request spreads them: some are stuck on A
        await asyncio.sleep(0.2)
        stuck = a.hits
        t0 = time.monotonic()
        app.balancer.set_model("m", {b.address})  # A is not ready, and not draining
        got = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert time.monotonic() - t0 < 5  # rescued, not left to the 20 s deadline
        assert [o.code for o in got] == ["OK"] * 8 and {o.who for o in got} == {"B"}, got
        assert app.balancer.models["m"].rescued_total == stuck


async def a_draining_replica_finishes_its_own(transport: str):
    """A replica that is shutting down (a terminating pod) finishes the requests it holds."""
    a, b = await replicas("A", "B")
    a.mode = "hang"
    async with gateway(transport, [a, b]) as (app, client):
        tasks = [asyncio.create_task(client.infer()) for _ in range(6)]
        await until(lambda: a.hits >= 1)
        await asyncio.sleep(0.2)
        app.balancer.set_model("m", {b.address}, draining={a.address})
        await asyncio.sleep(0.5)
        assert sum(t.done() for t in tasks) == 6 - a.hits  # A's are still waiting for A
        a.release.set()
        got = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert [o.code for o in got] == ["OK"] * 6 and sum(o.who == "A" for o in got) == a.hits, got
        assert app.balancer.models["m"].rescued_total == 0


async def retry_of_not_run(transport: str):
    """A refusal that says the replica did not start the request (loading, shutting down) is retried
    on another, within the retry budget; a replica's own "busy" passes through unchanged."""
    a, b = await replicas("A", "B")
    async with gateway(transport, [a, b]) as (app, client):
        for mode in ("not-run", "shutting-down"):
            a.mode, hits = mode, a.hits
            got = [await client.infer() for _ in range(10)]
            assert [o.code for o in got] == ["OK"] * 10 and {o.who for o in got} == {"B"}, (mode, got)
            assert a.hits > hits  # A was tried, and said it did not run them
            got = await asyncio.gather(*(client.infer() for _ in range(10)))  # within the budget
            for o in got:
                assert o.code == "OK" or ("retry budget" in o.message and o.retry_after), o
        a.mode = b.mode = "busy"
        o = await client.infer()
        assert o.code == "UNAVAILABLE" and o.message == "queue full" and o.retry_after == "1", o
        a.mode = b.mode = "not-run"
        o = await client.infer()
        assert o.code == "UNAVAILABLE" and "did not run" in o.message and o.retry_after, o


async def deadline(transport: str):
    """A forwarded request that outlives its deadline is a timeout; one whose deadline passes while
    it waits in the gateway is a timeout too, and is never forwarded."""
    (a,) = await replicas("A")
    a.mode = "hang"
    async with gateway(transport, [a], max_concurrency=1, request_timeout_s=0.6) as (app, client):
        o = await client.infer()
        assert o.code == "DEADLINE_EXCEEDED" and "did not answer within 0.6 s" in o.message, o
        assert a.hits == 1
        route = app.balancer.models["m"]
        loop = asyncio.get_running_loop()
        slot = await route.acquire(loop.time() + 10)  # another request holds the one slot
        o = await client.infer()
        route.release(slot, None)
        assert o.code == "DEADLINE_EXCEEDED" and "deadline passed while waiting" in o.message, o
        assert a.hits == 1  # never sent


async def queue_limit(transport: str):
    """With every slot taken and the queue full, a request is refused at once with a retry hint."""
    (a,) = await replicas("A")
    a.mode = "hang"
    async with gateway(transport, [a], max_concurrency=1, max_queue=1) as (app, client):
        tasks = [asyncio.create_task(client.infer()) for _ in range(2)]
        await until(lambda: a.hits == 1 and app.balancer.models["m"].queued == 1)
        o = await client.infer()
        assert o.code == "UNAVAILABLE" and o.retry_after == "1" and "overloaded" in o.message, o
        a.mode = "ok"
        a.release.set()
        assert [o.code for o in await asyncio.gather(*tasks)] == ["OK", "OK"]


CASES = {f.__name__: f for f in (canary_split, version_pin, hold_while_scaled_to_zero, hold_ends_at_the_cold_start_time,
                                 fallback, rescue_from_a_hung_replica, a_draining_replica_finishes_its_own,
                                 retry_of_not_run, deadline, queue_limit)}


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module, in a thread: grpc.aio keeps state per loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.mark.parametrize("transport", CLIENTS)
@pytest.mark.parametrize("case", CASES)
def test_gateway_rule(loop, case: str, transport: str):
    async def run():
        try:
            await asyncio.wait_for(CASES[case](transport), 60)
        finally:
            while LIVE:
                await LIVE.pop().stop()

    asyncio.run_coroutine_threadsafe(run(), loop).result(90)

"""The gateway's wait queue: clients that leave it are not forwarded, and a retry waiting in it does
not hold back requests another endpoint can take.

Real `caffeserve serve` and `caffeserve gateway` processes on loopback, as in test_gateway.py.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import orjson

from caffe_testing.gateway import GatewayProcess, infer_payload, metric, slow_config, static
from caffe_testing.servers import ServerProcess, http


def _send_and_leave(port: int, body: bytes) -> None:
    """Send one inference request, then close the connection without reading the answer."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.05)


def test_a_client_that_goes_away_while_queued_is_not_forwarded():
    """Clients that give up (a client timeout) must not keep the gateway's queue and the GPU busy."""
    with ServerProcess(slow_config(400), tmp_dir=Path("/tmp")) as slow, \
            GatewayProcess("--static", static("digits", slow), "--max-concurrency", "1") as gw:
        body = orjson.dumps(infer_payload(0))
        answered = lambda: metric(slow.url, "caffeserve_inference_requests_total", code="200")  # noqa: E731
        before = answered()
        for _ in range(4):  # the 1st is forwarded at once, the others queue behind it; all leave
            _send_and_leave(gw.port, body)
        time.sleep(2.5)  # long enough for the server to answer all four one after the other
        assert answered() - before <= 1, "requests whose clients had gone away were forwarded and computed"
        assert metric(gw.url, "caffeserve_gateway_queued_requests", model="digits") == 0
        assert metric(gw.url, "caffeserve_gateway_inflight_requests", model="digits") == 0
        status, _, payload = http("POST", gw.url + "/v2/models/digits/infer", body)
        assert status == 200, payload  # the gateway and its upstream pool still work
        assert metric(gw.url, "caffeserve_gateway_requests_total", model="digits", code="499") == 4


def test_a_retry_waiting_for_one_endpoint_does_not_hold_back_requests_another_endpoint_can_take():
    """A retry excludes the endpoint that failed it; while it waits for a busy one, a new request
    must still get an endpoint that is free (no head-of-line blocking in the wait queue)."""
    import asyncio

    from caffe_gateway.balancer import BalancerSettings, ModelRoute

    async def run():
        route = ModelRoute("m", BalancerSettings(max_concurrency=1, max_wait_s=0.3))
        route.set_endpoints({("10.0.0.1", 1), ("10.0.0.2", 1)})
        a, b = route.endpoints
        a.active = 1  # busy with a long request
        deadline = asyncio.get_running_loop().time() + 5
        retry = asyncio.create_task(route.acquire(deadline, frozenset({b.address})))  # failed on b: waits for a
        await asyncio.sleep(0.01)
        assert not retry.done()
        got = await route.acquire(deadline)  # b is free: take it now, not after the wait runs out
        assert got is b
        route.release(a, False)  # a frees up: the retry gets it
        assert await asyncio.wait_for(retry, 1) is a

    asyncio.run(run())

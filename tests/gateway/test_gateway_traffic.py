"""The gateway's traffic features: holding requests for a model scaled to zero, the load signal
autoscalers read, the canary split and version pinning, and the EndpointSlice labels they come from.

The hold tests run a real gateway (GatewayApp, the object `caffeserve gateway` runs) on loopback
in this process, so that the test can hand it an endpoint at the moment a real `caffeserve serve`
process turns ready, as discovery would.
"""

from __future__ import annotations

import asyncio
import threading
import time

import orjson

from caffe_gateway import traffic
from caffe_gateway.app import GatewayApp
from caffe_gateway.balancer import Balancer, BalancerSettings, ColdStartTimeout, ModelRoute
from caffe_gateway.discovery import EndpointSliceWatcher, KubeConfig, StaticDiscovery
from caffe_gateway.proxy import ProxySettings
from caffe_testing.digits import DIGITS_DIR
from caffe_testing.gateway import infer_payload
from caffe_testing.servers import ServerProcess, http
from inference_server import slices

BODY = orjson.dumps(infer_payload(0))


class InProcessGateway:
    """A GatewayApp on its own loop in a thread, with a model `digits` that has no endpoint yet."""

    def __init__(self, cold_start_s: float, **balancer):
        self.cold_start_s = cold_start_s
        self.settings = BalancerSettings(**balancer)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, fn):
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def __enter__(self):
        self.thread.start()
        self.app = GatewayApp(StaticDiscovery({"digits": set()}), self.settings, ProxySettings(request_timeout_s=5))
        port = asyncio.run_coroutine_threadsafe(self.app.start("127.0.0.1", 0), self.loop).result(10)
        self.url = f"http://127.0.0.1:{port}"
        time.sleep(0.1)
        self.call(lambda: self.app.balancer.configure("digits", version="1", cold_start_s=self.cold_start_s))
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.app.stop(2), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def send_in_background(url: str, n: int) -> tuple[list, list[threading.Thread]]:
    out: list = []

    def one():
        t0 = time.monotonic()
        status, headers, body = http("POST", url + "/v2/models/digits/infer", BODY,
                                     {"Content-Type": "application/json"}, timeout=120)
        out.append((status, headers, body, time.monotonic() - t0))
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    return out, threads


def test_requests_to_a_model_with_no_ready_pod_are_held_then_answered_once_one_is_ready():
    with InProcessGateway(cold_start_s=60) as gw:
        answers, threads = send_in_background(gw.url, 3)
        time.sleep(0.5)
        assert answers == []  # held, not refused
        status, signal = orjson.loads(http("GET", gw.url + "/autoscaling/digits")[2]), None
        assert status["queued"] == 3 and status["concurrency"] == 3 and status["readyEndpoints"] == 0
        metrics = http("GET", gw.url + "/metrics")[2].decode()
        assert 'caffeserve_gateway_concurrency{model="digits",variant="primary"} 3.0' in metrics
        with ServerProcess(DIGITS_DIR / "server.yaml") as server:  # the pod turns ready
            host, port = server.url.removeprefix("http://").split(":")
            gw.call(lambda: gw.app.balancer.set_model("digits", {(host, int(port))}))
            for t in threads:
                t.join(60)
        assert [a[0] for a in answers] == [200, 200, 200], answers
        # the hold (0.5 s + the server's start) is not charged to the 5 s request timeout
        assert all(a[3] > 0.5 for a in answers)


def test_a_held_request_past_the_cold_start_timeout_is_503_with_retry_after_and_the_queue_limit_applies():
    with InProcessGateway(cold_start_s=1.0, max_queue=2) as gw:
        answers, threads = send_in_background(gw.url, 2)
        time.sleep(0.3)
        status, headers, body = http("POST", gw.url + "/v2/models/digits/infer", BODY)
        assert status == 503 and headers.get("Retry-After", "").isdigit(), body  # the queue is full
        for t in threads:
            t.join(30)
        assert [a[0] for a in answers] == [503, 503]
        assert all(a[1].get("Retry-After", "").isdigit() for a in answers)
        assert all(b"cold start" in a[2] for a in answers), answers
        assert all(0.9 < a[3] < 10 for a in answers)


def test_without_a_cold_start_time_a_model_with_no_pod_is_503_at_once():
    with InProcessGateway(cold_start_s=0) as gw:
        t0 = time.monotonic()
        status, headers, _ = http("POST", gw.url + "/v2/models/digits/infer", BODY)
        assert status == 503 and headers.get("Retry-After") and time.monotonic() - t0 < 3


def test_the_hold_is_a_wait_in_the_queue_that_ends_with_cold_start_timeout():
    async def run():
        route = ModelRoute("m", BalancerSettings(max_wait_s=0.1))
        route.cold_start_s = 0.3
        deadline = asyncio.get_running_loop().time() + 10
        try:
            await route.acquire(deadline)
        except ColdStartTimeout:
            pass
        else:
            raise AssertionError("no ColdStartTimeout")
        assert route.queued == 0 and route.held_total == 1
        waiter = asyncio.create_task(route.acquire(deadline))
        await asyncio.sleep(0.05)
        assert route.concurrency() == 1
        route.set_endpoints({("10.0.0.1", 1)})
        ep = await asyncio.wait_for(waiter, 1)
        assert ep.address == "10.0.0.1:1" and route.concurrency() == 1
    asyncio.run(run())


def test_the_canary_split_is_exact_and_a_version_pins_a_variant_and_a_variant_without_pods_gets_nothing():
    async def run():
        b = Balancer()
        b.set_model("m", {("10.0.0.1", 1)})
        b.configure("m", version="1")
        b.set_canary("m", {("10.0.0.2", 1)}, 10, version="2")
        picks = [traffic.choose(b, "m").variant for _ in range(2000)]
        assert picks.count("canary") == 200
        assert {traffic.choose(b, "m", "2").variant for _ in range(50)} == {"canary"}
        assert {traffic.choose(b, "m", "1").variant for _ in range(50)} == {"primary"}
        b.set_canary("m", set(), 50, version="2")  # the canary is still loading
        assert {traffic.choose(b, "m").variant for _ in range(50)} == {"primary"}
        assert traffic.autoscaling_answer(b, "/autoscaling/m/canary/") == (200, {
            "model": "m", "variant": "canary", "concurrency": 0, "inFlight": 0, "queued": 0, "readyEndpoints": 0})
        assert traffic.autoscaling_answer(b, "/autoscaling/nope/")[0] == 404
        b.set_canary("m", {("10.0.0.2", 1)}, 10, version="2")
        b.set_model("m", set())  # the primary scaled to zero: with a hold it keeps its share (and wakes)
        b.configure("m", version="1", cold_start_s=30)
        assert [traffic.choose(b, "m").variant for _ in range(100)].count("canary") == 10
        b.configure("m", version="1", cold_start_s=0)  # no hold: the canary takes everything
        assert {traffic.choose(b, "m").variant for _ in range(50)} == {"canary"}
        b.set_canary("m", None)
        assert traffic.choose(b, "m").variant == "primary" and traffic.choose(b, "x") is None
    asyncio.run(run())


def _slice(name: str, labels: dict, addresses: list[str]) -> dict:
    return {"metadata": {"name": name, "namespace": "ml", "labels": {slices.MODEL_LABEL: "m", **labels}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]}


def test_endpointslice_labels_give_the_variants_weights_versions_and_cold_start():
    async def run():
        b = Balancer()
        w = EndpointSliceWatcher(KubeConfig(server="http://unused"), "ml")
        w._balancer = b
        w._upsert(_slice("m-predictor-a", {slices.VARIANT_LABEL: "primary", slices.TRAFFIC_LABEL: "75",
                                           slices.VERSION_LABEL: "1", slices.COLD_START_LABEL: "120"}, []))
        w._upsert(_slice("m-canary-b", {slices.VARIANT_LABEL: "canary", slices.TRAFFIC_LABEL: "25",
                                        slices.VERSION_LABEL: "2"}, ["10.0.0.9"]))
        w._publish()
        assert b.models["m"].endpoints == [] and b.models["m"].cold_start_s == 120 and b.models["m"].version == "1"
        canary = b.canaries["m"]
        assert canary.percent == 25 and canary.version == "2" and [e.address for e in canary.endpoints] == ["10.0.0.9:8080"]
        w.slices.pop(("ml", "m-canary-b"))
        w.traffic.pop(("ml", "m-canary-b"))
        w._publish()
        assert "m" not in b.canaries
    asyncio.run(run())
    assert slices.slice_traffic({"metadata": {"labels": {}}}) == slices.SliceTraffic()
    assert slices.label_value_ok("1.0-rc1") and not slices.label_value_ok("_x") and not slices.label_value_ok("a" * 64)

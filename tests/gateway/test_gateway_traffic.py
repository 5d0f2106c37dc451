"""The gateway's traffic parts one by one: the hold as a wait in the queue, the canary split and
version pinning in traffic.choose, the load signal, and the EndpointSlice labels they come from.

What a client sees of them, over REST and gRPC, is in test_gateway_transports.py.
"""

from __future__ import annotations

import asyncio

from caffe_gateway import traffic
from caffe_gateway.balancer import Balancer, BalancerSettings, ColdStartTimeout, ModelRoute
from caffe_gateway.discovery import EndpointSliceWatcher, KubeConfig
from inference_server import slices


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
        assert (
            canary.percent == 25
            and canary.version == "2"
            and [e.address for e in canary.endpoints] == ["10.0.0.9:8080"]
        )
        w.slices.pop(("ml", "m-canary-b"))
        w.traffic.pop(("ml", "m-canary-b"))
        w._publish()
        assert "m" not in b.canaries
    asyncio.run(run())
    assert slices.slice_traffic({"metadata": {"labels": {}}}) == slices.SliceTraffic()
    assert slices.label_value_ok("1.0-rc1") and not slices.label_value_ok("_x") and not slices.label_value_ok("a" * 64)

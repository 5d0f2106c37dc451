"""Local mode's traffic features, for real: `caffeserve up` with spec.autoscaling scales its server
processes on the gateway's load signal (up under a step load, back down, to zero and back), and
spec.canary splits requests by weight; saving a changed manifest promotes or rolls back a canary
under load. Real `caffeserve serve` processes with the digits model, a real gateway, real HTTP.

Load: closed-loop clients (each sends its next request when its last is answered). The servers
batch with a queue delay, so that each request stays in flight for a while and the in-flight
count the gateway sees is about the number of clients, whatever this machine's load (the test
asserts outcomes, not timings; the figures are printed for docs/traffic.md).
"""

from __future__ import annotations

import time

import psutil
import pytest

from caffe_testing.digits import DIGITS_DIR
from caffe_testing.traffic import ClosedLoad, canary_of, digits_manifest, infer, write_manifest

pytestmark = pytest.mark.timeout(600)

# each lone request waits up to 150 ms for a batch to fill: in flight long enough to be counted
SLOW = {"device": "cpu", "batching": {"enabled": True, "maxBatchSize": 8, "maxQueueDelayMs": 150}}


def up(up_processes, tmp_path, doc) -> tuple:
    path = tmp_path / "service.yaml"
    write_manifest(path, doc)
    proc = up_processes(str(path), "--pvc-root", str(DIGITS_DIR)).wait_ready(timeout=180)
    return proc, path


def servers(proc) -> int:
    """Running `caffeserve serve` children (one that is exiting right now, a zombie, does not count)."""
    count = 0
    for p in proc.servers():
        try:
            count += "serve" in p.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return count


def wait_until(fn, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := fn()):
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{proc.output[-4000:]}" if proc else ""))


def test_step_load_scales_replicas_from_min_to_max_and_back_and_loses_no_request(up_processes, tmp_path):
    doc = digits_manifest(runtime=SLOW, replicas=None, autoscaling={
        "minReplicas": 1, "maxReplicas": 3, "target": 2, "scaleDownDelaySeconds": 4})
    proc, _ = up(up_processes, tmp_path, doc)
    assert servers(proc) == 1
    step = time.monotonic()
    with ClosedLoad(proc.url, clients=6) as load:
        wait_until(lambda: "ready (3 of 3)" in proc.output, 120, "3 ready replicas", proc)
        scaled_up_s = time.monotonic() - step
        assert servers(proc) == 3
        time.sleep(2)  # served by all three for a while
    wait_until(lambda: servers(proc) == 1 and "scaling down" in proc.output, 60, "back to 1 replica", proc)
    statuses = load.statuses()
    assert set(statuses) == {200}, (statuses, load.errors, proc.output[-3000:])
    assert "scaling up 1 -> " in proc.output
    print(f"\nstep load 0 -> 6 clients (target 2/replica): 1 -> 3 replicas ready in {scaled_up_s:.1f} s; "
          f"{sum(statuses.values())} requests, all 200")
    assert proc.terminate() == 0


@pytest.mark.parametrize("backend", ["pycaffe", "auto"])
def test_a_request_to_a_model_scaled_to_zero_waits_for_a_replica_then_succeeds(up_processes, tmp_path, backend):
    doc = digits_manifest(runtime={"device": "cpu", "backend": backend}, replicas=None, autoscaling={
        "minReplicas": 0, "maxReplicas": 2, "target": 4, "scaleDownDelaySeconds": 2, "coldStartTimeoutSeconds": 120})
    proc, _ = up(up_processes, tmp_path, doc)
    assert servers(proc) == 0 and "digits: 0 replica(s) ready" in proc.output
    cold = []
    for _ in range(2):  # cold, back to zero when idle, cold again
        t0 = time.monotonic()
        status, version, _ = infer(proc.url)
        cold.append(time.monotonic() - t0)
        assert status == 200 and version == "1", proc.output[-3000:]
        t0 = time.monotonic()
        assert infer(proc.url)[0] == 200
        warm = time.monotonic() - t0
        wait_until(lambda: servers(proc) == 0, 60, "scale back to zero", proc)
    print(f"\ncold start ({backend}): first request {cold[0]:.2f} s, again from zero {cold[1]:.2f} s; "
          f"a warm request {warm * 1000:.0f} ms")
    assert proc.terminate() == 0


def test_canary_split_is_within_3_percent_of_its_weight_and_a_version_in_the_url_pins_it(up_processes, tmp_path):
    doc = digits_manifest(replicas=1)
    doc["spec"]["canary"] = canary_of(doc, "2", 10)
    proc, _ = up(up_processes, tmp_path, doc)
    assert "digits-canary: 1 replica(s) ready" in proc.output
    with ClosedLoad(proc.url, clients=2) as load:
        wait_until(lambda: len(load.results) >= 2000, 300, "2,000 requests")
    results = load.results[:2000]
    assert {r[2] for r in results} == {200}
    share = sum(1 for r in results if r[3] == "2") / len(results)
    assert abs(share - 0.10) <= 0.03, share
    pinned = {infer(proc.url, "/v2/models/digits/versions/2/infer")[1] for _ in range(20)}
    assert pinned == {"2"}
    assert {infer(proc.url, "/v2/models/digits/versions/1/infer")[1] for _ in range(20)} == {"1"}
    from caffe_testing.gateway import metric
    assert metric(proc.url, "caffeserve_gateway_variant_requests_total", model="digits", variant="canary") >= 200
    print(f"\ncanary at 10 %: {share * 100:.2f} % of 2,000 requests answered by version 2")
    assert proc.terminate() == 0


def test_rollback_and_promotion_under_load_fail_no_request(up_processes, tmp_path):
    doc = digits_manifest(replicas=1)
    doc["spec"]["canary"] = canary_of(doc, "2", 30)
    proc, path = up(up_processes, tmp_path, doc)

    def applied(n: int):
        return lambda: proc.output.count("manifest applied") >= n

    with ClosedLoad(proc.url, clients=4) as load:
        time.sleep(2)
        rollback = dict(doc, spec={k: v for k, v in doc["spec"].items() if k != "canary"})
        write_manifest(path, rollback)  # roll back: remove the canary
        wait_until(applied(1), 120, "the rollback", proc)
        after_rollback = time.monotonic()
        time.sleep(2)
        write_manifest(path, doc)  # the canary again
        wait_until(applied(2), 120, "the new canary", proc)
        time.sleep(2)
        promoted = dict(doc, spec={k: v for k, v in doc["spec"].items() if k != "canary"})
        promoted["spec"]["model"] = doc["spec"]["canary"]["model"]
        write_manifest(path, promoted)  # promote: the canary's model becomes the model
        wait_until(applied(3), 120, "the promotion", proc)
        after_promotion = time.monotonic()
        time.sleep(2)
    statuses = load.statuses()
    assert set(statuses) == {200}, (statuses, load.errors, proc.output[-4000:])
    rolled_back = {r[3] for r in load.results if after_rollback + 0.5 < r[0] < after_rollback + 2}
    assert rolled_back == {"1"}
    assert {r[3] for r in load.results if r[0] > after_promotion + 0.5} == {"2"}
    assert servers(proc) == 1
    print(f"\nrollback, new canary, promotion under 4 closed-loop clients: {sum(statuses.values())} requests, all 200")
    assert proc.terminate() == 0

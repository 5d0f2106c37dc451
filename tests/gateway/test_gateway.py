"""The gateway (`caffeserve gateway`) in front of real `caffeserve serve` processes on loopback.

Every server here is the real inference server with the real digits model (pycaffe); the gateway
is the real command as a process. "Slow" servers are the same server with dynamic batching that
waits `maxQueueDelayMs` for a batch to fill, which makes each lone request take that long: a
deterministic way to hold a server busy without a test double.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import numpy as np
import orjson
import tritonclient.http as triton

from caffe_testing.digits import DIGITS_DIR, digits_data
from caffe_testing.gateway import (
    IMAGES,
    LABELS,
    GatewayProcess,
    burst,
    infer_payload,
    metric,
    predicted,
    served,
    slow_config,
    static,
)
from caffe_testing.servers import ServerProcess, free_port, http, http_json

# --------------------------------------------------------------------------- forwarding


def test_requests_spread_over_both_servers_and_predict_the_digits(servers, gateway):
    before = [served(s) for s in servers]
    n, answers = 48, {}

    def client(k: int):
        conn = HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        for i in range(k, n, 4):
            conn.request("POST", "/v2/models/digits/infer", orjson.dumps(infer_payload(i)),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            answers[i] = (r.status, orjson.loads(r.read()))
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 200 for status, _ in answers.values()), answers
    correct = sum(predicted(body) == LABELS[i] for i, (_, body) in answers.items())
    assert correct >= 0.95 * n
    delta = [served(s) - b for s, b in zip(servers, before, strict=True)]
    assert sum(delta) == n
    assert min(delta) >= n // 6, f"requests per server {delta}: not spread"


def test_tritonclient_http_works_through_the_gateway_unchanged(servers, gateway):
    via = triton.InferenceServerClient(gateway.url.removeprefix("http://"))
    direct = triton.InferenceServerClient(servers[0].url.removeprefix("http://"))
    assert via.is_server_live() and via.is_server_ready() and via.is_model_ready("digits")
    # `parameters` carries per-replica figures (load timings, cache hits): the rest must be identical
    via_meta, direct_meta = via.get_model_metadata("digits"), direct.get_model_metadata("digits")
    assert via_meta["parameters"]["backend"] == direct_meta["parameters"]["backend"]
    via_meta.pop("parameters"), direct_meta.pop("parameters")
    assert via_meta == direct_meta
    assert [m["name"] for m in via.get_model_repository_index()] == ["digits"]

    # FP32 tensors in the binary extension both ways (Inference-Header-Content-Length)
    blob = digits_data.to_blob(IMAGES[:3])
    inp = triton.InferInput("data", list(blob.shape), "FP32")
    inp.set_data_from_numpy(blob, binary_data=True)
    out = triton.InferRequestedOutput("prob", binary_data=True)
    got = via.infer("digits", [inp], outputs=[out]).as_numpy("prob")
    want = direct.infer("digits", [inp], outputs=[out]).as_numpy("prob")
    np.testing.assert_array_equal(got, want)
    assert list(got.argmax(1)) == list(LABELS[:3])

    # an encoded image in a BYTES input, classification output
    png = triton.InferInput("data", [1], "BYTES")
    png.set_data_from_numpy(np.array([digits_data.render_png(IMAGES[5], 32)], dtype=object), binary_data=True)
    top = triton.InferRequestedOutput("prob", class_count=1, binary_data=False)
    label = via.infer("digits", [png], outputs=[top]).as_numpy("prob").ravel()[0]
    assert (label.decode() if isinstance(label, bytes) else label).split(":")[2] == str(LABELS[5])
    via.close()
    direct.close()


def test_a_bad_request_passes_through_with_the_servers_code_and_message(servers, gateway):
    wrong_input = {"inputs": [{"name": "nope", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
    for body in (orjson.dumps(wrong_input), b'{"inputs": [', b"\x00\x01binary junk"):
        direct = http("POST", servers[0].url + "/v2/models/digits/infer", body, {"Content-Type": "application/json"})
        via = http("POST", gateway.url + "/v2/models/digits/infer", body, {"Content-Type": "application/json"})
        assert 400 <= direct[0] < 500
        assert via[0] == direct[0] and via[2] == direct[2], (via, direct)
        assert "error" in orjson.loads(via[2])
    assert b"nope" in http("POST", gateway.url + "/v2/models/digits/infer", orjson.dumps(wrong_input))[2]
    # a model version the server does not have: its own 404, passed through
    status, body = http_json("GET", gateway.url + "/v2/models/digits/versions/7")
    assert status == 404 and "error" in body


def test_the_gateways_own_routes(gateway):
    assert http_json("GET", gateway.url + "/v2/health/live") == (200, {"live": True})
    assert http_json("GET", gateway.url + "/v2/health/ready") == (200, {"ready": True})
    assert http_json("GET", gateway.url + "/v2/models") == (200, {"models": ["digits"]})
    # the index entry is the replica's own: a server's shape (name, version, state, reason)
    assert http_json("POST", gateway.url + "/v2/repository/index", {}) == (
        200, [{"name": "digits", "version": "1", "state": "READY", "reason": ""}])
    status, meta = http_json("GET", gateway.url + "/v2")
    assert status == 200 and meta["name"] == "caffe-serving-gateway"
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    head = http("HEAD", gateway.url + "/v2/health/ready")
    assert head[0] == 200 and head[2] == b""
    status, body = http_json("POST", gateway.url + "/v2/models/resnet/infer", infer_payload(0))
    assert status == 404 and body == {"error": "model 'resnet' is not known to the gateway"}
    status, body = http_json("GET", gateway.url + "/v2/models/digits/ready")
    assert status == 200
    assert http_json("GET", gateway.url + "/v3/anything")[0] == 404


def test_metrics_count_requests_by_model_and_code_and_show_queue_and_in_flight(gateway):
    ok = metric(gateway.url, "caffeserve_gateway_requests_total", model="digits", code="200")
    http_json("POST", gateway.url + "/v2/models/digits/infer", infer_payload(1))
    http_json("POST", gateway.url + "/v2/models/digits/infer", {"inputs": []})
    assert metric(gateway.url, "caffeserve_gateway_requests_total", model="digits", code="200") == ok + 1
    assert metric(gateway.url, "caffeserve_gateway_requests_total", model="digits", code="400") >= 1
    assert metric(gateway.url, "caffeserve_gateway_upstream_latency_seconds_count", model="digits") >= ok + 2
    text = http("GET", gateway.url + "/metrics")[2].decode()
    assert 'caffeserve_gateway_queued_requests{model="digits"} 0.0' in text
    assert 'caffeserve_gateway_inflight_requests{model="digits"} 0.0' in text
    assert 'caffeserve_gateway_endpoints{model="digits",state="ready"} 2.0' in text


def test_only_allow_listed_headers_cross_and_the_body_is_forwarded_byte_for_byte():
    """Upstream here is our HTTPServer recording what it receives: the real inference server does
    not expose request headers, so this is the one place a recording double is needed."""
    import asyncio as aio

    from caffe_http.server import HTTPServer, Response

    seen = []

    async def record(req):
        seen.append(req)
        return Response(200, b"\x00\x01raw-answer", content_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": "2", "Set-Cookie": "a=b",
                                 "X-Internal-Node": "gpu-7", "Retry-After": "3"})

    loop = aio.new_event_loop()
    server = HTTPServer(record)
    port = loop.run_until_complete(server.start("127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        with GatewayProcess("--static", f"m=http://127.0.0.1:{port}") as gw:
            body = bytes(range(256)) * 300  # binary, > 64 KiB
            status, headers, answer = http("POST", gw.url + "/v2/models/m/versions/2/infer?x=1", body, {
                "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "17",
                "Authorization": "Bearer secret", "Cookie": "session=1", "X-Request-Id": "req-42",
                "Traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            })
            headers = {k.lower(): v for k, v in headers.items()}
            assert status == 200 and answer == b"\x00\x01raw-answer"
            assert headers["inference-header-content-length"] == "2" and headers["retry-after"] == "3"
            assert headers["content-type"] == "application/octet-stream"
            assert "set-cookie" not in headers and "x-internal-node" not in headers
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    req = seen[0]
    assert req.method == "POST" and req.path == "/v2/models/m/versions/2/infer" and req.query == "x=1"
    assert req.body == body
    assert req.headers["inference-header-content-length"] == "17"
    assert req.headers["x-request-id"] == "req-42" and req.headers["traceparent"].startswith("00-0af7")
    assert req.headers["x-forwarded-for"] == "127.0.0.1"
    assert "authorization" not in req.headers and "cookie" not in req.headers


# --------------------------------------------------------------------------- failures


def test_killing_a_server_under_load_fails_only_requests_in_flight_on_it():
    with ServerProcess(DIGITS_DIR / "server.yaml") as a, ServerProcess(DIGITS_DIR / "server.yaml") as b, \
            GatewayProcess("--static", static("digits", a, b)) as gw:
        results: list[tuple[float, float, int]] = []  # (start, end, status)
        stop = threading.Event()

        def client(k: int):
            conn = HTTPConnection("127.0.0.1", gw.port, timeout=30)
            i = k
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    conn.request("POST", "/v2/models/digits/infer", orjson.dumps(infer_payload(i % 100)),
                                 {"Content-Type": "application/json"})
                    r = conn.getresponse()
                    r.read()
                    status = r.status
                except OSError:
                    status = -1
                    conn.close()
                    conn = HTTPConnection("127.0.0.1", gw.port, timeout=30)
                results.append((t0, time.monotonic(), status))
                i += 4
            conn.close()

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        served_by_b = served(b)
        killed_at = time.monotonic()
        b.proc.kill()  # a crash: no graceful drain, connections reset
        b.proc.wait()
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join()

        assert served_by_b > 0, "the killed server had received no requests before the kill"
        after = [r for r in results if r[0] > killed_at]
        failed = [r for r in results if r[2] != 200]
        assert len(after) > 20
        assert all(r[2] == 200 for r in after), f"requests sent after the kill failed: {failed}"
        # only requests in flight at the kill may fail (with retries, usually none do)
        assert all(r[0] <= killed_at <= r[1] for r in failed), failed
        assert metric(gw.url, "caffeserve_gateway_retries_total", model="digits") >= 1
        # the dead server is skipped: after a refused connection (backoff), then after 5 (ejection)
        assert metric(gw.url, "caffeserve_gateway_endpoints", model="digits", state="ejected") == 1


def test_overload_answers_503_with_retry_after_and_memory_stays_bounded():
    with ServerProcess(slow_config(300), tmp_dir=Path("/tmp")) as slow, \
            GatewayProcess("--static", static("digits", slow), "--max-concurrency", "2", "--max-queue", "4",
                           "--max-wait", "5") as gw:
        body = orjson.dumps(infer_payload(0))
        results = burst(gw.port, 40, body)
        codes = sorted(r[0] for r in results)
        assert set(codes) == {200, 503}, codes
        assert codes.count(200) >= 6  # 2 in flight + 4 waiting, at least
        assert codes.count(503) >= 20
        for status, headers, payload, _ in results:
            if status == 503:
                assert re.fullmatch(r"[1-9][0-9]*", headers.get("retry-after", "")), headers
                assert "overloaded" in orjson.loads(payload)["error"]

        # memory: much more offered load (bigger bodies, more requests) does not grow the gateway
        padded = body[:-1] + b" " * (64 * 1024) + b"}"  # still valid JSON, 64 KiB
        burst(gw.port, 200, padded)
        first = gw.rss()
        for _ in range(4):
            results = burst(gw.port, 200, padded)
            assert sum(r[0] == 503 for r in results) >= 150
        grown = gw.rss() - first
        assert grown < 16 * 1024 * 1024, f"gateway memory grew by {grown / 2**20:.1f} MiB under repeated overload"
        assert metric(gw.url, "caffeserve_gateway_queued_requests", model="digits") == 0


def test_a_request_whose_deadline_passes_while_queued_is_never_forwarded():
    with ServerProcess(slow_config(400), tmp_dir=Path("/tmp")) as slow, \
            GatewayProcess("--static", static("digits", slow), "--max-concurrency", "1",
                           "--request-timeout", "0.6") as gw:
        before = served(slow)
        results = burst(gw.port, 4, orjson.dumps(infer_payload(0)))
        codes = sorted(r[0] for r in results)
        assert codes == [200, 504, 504, 504], [(r[0], r[2][:200]) for r in results]
        errors = [orjson.loads(r[2])["error"] for r in results if r[0] == 504]
        # the 1st is answered at 0.4 s; the 2nd is forwarded with 0.2 s left and times out; the
        # others' deadlines pass while they wait (one of them may be handed the 2nd's slot in the
        # very millisecond before its deadline, and then times out upstream instead, or find on waking
        # that its deadline passed meanwhile: also never sent)
        never_sent = sum("deadline passed while waiting" in e or "deadline passed before it could be forwarded" in e
                         for e in errors)
        assert never_sent >= 1 and sum("did not answer within" in e for e in errors) == 3 - never_sent, errors
        time.sleep(0.6)  # let the server finish the ones it was sent and then abandoned
        assert served(slow) - before == 4 - never_sent, \
            "a request whose deadline passed in the queue reached the server"


def test_a_model_without_ready_servers_is_503_with_retry_after():
    port = free_port()  # nothing listens here
    with GatewayProcess("--static", f"digits=http://127.0.0.1:{port}") as gw:
        status, headers, body = http("POST", gw.url + "/v2/models/digits/infer", orjson.dumps(infer_payload(0)))
        assert status == 503 and int(headers["Retry-After"]) >= 1
        assert "cannot reach model 'digits'" in orjson.loads(body)["error"]


def test_sigterm_finishes_requests_in_flight_then_exits():
    with ServerProcess(slow_config(500), tmp_dir=Path("/tmp")) as slow:
        gw = GatewayProcess("--static", static("digits", slow)).start()
        try:
            out = {}

            def call():
                out["r"] = http_json("POST", gw.url + "/v2/models/digits/infer", infer_payload(3))

            t = threading.Thread(target=call)
            t.start()
            time.sleep(0.2)
            gw.proc.terminate()
            t.join(10)
            assert gw.proc.wait(10) == 0
            status, body = out["r"]
            assert status == 200 and predicted(body) == LABELS[3]
        finally:
            gw.stop()


def test_drain_delay_keeps_serving_while_not_ready_then_exits(servers):
    """--drain-delay (the chart sets 5 s): after SIGTERM readiness is 503 at once (the Service stops
    routing here) while new REST and gRPC calls are still answered; then the gateway exits."""
    gw = GatewayProcess("--static", static("digits", *servers), "--drain-delay", "3").start()
    try:
        gw.proc.terminate()
        time.sleep(0.5)
        assert http("GET", gw.url + "/v2/health/ready")[0] == 503
        status, body = http_json("POST", gw.url + "/v2/models/digits/infer", infer_payload(4))
        assert status == 200 and predicted(body) == LABELS[4]
        assert gw.proc.poll() is None
        assert gw.proc.wait(15) == 0
    finally:
        gw.stop()


# --------------------------------------------------------------------------- balancing rules


def test_least_request_never_picks_the_busiest_of_three_and_respects_the_limit():
    from caffe_gateway.balancer import BalancerSettings, ModelRoute

    async def run():
        route = ModelRoute("m", BalancerSettings(max_concurrency=10))
        route.set_endpoints({("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)})
        for ep, active in zip(route.endpoints, (0, 4, 9), strict=True):
            ep.active = active
        picks = [route._pick(0.0, frozenset()).address for _ in range(300)]
        assert "10.0.0.3:1" not in picks and picks.count("10.0.0.1:1") > 150
        route.endpoints[0].active = 10  # at its limit: never picked; of the other two, the less busy
        assert {route._pick(0.0, frozenset()).address for _ in range(100)} == {"10.0.0.2:1"}
        for ep in route.endpoints:
            ep.active = 10
        assert route._pick(0.0, frozenset()) is None  # all at the limit: the request waits

    asyncio.run(run())


def test_retry_budget_is_20_percent_of_active_requests_with_a_minimum_of_3():
    from caffe_gateway.balancer import BalancerSettings, ModelRoute

    route = ModelRoute("m", BalancerSettings())
    assert [route.try_start_retry() for _ in range(4)] == [True, True, True, False]
    route.active = 50
    assert [route.try_start_retry() for _ in range(8)] == [True] * 7 + [False]  # 10 in all
    for _ in range(10):
        route.end_retry()
    assert route.retries_active == 0


# --------------------------------------------------------------------------- Kubernetes discovery


ENDPOINTSLICES = "discovery.k8s.io/v1/endpointslices"


def endpoint_slice(name: str, model: str, port: int, ready: list[bool], namespace: str = "default") -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": {
            "caffeserving.io/model": model, "kubernetes.io/service-name": f"{model}-predictor",
            "app.kubernetes.io/name": "caffe-serving"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": r}} for r in ready],
    }


def test_discovery_follows_endpointslices_without_a_restart(servers):
    import kmock

    from caffe_testing.cluster import Cluster

    a, b = servers
    with Cluster() as cluster:
        cluster.in_loop(lambda: cluster.api.resources.__setitem__(ENDPOINTSLICES, kmock.ResourceInfo(
            kind="EndpointSlice", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"})))
        cluster.create(ENDPOINTSLICES, "default", endpoint_slice("digits-predictor-a", "digits", a.port, [True]))
        # same model name in another namespace: not watched by a namespace-scoped gateway
        cluster.create(ENDPOINTSLICES, "other", endpoint_slice("digits-predictor-x", "digits", 1, [True], "other"))
        with GatewayProcess("--kubernetes", "--kubeconfig", str(cluster.kubeconfig), "--namespace", "default") as gw:
            def infer_n(n: int) -> list[int]:
                return [http_json("POST", gw.url + "/v2/models/digits/infer", infer_payload(i))[0] for i in range(n)]

            assert http_json("GET", gw.url + "/v2/models") == (200, {"models": ["digits"]})
            counts = served(a), served(b)
            assert infer_n(6) == [200] * 6
            assert (served(a) - counts[0], served(b) - counts[1]) == (6, 0)

            # a second slice whose endpoint is not ready yet: still only server a
            cluster.create(ENDPOINTSLICES, "default", endpoint_slice("digits-predictor-b", "digits", b.port, [False]))
            time.sleep(0.3)
            counts = served(a), served(b)
            infer_n(6)
            assert served(b) == counts[1]

            # it becomes ready: traffic reaches it, with no restart
            cluster.patch(ENDPOINTSLICES, "default", "digits-predictor-b",
                          {"endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]})
            cluster.wait_for(lambda: metric(gw.url, "caffeserve_gateway_endpoints", model="digits",
                                            state="ready") == 2, what="two ready endpoints")
            counts = served(a), served(b)
            infer_n(20)
            assert served(a) > counts[0] and served(b) > counts[1]

            # a's pod goes away (terminating: not ready): only b
            cluster.patch(ENDPOINTSLICES, "default", "digits-predictor-a",
                          {"endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": False}}]})
            cluster.wait_for(lambda: metric(gw.url, "caffeserve_gateway_endpoints", model="digits",
                                            state="ready") == 1, what="one ready endpoint")
            counts = served(a), served(b)
            assert infer_n(6) == [200] * 6
            assert (served(a) - counts[0], served(b) - counts[1]) == (0, 6)

            # no ready endpoint at all: 503 + Retry-After; the model is gone with its slices: 404
            cluster.patch(ENDPOINTSLICES, "default", "digits-predictor-b", {"endpoints": []})
            cluster.wait_for(lambda: http_json("POST", gw.url + "/v2/repository/index", {})[1]
                             == [{"name": "digits", "version": "", "state": "UNAVAILABLE",
                                  "reason": "no ready endpoint"}])
            status, headers, _ = http("POST", gw.url + "/v2/models/digits/infer", orjson.dumps(infer_payload(0)))
            assert status == 503 and int(headers["Retry-After"]) >= 1
            cluster.delete(ENDPOINTSLICES, "default", "digits-predictor-a")
            cluster.delete(ENDPOINTSLICES, "default", "digits-predictor-b")
            cluster.wait_for(lambda: http_json("GET", gw.url + "/v2/models")[1] == {"models": []})
            assert http_json("POST", gw.url + "/v2/models/digits/infer", infer_payload(0))[0] == 404

        # the gateway only lists and watches EndpointSlices in its namespace (its RBAC needs)
        mine = cluster.in_loop(lambda: [r for r in list(cluster.api)
                                        if r.headers.get("User-Agent") == "caffeserve-gateway"])
        assert mine
        assert {(r.action.value, str(r.resource), r.namespace) for r in mine} <= {
            ("LIST", str(kmock.resource(ENDPOINTSLICES)), "default"),
            ("WATCH", str(kmock.resource(ENDPOINTSLICES)), "default"),
        }

"""OpenTelemetry traces across the gateway and the pod: real `caffeserve gateway` and `caffeserve serve`
processes exporting over OTLP/HTTP to a real receiver on loopback (caffe_testing/otlp.py), which decodes
the protobuf with OpenTelemetry's own messages. One client request gives one trace: the gateway's spans
and the server's, linked by the `traceparent` the gateway sends on (a REST header, gRPC metadata).
"""

from __future__ import annotations

import json
import os
import secrets

import grpc
import numpy as np
import pytest

from caffe_http.tracing import endpoint, traces_url
from caffe_testing.digits import DIGITS_DIR, digits_data
from caffe_testing.gateway import IMAGES, LABELS, GatewayProcess, digits_config, infer_payload, predicted, static
from caffe_testing.grpc import OIPClient, grpc_server, infer_request, output
from caffe_testing.local import UpProcess
from caffe_testing.otlp import OTLPReceiver, Span
from caffe_testing.servers import ServerProcess, http, http_json

# the SDK's batch exporter waits 5 s by default before it sends; the tests need not
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}
SERVER_PHASES = ["decode", "queue", "forward", "encode"]


@pytest.fixture(scope="module")
def receiver():
    with OTLPReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def traced(receiver, tmp_path_factory):
    """A gateway (tracing set by its flag) in front of one server (tracing set in its config), both gRPC too."""
    tmp = tmp_path_factory.mktemp("tracing")
    cfg = digits_config(tracing={"endpoint": receiver.endpoint})
    with grpc_server(cfg, tmp, env=FAST_EXPORT) as server, \
            GatewayProcess("--static", static("digits", server), "--otlp-endpoint", receiver.endpoint,
                           env=FAST_EXPORT) as gateway:
        yield gateway, server


def one_trace(receiver: OTLPReceiver, trace_id: str | None = None, services: int = 2) -> list[Span]:
    """The spans of one trace once both programs' spans have arrived (the newest trace if no id is given)."""
    def complete(spans):
        ids = {trace_id} if trace_id else {s.trace_id for s in spans}
        return any(len([s for s in spans if s.trace_id == t and s.service == "caffeserve-server"]) >= 5
                   and len([s for s in spans if s.trace_id == t and s.service == "caffeserve-gateway"]) >= 3
                   for t in ids)
    spans = receiver.wait_for(complete)
    if trace_id is None:
        trace_id = next(s.trace_id for s in reversed(spans) if s.service == "caffeserve-server")
    return [s for s in spans if s.trace_id == trace_id]


def check_linked(spans: list[Span], client_span: str, protocol: str, gateway_name: str, server_name: str) -> None:
    """The tree a user sees in a trace viewer: client → gateway → forward → server → its phases."""
    by = {(s.service, s.name): s for s in spans}
    gw = by["caffeserve-gateway", gateway_name]
    assert gw.kind == "SERVER" and gw.parent_id == client_span
    assert gw.attributes["caffeserve.model"] == "digits" and gw.attributes["caffeserve.protocol"] == protocol
    queue, fwd = by["caffeserve-gateway", "queue"], by["caffeserve-gateway", "forward"]
    assert queue.parent_id == gw.span_id and fwd.parent_id == gw.span_id and fwd.kind == "CLIENT"
    assert fwd.attributes["caffeserve.attempt"] == 1 and fwd.attributes["server.address"].startswith("127.0.0.1:")
    srv = by["caffeserve-server", server_name]
    assert srv.kind == "SERVER" and srv.parent_id == fwd.span_id  # the pod's span hangs under the gateway's call
    assert srv.attributes["caffeserve.model"] == "digits" and srv.attributes["caffeserve.model_version"] == "1"
    assert srv.attributes["caffeserve.protocol"] == protocol
    assert srv.attributes["caffeserve.backend"] in ("pycaffe", "onnxruntime")
    assert srv.attributes["caffeserve.batch_size"] == 1 and srv.attributes["caffeserve.request_rows"] == 1
    phases = sorted((s for s in spans if s.service == "caffeserve-server" and s.parent_id == srv.span_id),
                    key=lambda s: s.start_ns)
    assert [s.name for s in phases] == SERVER_PHASES
    assert phases[2].attributes["caffeserve.batch_size"] == 1
    assert phases[2].attributes["caffeserve.backend"] == srv.attributes["caffeserve.backend"]
    # each phase inside the server's span, and in order (one clock per process, converted once)
    assert srv.start_ns <= phases[0].start_ns and phases[-1].end_ns <= srv.end_ns
    for a, b in zip(phases, phases[1:], strict=False):
        assert a.end_ns <= b.start_ns + 1000, (a, b)
    assert len({s.trace_id for s in spans}) == 1 and len(spans) == 8  # 3 gateway spans, 5 server spans
    assert all(s.status != "ERROR" for s in spans)


def test_a_rest_request_through_the_gateway_gives_one_trace_linked_from_the_clients_traceparent(traced, receiver):
    gateway, _ = traced
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    status, body = _post(gateway.url, 3, f"00-{trace_id}-{client_span}-01")
    assert status == 200 and predicted(body) == LABELS[3]
    spans = one_trace(receiver, trace_id)
    check_linked(spans, client_span, "rest", "POST /v2/models/digits/infer", "POST /v2/models/digits/infer")
    by = {(s.service, s.name): s for s in spans}
    assert by["caffeserve-gateway", "POST /v2/models/digits/infer"].attributes["http.response.status_code"] == 200
    assert by["caffeserve-server", "POST /v2/models/digits/infer"].attributes["http.response.status_code"] == 200
    assert by["caffeserve-gateway", "forward"].attributes["caffeserve.backend"] in ("pycaffe", "onnxruntime")


def test_a_grpc_call_through_the_gateway_starts_a_trace_there_and_the_pod_continues_it(traced, receiver):
    gateway, _ = traced
    receiver.clear()
    client = OIPClient(gateway.grpc_port)
    resp = client.call("ModelInfer", infer_request("digits", {"data": digits_data.to_blob(IMAGES[5:6])}))
    assert int(np.argmax(output(resp, "prob"))) == LABELS[5]
    spans = one_trace(receiver)
    name = "inference.GRPCInferenceService/ModelInfer"
    check_linked(spans, "", "grpc", name, name)  # no client traceparent: the gateway's span is the root
    by = {(s.service, s.name): s for s in spans}
    assert by["caffeserve-gateway", name].attributes["caffeserve.status_code"] == "OK"
    assert by["caffeserve-server", name].attributes["rpc.system"] == "grpc"


def test_a_clients_unsampled_traceparent_records_nothing_and_the_request_is_served(traced, receiver):
    gateway, _ = traced
    receiver.clear()
    trace_id = secrets.token_hex(16)
    client = OIPClient(gateway.grpc_port)
    resp = client.call("ModelInfer", infer_request("digits", {"data": digits_data.to_blob(IMAGES[7:8])}),
                       metadata=(("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-00"),))
    assert int(np.argmax(output(resp, "prob"))) == LABELS[7]
    status, body = _post(gateway.url, 8, None)  # a sampled request after it: its spans arrive, the other's never
    assert status == 200
    one_trace(receiver)
    assert receiver.trace(trace_id) == []


def test_a_failed_request_is_an_error_span_and_the_server_keeps_serving(traced, receiver):
    gateway, server = traced
    receiver.clear()
    trace_id = secrets.token_hex(16)
    status, body = _post(gateway.url, 0, f"00-{trace_id}-{secrets.token_hex(8)}-01",
                         payload={"inputs": [{"name": "data", "shape": [1, 1, 8, 9], "datatype": "FP32",
                                              "data": [0.0] * 72}]})
    assert status == 400 and "shape" in body["error"]
    spans = receiver.wait_for(lambda s: {"caffeserve-gateway", "caffeserve-server"} <= {
        x.service for x in s if x.trace_id == trace_id and x.kind == "SERVER"})
    srv = next(s for s in spans if s.trace_id == trace_id and s.service == "caffeserve-server"
               and s.name not in SERVER_PHASES)
    assert srv.attributes["http.response.status_code"] == 400 and srv.status == "UNSET"  # a client's error
    assert "caffeserve.batch_size" not in srv.attributes  # it never reached the model
    status, body = _post(gateway.url, 1, None)
    assert status == 200 and predicted(body) == LABELS[1]


def _post(url: str, i: int, traceparent: str | None, payload: dict | None = None):
    headers = {"Content-Type": "application/json"}
    if traceparent:
        headers["traceparent"] = traceparent
    status, _, data = http("POST", url + "/v2/models/digits/infer", json.dumps(payload or infer_payload(i)).encode(),
                           headers)
    return status, json.loads(data)


def test_local_mode_traces_its_gateway_and_replicas_when_the_environment_names_an_endpoint(monkeypatch):
    with OTLPReceiver() as r:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint)  # inherited by `up` and its servers
        for k, v in FAST_EXPORT.items():
            monkeypatch.setenv(k, v)
        up = UpProcess(str(DIGITS_DIR / "service.yaml"))
        try:
            up.wait_ready()
            trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
            status, body = _post(up.url, 4, f"00-{trace_id}-{client_span}-01")
            assert status == 200 and predicted(body) == LABELS[4]
            spans = one_trace(r, trace_id)
            name = "POST /v2/models/digits/infer"
            check_linked(spans, client_span, "rest", name, name)
            assert up.terminate() == 0
        finally:
            up.kill()


def test_where_the_endpoint_comes_from():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    assert endpoint(None, {}) is None  # off by default
    assert endpoint(None, env) == "http://collector:4318/v1/traces"
    assert endpoint("http://mine:4318", env) == "http://mine:4318/v1/traces"  # the flag or config wins
    assert endpoint(None, {**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x"}) == "http://t:1/x"
    assert endpoint("http://mine:4318", {"OTEL_SDK_DISABLED": "true"}) is None
    assert traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"


def test_a_server_without_an_endpoint_sends_nothing_and_a_bad_endpoint_is_refused_naming_the_field(tmp_path):
    with OTLPReceiver() as r:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        with ServerProcess(digits_config(), tmp_path, env={**env, **FAST_EXPORT}) as server:
            assert http_json("POST", server.url + "/v2/models/digits/infer", infer_payload(2))[0] == 200
        assert r.spans == [] and r.bad == []
    bad = ServerProcess(digits_config(tracing={"endpoint": "collector:4318"}), tmp_path)
    with pytest.raises(RuntimeError, match=r"tracing\.endpoint"):
        bad.start(timeout=30)
    assert bad.proc is not None and bad.proc.returncode == 2


def test_grpc_status_is_on_the_gateways_span_for_an_unknown_model(traced, receiver):
    gateway, _ = traced
    receiver.clear()
    trace_id = secrets.token_hex(16)
    client = OIPClient(gateway.grpc_port)
    with pytest.raises(grpc.RpcError) as err:
        client.call("ModelInfer", infer_request("nope", {"data": np.zeros((1, 1, 8, 8), np.float32)}),
                    metadata=(("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"),))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    spans = receiver.wait_for(lambda s: any(x.trace_id == trace_id and x.kind == "SERVER" for x in s))
    root = next(s for s in spans if s.trace_id == trace_id and s.kind == "SERVER")
    assert root.attributes["caffeserve.status_code"] == "NOT_FOUND" and root.attributes["caffeserve.model"] == "nope"

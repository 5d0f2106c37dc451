"""Bearer tokens on the gateway (`--auth tokens`: the API server's static token file format) and the
admin calls: off by default, on for an admin credential only. What a client sees: 401 / UNAUTHENTICATED
and 403 / PERMISSION_DENIED with a message, answers with a good token, health open to probes, and
the refusals counted. TokenReview (ServiceAccount tokens) is tested against a real API server in
tests/cluster/test_gateway_tokenreview.py."""

from __future__ import annotations

import json
import subprocess
import time

import grpc
import numpy as np
import pytest

from caffe_testing.digits import digits_data
from caffe_testing.gateway import IMAGES, LABELS, GatewayProcess, infer_payload, metric, predicted, static
from caffe_testing.grpc import OIPClient, infer_request
from caffe_testing.servers import CAFFESERVE, http
from inference_server.grpc import messages as pb

TOKENS = """\
# token,user,uid,"groups"
alice-token,alice,1,"team-a,staff"
bob-token,bob,2,team-b
root-token,root,3,"admins"
"""
ADMIN_CALL = "/v2/repository/models/digits/load"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def infer(g: GatewayProcess, headers: dict | None = None, i: int = 0):
    status, _, body = http("POST", g.url + "/v2/models/digits/infer", json.dumps(infer_payload(i)).encode(),
                           headers or {"Content-Type": "application/json"})
    return status, json.loads(body)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens.csv"
    path.write_text(TOKENS)
    return path


@pytest.fixture(scope="module")
def secured(grpc_servers, token_file):
    with GatewayProcess("--static", static("digits", *grpc_servers), "--auth", "tokens", "--auth-token-file",
                        str(token_file), "--auth-groups", "team-a,admins", "--admin-api",
                        "--admin-groups", "admins") as g:
        yield g


def test_rest_needs_a_known_allowed_token(secured):
    status, body = infer(secured)
    assert status == 401 and "Authorization: Bearer" in body["error"]
    status, body = infer(secured, bearer("guessed"))
    assert status == 401 and body["error"] == "invalid token"
    status, body = infer(secured, bearer("bob-token"))  # known, but not in --auth-groups
    assert status == 403 and body["error"] == "'bob' may not call this gateway"
    status, body = infer(secured, bearer("alice-token"), 3)
    assert status == 200 and predicted(body) == LABELS[3]
    assert http("GET", secured.url + "/v2/models/digits")[0] == 401  # metadata too, not only infer
    status, headers, _ = http("GET", secured.url + "/v2")
    assert status == 401 and {k.lower(): v for k, v in headers.items()}["www-authenticate"].startswith("Bearer")


def test_health_and_metrics_stay_open(secured):
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
        assert http("GET", secured.url + path)[0] == 200, path


def test_grpc_needs_a_known_allowed_token(secured):
    client = OIPClient(secured.grpc_port)
    x = digits_data.to_blob(IMAGES[:2]).astype(np.float32)
    request = infer_request("digits", {"data": x})
    try:
        assert client.call("ServerReady", pb.ServerReadyRequest()).ready  # health: no token needed
        e = client.error("ModelInfer", request)
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in e.details()
        e = client.error("ModelInfer", request, metadata=(("authorization", "Bearer guessed"),))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and e.details() == "invalid token"
        e = client.error("ModelMetadata", pb.ModelMetadataRequest(name="digits"),
                         metadata=(("authorization", "Bearer bob-token"),))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and e.details() == "'bob' may not call this gateway"
        reply = client.infer(request, metadata=(("authorization", "Bearer alice-token"),))
        probs = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, -1)
        assert list(probs.argmax(1)) == list(LABELS[:2])
    finally:
        client.close()


def test_refusals_are_counted_by_protocol_and_code(secured):
    before = {(p, c): metric(secured.url, "caffeserve_gateway_auth_refusals_total", protocol=p, code=c)
              for p in ("http", "grpc") for c in ("401", "403")}
    infer(secured)
    infer(secured, bearer("bob-token"))
    client = OIPClient(secured.grpc_port)
    try:
        client.error("ModelReady", pb.ModelReadyRequest(name="digits"))
    finally:
        client.close()
    after = {k: metric(secured.url, "caffeserve_gateway_auth_refusals_total", protocol=k[0], code=k[1])
             for k in before}
    assert {k: after[k] - before[k] for k in before} == {
        ("http", "401"): 1, ("http", "403"): 1, ("grpc", "401"): 1, ("grpc", "403"): 0}


def test_admin_calls_need_an_admin(secured):
    status, _, raw = http("POST", secured.url + ADMIN_CALL, b"{}", bearer("alice-token"))
    assert status == 403 and json.loads(raw)["error"] == "'alice' may not call the admin API"
    assert http("POST", secured.url + ADMIN_CALL, b"{}")[0] == 401
    # an admin passes the guard: what answers is the route itself (here: a model the gateway does not know)
    status, _, raw = http("POST", secured.url + ADMIN_CALL, b"{}", bearer("root-token"))
    assert status not in (401, 403), raw
    client = OIPClient(secured.grpc_port)
    try:
        for token, code in (("alice-token", grpc.StatusCode.PERMISSION_DENIED),
                            ("root-token", grpc.StatusCode.NOT_FOUND)):
            with pytest.raises(grpc.RpcError) as e:
                client.channel.unary_unary(f"/{pb.SERVICE}/RepositoryModelLoad")(
                    b"", timeout=10, metadata=(("authorization", f"Bearer {token}"),))
            assert e.value.code() == code, (token, e.value.details())
    finally:
        client.close()


def test_the_admin_api_is_off_by_default(gateway):
    """A gateway started with no security flag: model calls open as before, every admin call 403."""
    status, body = infer(gateway)
    assert status == 200
    for path in (ADMIN_CALL, "/v2/repository/models/digits/unload", "/v2/logging", "/v2/trace/setting"):
        status, _, raw = http("POST", gateway.url + path, b"{}", {"Content-Type": "application/json"})
        assert status == 403 and json.loads(raw)["error"] == "the admin API is off on this gateway (--admin-api)"
    client = OIPClient(gateway.grpc_port)
    try:
        for method in ("RepositoryModelLoad", "RepositoryModelUnload", "LogSettings", "TraceSetting"):
            with pytest.raises(grpc.RpcError) as e:
                client.channel.unary_unary(f"/{pb.SERVICE}/{method}")(b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "--admin-api" in e.value.details()
        assert client.call("ServerLive", pb.ServerLiveRequest()).live
    finally:
        client.close()


def test_a_rotated_token_file_is_read_again(grpc_servers, tmp_path):
    tokens = tmp_path / "tokens.csv"
    tokens.write_text("old-token,carol,1\n")
    with GatewayProcess("--static", static("digits", *grpc_servers), "--no-grpc", "--auth", "tokens",
                        "--auth-token-file", str(tokens)) as g:
        assert infer(g, bearer("old-token"))[0] == 200
        replaced = tmp_path / "tokens.new"
        replaced.write_text("new-token,carol,1\n")
        replaced.rename(tokens)  # atomic, as a Secret volume's swap
        deadline = time.monotonic() + 15
        while infer(g, bearer("new-token"))[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert infer(g, bearer("new-token"))[0] == 200
        assert infer(g, bearer("old-token"))[0] == 401


@pytest.mark.parametrize("flags, message", [
    (["--admin-api", "--admin-groups", "admins"], "--admin-api needs authentication"),
    (["--auth", "tokens"], "--auth tokens needs --auth-token-file"),
    (["--auth", "tokens", "--auth-token-file", "/nonexistent/tokens.csv"], "/nonexistent/tokens.csv"),
])
def test_flags_that_do_not_fit_stop_the_start_with_a_message(flags, message):
    run = subprocess.run([*CAFFESERVE, "gateway", "--static", "m=http://127.0.0.1:1", "--port", "0", "--no-grpc",
                          *flags], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr, run.stderr

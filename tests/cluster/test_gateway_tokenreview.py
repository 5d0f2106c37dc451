"""The gateway's `--auth tokenreview` against a real API server (caffe_testing/controlplane.py), over TLS:
a ServiceAccount's token (TokenRequest, as `kubectl create token` and a pod's projected token) gets
answers over REST and gRPC from unchanged tritonclients with `ssl=True`; no token 401 /
UNAUTHENTICATED; a ServiceAccount of another namespace 403 / PERMISSION_DENIED; a token whose
ServiceAccount is deleted stops working within the cache time; the cache spares the API server
(its audit log counts the reviews). The gateway acts as its own user, bound to system:auth-delegator
as the chart binds its ServiceAccount."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from caffe_gateway.auth import REVIEW_TTL_S
from caffe_testing.controlplane import ControlPlane
from caffe_testing.digits import DIGITS_DIR, digits_data
from caffe_testing.gateway import IMAGES, LABELS, GatewayProcess, infer_payload, predicted, static
from caffe_testing.grpc import OIPClient, grpc_server, infer_request
from caffe_testing.pki import CA, write_secret_volume
from caffe_testing.servers import http
from inference_server.grpc import messages as pb

pytestmark = pytest.mark.timeout(300)
CLIENT = Path(__file__).parents[1] / "gateway" / "clients" / "triton_secure.py"
GATEWAY_USER = "caffe-serving-gateway"


@pytest.fixture(scope="module")
def cluster():
    with ControlPlane() as cp:
        for ns in ("team-a", "team-b"):
            cp.create_namespace(ns)
            cp.kubectl("create", "serviceaccount", "client", "-n", ns)
        cp.kubectl("create", "serviceaccount", "leaving", "-n", "team-a")
        cp.kubectl("create", "clusterrolebinding", "gateway-auth-delegator", "--clusterrole=system:auth-delegator",
                   f"--user={GATEWAY_USER}")
        yield cp


def token(cp: ControlPlane, namespace: str, sa: str) -> str:
    return cp.kubectl("create", "token", sa, "-n", namespace).stdout.strip()


@pytest.fixture(scope="module")
def gateway(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokenreview")
    ca = CA(tmp / "ca")
    crt, key = ca.issue("gateway", "gateway", server=True, hosts=("127.0.0.1",))
    write_secret_volume(tmp / "tls", {"tls.crt": crt.read_bytes(), "tls.key": key.read_bytes()})
    with grpc_server(DIGITS_DIR / "server.yaml", tmp) as server, GatewayProcess(
            "--static", static("digits", server), "--tls-dir", str(tmp / "tls"),
            "--auth", "tokenreview", "--auth-groups", "system:serviceaccounts:team-a",
            "--kubeconfig", str(cluster.kubeconfig_for(GATEWAY_USER)), tls_ca=ca.cert_path) as g:
        yield g, ca


def infer(g: GatewayProcess, bearer: str | None, i: int = 0):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {bearer}"} if bearer else {})}
    status, _, body = http("POST", g.url + "/v2/models/digits/infer", json.dumps(infer_payload(i)).encode(), headers,
                           context=g.context)
    return status, json.loads(body)


def test_a_service_account_token_gets_answers_over_tls_from_tritonclient(cluster, gateway, tmp_path):
    g, ca = gateway
    cases = tmp_path / "cases.npz"
    np.savez(cases, x=digits_data.to_blob(IMAGES[:6]).astype(np.float32), labels=LABELS[:6])
    run = subprocess.run([sys.executable, str(CLIENT), str(g.port), str(g.grpc_port), str(ca.cert_path),
                          token(cluster, "team-a", "client"), str(cases)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_who_is_refused_and_how(cluster, gateway):
    g, ca = gateway
    status, body = infer(g, None)
    assert status == 401 and "Authorization: Bearer" in body["error"]
    status, body = infer(g, "not-a-token")
    assert status == 401 and body["error"].startswith("invalid token")
    other = token(cluster, "team-b", "client")
    status, body = infer(g, other)
    assert status == 403 and body["error"] == "'system:serviceaccount:team-b:client' may not call this gateway"
    client = OIPClient(g.grpc_port, root_certificates=ca.cert_path.read_bytes())
    try:
        request = infer_request("digits", {"data": digits_data.to_blob(IMAGES[:1]).astype(np.float32)})
        assert client.error("ModelInfer", request).code() == grpc.StatusCode.UNAUTHENTICATED
        e = client.error("ModelInfer", request, metadata=(("authorization", f"Bearer {other}"),))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert client.call("ServerReady", pb.ServerReadyRequest()).ready  # health: open
    finally:
        client.close()
    assert http("GET", g.url + "/v2/health/ready", context=g.context)[0] == 200


def test_answers_are_cached_and_a_deleted_service_account_is_refused_within_the_cache_time(cluster, gateway):
    g, _ = gateway
    leaving = token(cluster, "team-a", "leaving")
    reviews_before = len(_reviews(cluster))
    for i in range(20):
        status, body = infer(g, leaving, i)
        assert status == 200 and predicted(body) == LABELS[i]
    assert len(_reviews(cluster)) - reviews_before <= 2  # one per token per REVIEW_TTL_S, not one per call
    cluster.kubectl("delete", "serviceaccount", "leaving", "-n", "team-a")
    deleted = time.monotonic()
    while infer(g, leaving)[0] == 200 and time.monotonic() - deleted < REVIEW_TTL_S + 10:
        time.sleep(0.5)
    status, body = infer(g, leaving)
    assert status == 401 and body["error"].startswith("invalid token"), body
    assert time.monotonic() - deleted <= REVIEW_TTL_S + 10


def _reviews(cp: ControlPlane) -> list[dict]:
    time.sleep(0.5)  # the audit log is written as requests finish
    return [e for e in cp.audit_events(GATEWAY_USER) if (e.get("objectRef") or {}).get("resource") == "tokenreviews"]


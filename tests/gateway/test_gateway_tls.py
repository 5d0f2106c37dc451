"""TLS on the gateway's REST and gRPC listeners (`--tls-dir`), with real clients: curl, urllib,
tritonclient (http and grpc, `ssl=True`), grpc with root certificates; and the certificate
replaced the way the kubelet replaces a Secret volume, picked up without a restart."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from caffe_testing.digits import digits_data
from caffe_testing.gateway import IMAGES, LABELS, GatewayProcess, infer_payload, predicted, static
from caffe_testing.grpc import OIPClient, infer_request
from caffe_testing.pki import CA, write_secret_volume
from caffe_testing.servers import CAFFESERVE, http
from inference_server.grpc import messages as pb

CLIENT = Path(__file__).parent / "clients" / "triton_secure.py"
HOSTS = ("127.0.0.1", "localhost")


def issue(ca: CA, name: str) -> dict[str, bytes]:
    crt, key = ca.issue(name, "caffe-serving-gateway", server=True, hosts=HOSTS)
    return {"tls.crt": crt.read_bytes(), "tls.key": key.read_bytes()}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    ca = CA(root / "ca")
    volume = root / "secret"
    write_secret_volume(volume, issue(ca, "gateway"))
    return ca, volume


@pytest.fixture(scope="module")
def tls_gateway(grpc_servers, pki):
    ca, volume = pki
    args = ("--static", static("digits", *grpc_servers), "--tls-dir", str(volume))
    with GatewayProcess(*args, tls_ca=ca.cert_path) as g:
        yield g


def served_cert(port: int) -> bytes:
    """The DER certificate a new TLS connection to `port` is given (not verified)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, ctx.wrap_socket(s) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def test_curl_gets_a_prediction_over_https_and_plain_http_gets_nothing(tls_gateway, pki):
    ca, _ = pki
    out = subprocess.run(["curl", "-sS", "--cacert", str(ca.cert_path), "-H", "Content-Type: application/json",
                          "--data-binary", json.dumps(infer_payload(0)), f"{tls_gateway.url}/v2/models/digits/infer"],
                         capture_output=True, timeout=60, check=True)
    assert predicted(json.loads(out.stdout)) == LABELS[0]
    # a client that does not trust the CA refuses the connection
    untrusted = subprocess.run(["curl", "-sS", f"{tls_gateway.url}/v2/health/ready"], capture_output=True, timeout=30)
    assert untrusted.returncode == 60, untrusted.stderr  # curl: peer certificate cannot be authenticated
    # plain HTTP to the TLS port gets no HTTP answer (the TLS handshake fails)
    with pytest.raises(OSError):
        http("GET", f"http://127.0.0.1:{tls_gateway.port}/v2/health/ready", timeout=5)


def test_grpc_with_root_certificates(tls_gateway, pki):
    ca, _ = pki
    client = OIPClient(tls_gateway.grpc_port, root_certificates=ca.cert_path.read_bytes())
    try:
        assert client.call("ServerReady", pb.ServerReadyRequest()).ready
        x = digits_data.to_blob(IMAGES[:4]).astype(np.float32)
        reply = client.infer(infer_request("digits", {"data": x}))
        probs = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(4, -1)
        assert list(probs.argmax(1)) == list(LABELS[:4])
    finally:
        client.close()
    # a plain-text channel to the TLS port never gets an answer
    plain = OIPClient(tls_gateway.grpc_port)
    try:
        assert plain.error("ServerLive", pb.ServerLiveRequest(), timeout=5).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        plain.close()


def test_tritonclient_http_and_grpc_with_ssl(tls_gateway, pki, tmp_path):
    ca, _ = pki
    cases = tmp_path / "cases.npz"
    np.savez(cases, x=digits_data.to_blob(IMAGES[:8]).astype(np.float32), labels=LABELS[:8])
    run = subprocess.run([sys.executable, str(CLIENT), str(tls_gateway.port), str(tls_gateway.grpc_port),
                          str(ca.cert_path), "", str(cases)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_renewed_certificate_is_served_without_a_restart(grpc_servers, tmp_path):
    """The Secret renewed (cert-manager), here by a new CA: new connections get the new certificate
    within the poll interval, on REST and gRPC; the gateway keeps its process and its answers."""
    old_ca, new_ca = CA(tmp_path / "old", cn="old-ca"), CA(tmp_path / "new", cn="new-ca")
    volume = tmp_path / "secret"
    write_secret_volume(volume, issue(old_ca, "gateway"))
    with GatewayProcess("--static", static("digits", *grpc_servers), "--tls-dir", str(volume),
                        tls_ca=old_ca.cert_path) as g:
        pid, before = g.proc.pid, served_cert(g.port)
        write_secret_volume(volume, issue(new_ca, "gateway"))
        deadline = time.monotonic() + 20
        while served_cert(g.port) == before and time.monotonic() < deadline:
            time.sleep(0.2)
        new_ctx = ssl.create_default_context(cafile=str(new_ca.cert_path))
        status, _, body = http("POST", g.url + "/v2/models/digits/infer", json.dumps(infer_payload(1)).encode(),
                               {"Content-Type": "application/json"}, context=new_ctx)
        assert status == 200 and predicted(json.loads(body)) == LABELS[1]
        with pytest.raises(OSError):  # the old CA no longer vouches for what is served
            http("GET", g.url + "/v2/health/ready", context=ssl.create_default_context(cafile=str(old_ca.cert_path)))
        client = OIPClient(g.grpc_port, root_certificates=new_ca.cert_path.read_bytes())
        try:
            assert client.call("ServerReady", pb.ServerReadyRequest()).ready
        finally:
            client.close()
        assert g.proc.pid == pid and g.proc.poll() is None


def test_a_broken_renewal_keeps_the_last_good_certificate(grpc_servers, tmp_path):
    ca = CA(tmp_path / "ca")
    volume = tmp_path / "secret"
    good = issue(ca, "gateway")
    write_secret_volume(volume, good)
    args = ("--static", static("digits", *grpc_servers), "--tls-dir", str(volume))
    with GatewayProcess(*args, tls_ca=ca.cert_path) as g:
        other = issue(ca, "other")
        write_secret_volume(volume, {"tls.crt": good["tls.crt"], "tls.key": other["tls.key"]})  # key mismatch
        time.sleep(3)  # beyond the poll interval
        assert http("GET", g.url + "/v2/health/ready", context=g.context)[0] == 200
        assert "do not load" in g.output()


def test_a_certificate_that_does_not_load_stops_the_start_with_a_message(tmp_path):
    (tmp_path / "tls.crt").write_text("not a certificate")
    (tmp_path / "tls.key").write_text("not a key")
    run = subprocess.run([*CAFFESERVE, "gateway", "--static", "m=http://127.0.0.1:1", "--port", "0", "--no-grpc",
                          "--tls-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and f"--tls-dir {tmp_path}: cannot load" in run.stderr, run.stderr

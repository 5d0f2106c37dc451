"""TLS to the model servers: `caffeserve serve --tls-dir` (REST and gRPC), and the gateway reaching them over
it (`--upstream-ca`), each pod's certificate checked against the CA and the one name every pod's
certificate carries (`caffe-model-server`), not the pod's address. Real servers, real clients, certificates
this test makes (caffe_testing/pki.py) in a Secret volume's layout."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from caffe_http.tls import POD_SERVER_NAME
from caffe_testing.digits import digits_data
from caffe_testing.gateway import IMAGES, LABELS, GatewayProcess, digits_config, infer_payload, predicted, static
from caffe_testing.grpc import OIPClient, grpc_server, infer_request
from caffe_testing.pki import CA, write_secret_volume
from caffe_testing.servers import CAFFESERVE, http, http_json
from inference_server.grpc import messages as pb


def pod_secret(ca: CA, folder, name: str = POD_SERVER_NAME):
    """A kubernetes.io/tls Secret volume for the model pods, as cert-manager writes it (with ca.crt)."""
    crt, key = ca.issue(name, name, server=True, hosts=[name])
    write_secret_volume(folder, {"tls.crt": crt.read_bytes(), "tls.key": key.read_bytes(),
                                 "ca.crt": ca.cert_path.read_bytes()})
    return folder


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pod-tls")
    ca = CA(root / "ca")
    return ca, pod_secret(ca, root / "secret")


@pytest.fixture(scope="module")
def tls_servers(pki, tmp_path_factory):
    ca, volume = pki
    tmp = tmp_path_factory.mktemp("tls-servers")
    kw = {"args": ["--tls-dir", str(volume)], "tls_ca": ca.cert_path, "tls_name": POD_SERVER_NAME}
    with grpc_server(digits_config(), tmp, **kw) as a, grpc_server(digits_config(), tmp, **kw) as b:
        yield a, b


def test_a_server_with_tls_dir_answers_rest_and_grpc_over_tls_only(tls_servers, pki):
    ca, _ = pki
    server = tls_servers[0]
    status, body = http_json("POST", server.url + "/v2/models/digits/infer", infer_payload(3), context=server.context)
    assert status == 200 and predicted(body) == LABELS[3]
    out = subprocess.run(["curl", "-sS", "--cacert", str(ca.cert_path), "--resolve",
                          f"{POD_SERVER_NAME}:{server.port}:127.0.0.1",
                          f"https://{POD_SERVER_NAME}:{server.port}/v2/health/ready"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and json.loads(out.stdout) == {"ready": True}, out.stderr
    with pytest.raises(OSError):  # plain HTTP gets no HTTP answer
        http("GET", f"http://127.0.0.1:{server.port}/v2/health/ready", timeout=5)
    client = OIPClient(server.grpc_port, root_certificates=ca.cert_path.read_bytes(), target_name=POD_SERVER_NAME)
    try:
        x = digits_data.to_blob(IMAGES[:4]).astype(np.float32)
        probs = np.frombuffer(client.infer(infer_request("digits", {"data": x})).raw_output_contents[0], np.float32)
        assert list(probs.reshape(4, -1).argmax(1)) == list(LABELS[:4])
    finally:
        client.close()


def test_the_gateway_reaches_tls_servers_with_the_ca_and_refuses_servers_it_cannot_trust(tls_servers, pki, tmp_path):
    ca, _ = pki
    servers = static("digits", *tls_servers)
    assert servers.count("https://") == 2
    with GatewayProcess("--static", servers, "--upstream-ca", str(ca.cert_path)) as g:
        for i in range(4):  # both servers, REST
            status, body = http_json("POST", g.url + "/v2/models/digits/infer", infer_payload(i))
            assert status == 200 and predicted(body) == LABELS[i], body
        client = OIPClient(g.grpc_port)  # gRPC, forwarded over TLS (h2)
        try:
            x = digits_data.to_blob(IMAGES[:2]).astype(np.float32)
            probs = np.frombuffer(client.infer(infer_request("digits", {"data": x})).raw_output_contents[0],
                                  np.float32)
            assert list(probs.reshape(2, -1).argmax(1)) == list(LABELS[:2])
            assert client.call("ModelReady", pb.ModelReadyRequest(name="digits")).ready
        finally:
            client.close()

    # another CA, or another name than the certificates carry: no request reaches a server, and the answer says why
    other = CA(tmp_path / "other")
    for args in (("--upstream-ca", str(other.cert_path)),
                 ("--upstream-ca", str(ca.cert_path), "--upstream-server-name", "someone-else")):
        with GatewayProcess("--static", servers, "--max-wait", "2", *args) as g:
            status, body = http_json("POST", g.url + "/v2/models/digits/infer", infer_payload(0))
            assert status in (502, 503) and "certificate verify failed" in body["error"], body


@pytest.mark.parametrize("args,message", [
    (("--static", "digits=https://127.0.0.1:1"), "an https:// server in --static needs --upstream-ca"),
    (("--static", "digits=http://127.0.0.1:1", "--upstream-ca", "CA"), "write https:// in --static"),
    (("--static", "digits=127.0.0.1:1", "--upstream-ca", "CA"), "write https:// in --static"),  # bare: http
    (("--static", "digits=https://127.0.0.1:1", "--upstream-ca", "/nonexistent/ca.crt"), "cannot load it"),
])
def test_upstream_tls_flags_that_do_not_fit_stop_the_gateway_with_why(args, message, pki):
    ca, _ = pki
    args = tuple(str(ca.cert_path) if a == "CA" else a for a in args)
    run = subprocess.run([*CAFFESERVE, "gateway", "--port", "0", *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr, run.stderr


def test_the_grpcio_transport_forwards_over_tls_too(tls_servers, pki):
    """CAFFESERVE_GRPC_TRANSPORT=grpcio: the gateway's gRPC runs on grpc.aio, its channel to the servers a
    secure one with the same CA and name."""
    ca, _ = pki
    with GatewayProcess("--static", static("digits", *tls_servers), "--upstream-ca", str(ca.cert_path),
                        env={"CAFFESERVE_GRPC_TRANSPORT": "grpcio"}) as g:
        client = OIPClient(g.grpc_port)
        try:
            x = digits_data.to_blob(IMAGES[4:6]).astype(np.float32)
            probs = np.frombuffer(client.infer(infer_request("digits", {"data": x})).raw_output_contents[0],
                                  np.float32)
            assert list(probs.reshape(2, -1).argmax(1)) == list(LABELS[4:6])
        finally:
            client.close()

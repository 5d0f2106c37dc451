"""`caffeserve up` with the gateway's security flags (docs/security.md): TLS on REST and gRPC and
bearer tokens, as `caffeserve gateway` takes them; a flag that needs a cluster is refused clearly."""

from __future__ import annotations

import json
import ssl
import subprocess

import grpc
import numpy as np

from caffe_testing.digits import DIGITS_DIR, digits_data
from caffe_testing.gateway import IMAGES, LABELS, infer_payload, predicted
from caffe_testing.grpc import OIPClient, infer_request, output
from caffe_testing.pki import CA, write_secret_volume
from caffe_testing.servers import CAFFESERVE, REPO, http

SERVICE = DIGITS_DIR / "service.yaml"


def test_up_serves_over_tls_and_asks_for_a_token(tmp_path, up_processes):
    ca = CA(tmp_path / "ca")
    crt, key = ca.issue("gateway", "caffe-serving-gateway", server=True, hosts=["127.0.0.1", "localhost"])
    volume = tmp_path / "secret"
    write_secret_volume(volume, {"tls.crt": crt.read_bytes(), "tls.key": key.read_bytes()})
    tokens = tmp_path / "tokens.csv"
    tokens.write_text('alice-token,alice,1,"team-a"\n')
    up = up_processes(str(SERVICE), "--replicas", "1", "--tls-dir", str(volume), "--auth", "tokens",
                      "--auth-token-file", str(tokens)).wait_ready()
    assert up.url.startswith("https://") and f"gateway: {up.url}" in up.output

    trusted = ssl.create_default_context(cafile=str(ca.cert_path))
    body = json.dumps(infer_payload(2)).encode()
    status, _, answer = http("POST", up.url + "/v2/models/digits/infer", body, {"Content-Type": "application/json"},
                             context=trusted)
    assert status == 401 and "Authorization: Bearer" in json.loads(answer)["error"]
    status, _, answer = http("POST", up.url + "/v2/models/digits/infer", body,
                             {"Content-Type": "application/json", "Authorization": "Bearer alice-token"},
                             context=trusted)
    assert status == 200 and predicted(json.loads(answer)) == LABELS[2]
    untrusted = subprocess.run(["curl", "-sS", f"{up.url}/v2/health/ready"], capture_output=True, timeout=30)
    assert untrusted.returncode == 60, untrusted.stderr  # the peer's certificate cannot be authenticated

    client = OIPClient(up.grpc_port, root_certificates=ca.cert_path.read_bytes())
    try:
        request = infer_request("digits", {"data": digits_data.to_blob(IMAGES[3:4])})
        assert client.error("ModelInfer", request).code() == grpc.StatusCode.UNAUTHENTICATED
        answer = client.infer(request, metadata=(("authorization", "Bearer alice-token"),))
        assert int(np.argmax(output(answer, "prob"))) == LABELS[3]
    finally:
        client.close()
    assert up.terminate() == 0


def test_up_refuses_tokenreview_and_a_tls_folder_without_a_pair(tmp_path):
    run = subprocess.run(CAFFESERVE + ["up", str(SERVICE), "--auth", "tokenreview"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "--auth tokenreview needs the API server" in run.stderr, run.stderr
    run = subprocess.run(CAFFESERVE + ["up", str(SERVICE), "--tls-dir", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and f"--tls-dir {tmp_path}: cannot load tls.crt/tls.key" in run.stderr, run.stderr

"""Local mode: `caffeserve up MANIFEST` and `caffeserve demo MANIFEST`, as real processes.

The servers are real `caffeserve serve` processes with the digits model; model files come from
the example folder (the PVC rule), from a real HTTP server on loopback (source.url), or from a
ConfigMap in the same file.
"""

from __future__ import annotations

import base64
import functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
import os
import re
import subprocess
import threading
import time

import numpy as np
import orjson
import psutil
import yaml

from caffe_testing.digits import DIGITS_DIR, digits_data
from caffe_testing.grpc import OIPClient, infer_request, output
from caffe_testing.servers import CAFFESERVE, REPO, http, http_json

SERVICE = DIGITS_DIR / "service.yaml"
IMAGES, LABELS = digits_data.held_out()


def classify(url: str, i: int) -> str:
    status, body = http_json("POST", url + "/v2/models/digits/infer", {
        "inputs": [{"name": "data", "shape": [1], "datatype": "BYTES",
                    "data": [base64.b64encode(digits_data.render_png(IMAGES[i], 32)).decode()]}],
        "outputs": [{"name": "prob", "parameters": {"classification": 1}}],
    })
    assert status == 200, body
    return body["outputs"][0]["data"][0].split(":")[2]


def gone(procs: list[psutil.Process], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs):
            return True
        time.sleep(0.05)
    return False


def test_up_serves_the_digits_manifest_with_two_replicas_and_sigterm_leaves_no_process(up_processes):
    up = up_processes(str(SERVICE)).wait_ready()
    servers = up.servers()
    assert len(servers) == 2 and all("serve" in p.cmdline() for p in servers)
    assert re.search(r"digits: 2 replica\(s\) ready", up.output)
    assert f"gateway: {up.url}" in up.output

    answers = [classify(up.url, i) for i in range(20)]
    assert sum(a == str(LABELS[i]) for i, a in enumerate(answers)) >= 19
    assert http_json("GET", up.url + "/v2/models") == (200, {"models": ["digits"]})
    text = http("GET", up.url + "/metrics")[2].decode()
    assert 'caffeserve_gateway_endpoints{model="digits",state="ready"} 2.0' in text

    # gRPC through the same gateway, spread over both replicas (each on a gRPC port of its own)
    assert f"gateway gRPC: 127.0.0.1:{up.grpc_port}" in up.output
    assert len(set(re.findall(r"\(gRPC :(\d+)\)", up.output))) == 2
    client = OIPClient(up.grpc_port)
    right = sum(int(np.argmax(output(client.infer(infer_request("digits", {"data": digits_data.to_blob(IMAGES[i:i + 1])})),
                                     "prob"))) == LABELS[i] for i in range(20))
    client.close()
    assert right >= 19
    text = http("GET", up.url + "/metrics")[2].decode()
    assert 'caffeserve_gateway_grpc_requests_total{grpc_code="OK",method="ModelInfer",model="digits"} 20.0' in text

    assert up.terminate() == 0
    assert gone(servers), "server processes left behind after SIGTERM"
    assert "stopping" in up.output


def test_a_replica_that_dies_is_restarted_and_clients_see_no_error(up_processes):
    up = up_processes(str(SERVICE)).wait_ready()
    victim = up.servers()[0]
    victim.kill()
    # requests during the restart go to the other replica (the gateway retries connection failures)
    statuses = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        statuses.append(http("POST", up.url + "/v2/models/digits/infer",
                             orjson.dumps({"inputs": [{"name": "data", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                                       "data": digits_data.to_blob(IMAGES[:1]).ravel().tolist()}]}),
                             {"Content-Type": "application/json"})[0])
        text = http("GET", up.url + "/metrics")[2].decode()
        if 'state="ready"} 2.0' in text and len(up.servers()) == 2 and len(statuses) > 20:
            break
        time.sleep(0.05)
    assert set(statuses) == {200}, statuses
    assert 'caffeserve_gateway_endpoints{model="digits",state="ready"} 2.0' in text, up.output
    assert victim.pid not in {p.pid for p in up.servers()}
    assert "restarting" in up.output
    assert up.terminate() == 0


def test_pvc_root_rule_and_a_wrong_sha256_is_a_clear_error(tmp_path, up_processes):
    manifest = yaml.safe_load(SERVICE.read_text())
    manifest["spec"]["source"]["pvc"] = {"claimName": "models", "path": "digits"}
    claim = tmp_path / "root" / "models" / "digits"
    claim.mkdir(parents=True)
    for f in ("deploy.prototxt", "digits.caffemodel", "labels.txt"):
        (claim / f).write_bytes((DIGITS_DIR / f).read_bytes())
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(manifest))
    up = up_processes(str(path), "--pvc-root", str(tmp_path / "root"), "--replicas", "1").wait_ready()
    assert classify(up.url, 3) == str(LABELS[3])
    assert up.terminate() == 0

    manifest["spec"]["model"]["weightsSha256"] = "0" * 64
    path.write_text(yaml.safe_dump(manifest))
    bad = up_processes(str(path), "--pvc-root", str(tmp_path / "root"), "--replicas", "1")
    assert bad.proc.wait(60) == 1
    bad._reader.join(5)
    assert "sha256" in bad.output and "caffeserve up:" in bad.output, bad.output

    missing = up_processes(str(path), "--replicas", "1")  # default root: the manifest's folder
    assert missing.proc.wait(60) == 2  # a manifest whose files are not there: a configuration error (README)
    missing._reader.join(5)
    assert f"'deploy.prototxt' not found in {tmp_path / 'digits'}" in missing.output, missing.output


def test_url_source_is_downloaded_checked_and_cached(tmp_path, up_processes):
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(DIGITS_DIR))
    handler.log_message = lambda *a: None
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        manifest = yaml.safe_load(SERVICE.read_text())
        manifest["spec"]["source"] = {"url": f"http://127.0.0.1:{files.server_port}/"}
        path = tmp_path / "service.yaml"
        path.write_text(yaml.safe_dump(manifest))
        cache = tmp_path / "cache"
        up = up_processes(str(path), "--cache-dir", str(cache), "--replicas", "1").wait_ready()
        assert classify(up.url, 7) == str(LABELS[7])
        assert "digits.caffemodel downloaded" in up.output
        assert (cache / "digits" / "digits.caffemodel").read_bytes() == (DIGITS_DIR / "digits.caffemodel").read_bytes()
        assert up.terminate() == 0
        # a second start keeps the files whose sha256 matches (a file without one is fetched again)
        again = up_processes(str(path), "--cache-dir", str(cache), "--replicas", "1").wait_ready()
        assert "digits.caffemodel cached" in again.output and "deploy.prototxt cached" in again.output
        assert again.terminate() == 0
    finally:
        files.shutdown()
        files.server_close()


def test_configmap_source_from_the_same_file(tmp_path, up_processes):
    manifest = yaml.safe_load(SERVICE.read_text())
    manifest["spec"]["source"] = {"configMap": {"name": "digits-files"}}
    config_map = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "digits-files"},
        "data": {f: (DIGITS_DIR / f).read_text() for f in ("deploy.prototxt", "labels.txt")},
        "binaryData": {"digits.caffemodel": base64.b64encode((DIGITS_DIR / "digits.caffemodel").read_bytes()).decode()},
    }
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump_all([config_map, manifest]))
    up = up_processes(str(path), "--replicas", "1").wait_ready()
    assert classify(up.url, 11) == str(LABELS[11])
    assert up.terminate() == 0


def test_an_invalid_manifest_names_the_field():
    bad = REPO / "examples" / "digits" / "service.yaml"
    manifest = yaml.safe_load(bad.read_text())
    manifest["spec"]["replicas"] = -1
    proc = subprocess.run(CAFFESERVE + ["up", "/dev/stdin"], input=yaml.safe_dump(manifest).encode(),
                          cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == 2  # as `serve` for an invalid config (README, "Exit codes")
    assert b"spec.replicas" in proc.stderr, proc.stderr


def test_demo_prints_the_predicted_and_the_true_digit_then_stops():
    proc = subprocess.run(CAFFESERVE + ["demo", str(SERVICE), "--index", "5"], cwd=REPO, capture_output=True,
                          timeout=120, env={**os.environ})
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    m = re.search(r"predicted (\d) \(score [0-9.]+\), true digit (\d)", out)
    assert m and m.group(1) == m.group(2) == str(LABELS[5]), out
    assert "gateway and servers stopped" in out

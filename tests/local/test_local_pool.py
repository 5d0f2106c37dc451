"""`caffeserve up --pool MANIFEST`: every CaffeModelService of the file in one many-model server behind the
gateway; each model answers as its own net does; the pool server takes load and unload calls (the gateway,
whose admin API is off, refuses them)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import psutil
import yaml

from caffe_testing.digits import DIGITS_DIR
from caffe_testing.gateway import LABELS, infer_payload, predicted
from caffe_testing.local import UpProcess
from caffe_testing.nets import dense_net, forward, save_net
from caffe_testing.servers import http_json


def service(name: str, prototxt: str, weights: str, path: str, **model) -> dict:
    return {"apiVersion": "caffeserving.io/v1alpha1", "kind": "CaffeModelService", "metadata": {"name": name},
            "spec": {"replicas": 3, "source": {"pvc": {"claimName": "models", "path": path}},
                     "model": {"prototxt": prototxt, "weights": weights, **model},
                     "runtime": {"device": "cpu", "backend": "pycaffe"}}}


def test_a_pool_of_three_manifests_in_one_server(tmp_path):
    shutil.copytree(DIGITS_DIR, tmp_path / "digits")
    nets = {}
    for name, (inputs, outputs, seed) in {"small": (16, 4, 1), "wide": (256, 300, 2)}.items():
        proto, weights = save_net(dense_net(inputs, outputs), tmp_path / name, "net", seed=seed)
        nets[name] = (proto, weights, inputs)
    digits = yaml.safe_load((DIGITS_DIR / "service.yaml").read_text())
    docs = [service("digits", "deploy.prototxt", "digits.caffemodel", "digits",
                    inputs=digits["spec"]["model"]["inputs"], outputs=digits["spec"]["model"]["outputs"]),
            service("small", "net.prototxt", "net.caffemodel", "small"),
            service("wide", "net.prototxt", "net.caffemodel", "wide")]
    manifest = tmp_path / "pool.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    up = UpProcess(str(manifest), "--pool", "--pvc-root", str(tmp_path), "--no-grpc")
    try:
        up.wait_ready(timeout=180)
        assert "pool: 1 replica(s) ready" in up.output and "serving digits, small, wide" in up.output
        servers = [p for p in up.servers() if "serve" in p.cmdline() and "--model-repository" in p.cmdline()]
        assert len(servers) == 1  # one process for the three models (each manifest asked for 3 replicas)
        assert len([p for p in up.servers() if "--config" in p.cmdline()]) == 0

        status, body = http_json("POST", up.url + "/v2/models/digits/infer", infer_payload(3))
        assert status == 200 and predicted(body) == LABELS[3]
        for name, (proto, weights, inputs) in nets.items():
            x = np.linspace(0, 1, inputs, dtype=np.float32).reshape(1, inputs)
            status, body = http_json("POST", f"{up.url}/v2/models/{name}/infer", {"inputs": [
                {"name": "data", "shape": [1, inputs], "datatype": "FP32", "data": x.ravel().tolist()}]})
            assert status == 200, body
            want = forward(proto, weights, {"data": x})["prob"]
            np.testing.assert_allclose(body["outputs"][0]["data"], want.ravel(), rtol=1e-5, atol=1e-6)

        states = {e["name"]: e["state"] for e in http_json("POST", up.url + "/v2/repository/index")[1]}
        assert states == {"digits": "READY", "small": "READY", "wide": "READY"}
        # the pool's server (its address in the banner) takes load and unload calls; the gateway refuses them
        # (admin calls: `caffeserve gateway --admin-api` with tokens, docs/security.md)
        status, body = http_json("POST", up.url + "/v2/repository/models/wide/unload", {})
        assert status == 403 and "--admin-api" in body["error"]
        match = re.search(r"pool: 1 replica\(s\) ready \((http://127\.0\.0\.1:\d+)", up.output)
        assert match is not None, up.output
        pool = match.group(1)
        assert http_json("POST", pool + "/v2/repository/models/wide/unload", {}) == (200, {})
        assert http_json("POST", up.url + "/v2/models/wide/infer", {"inputs": []})[0] == 503
        assert http_json("POST", pool + "/v2/repository/models/wide/load", {}) == (200, {})
        status, body = http_json("POST", up.url + "/v2/models/digits/infer", infer_payload(5))
        assert status == 200 and predicted(body) == LABELS[5]
        assert psutil.pid_exists(servers[0].pid)
    finally:
        assert up.terminate() == 0

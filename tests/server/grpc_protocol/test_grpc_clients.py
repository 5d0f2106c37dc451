"""Clients nobody here wrote work against our gRPC service unchanged: tritonclient.grpc (sync and aio:
health, metadata, infer with raw contents, class_count, errors) and KServe's InferenceGRPCClient
(raw and typed contents, classification).

Each client runs as a script in its own process (tests/server/grpc_protocol/clients/): tritonclient.grpc's and the
kserve SDK's stubs register the same `inference.*` names, and two such definitions in one process fail
with "duplicate symbol" (kserve/kserve#3099). The kserve SDK lives in its own venv (bench/setup_peers.sh;
its dependencies do not fit ours): that test is skipped where the venv is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import caffe
import numpy as np
import pytest
from caffe import layers as L

from caffe_testing.grpc import grpc_server
from caffe_testing.nets import forward, save_net

CLIENTS = Path(__file__).resolve().parent / "clients"
LABELS = ["cat", "dog", "horse", "sea lion", "ship", "truck", "zebra"]
BENCH_VENVS = Path(os.environ.get("BENCH_VENVS", Path.home() / ".cache" / "caffe-serving" / "bench-venvs"))
KSERVE_PYTHON = BENCH_VENVS / "kserve" / "bin" / "python"


def net() -> caffe.NetSpec:
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 6, 6]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3)
    n.relu = L.ReLU(n.conv, in_place=True)
    n.ip = L.InnerProduct(n.conv, num_output=len(LABELS))
    n.prob = L.Softmax(n.ip)
    n.embedding = L.InnerProduct(n.conv, num_output=3)
    return n


@pytest.fixture(scope="module")
def served(tmp_model_dir):
    proto, weights = save_net(net(), tmp_model_dir, "animals", seed=11)
    labels = tmp_model_dir / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    x = np.random.default_rng(1).normal(0, 1, (3, 2, 6, 6)).astype(np.float32)
    ref = forward(proto, weights, {"data": x})
    cases = tmp_model_dir / "cases.npz"
    np.savez(cases, x=x, prob=ref["prob"], embedding=ref["embedding"], labels=np.array(LABELS, dtype=object))
    cfg = {"name": "animals", "version": "3",
           "model": {"prototxt": str(proto), "weights": str(weights), "labels": str(labels)}}
    with grpc_server(cfg, tmp_model_dir) as server:
        yield server, cases


def run_client(python: str, script: str, server, cases, env=None) -> None:
    r = subprocess.run([python, str(CLIENTS / script), str(server.grpc_port), str(cases)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), f"{script}:\n{r.stdout}\n{r.stderr}"


@pytest.mark.parametrize("script", ["triton_sync.py", "triton_aio.py"])
def test_tritonclient_grpc(served, script):
    run_client(sys.executable, script, *served)


def test_kserve_inference_grpc_client(served):
    if not KSERVE_PYTHON.exists():
        pytest.skip(f"no kserve venv at {KSERVE_PYTHON.parent.parent}: run bench/setup_peers.sh")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the kserve venv's packages only
    run_client(str(KSERVE_PYTHON), "kserve_client.py", *served, env=env)

"""Triton's repository RPCs (RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload) on the server:
tritonclient.grpc unchanged (in its own process, kserve#3099), and the status codes a plain grpc client sees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from caffe_testing.grpc import OIPClient
from caffe_testing.nets import forward
from caffe_testing.repository import dense_model
from caffe_testing.servers import ServerProcess, free_port
from inference_server.grpc import messages as pb

CLIENT = Path(__file__).resolve().parents[1] / "endpoint" / "clients" / "triton_grpc_repository.py"


def run_client(port: int, model: str, config: dict | None = None) -> dict:
    args = [sys.executable, str(CLIENT), str(port), model] + ([json.dumps(config)] if config else [])
    r = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grpc-repository")
    dense_model(root, "small", 16, 4, seed=1)
    dense_model(root, "big", 2048, 4000, seed=3)
    return root


def server(root: Path, *args: str) -> ServerProcess:
    port = free_port()
    s = ServerProcess(None, repository=root, args=["--grpc-port", str(port), *args])
    s.grpc_port = port
    return s


def test_tritonclient_grpc_loads_infers_and_unloads(root):
    with server(root, "--model-control-mode", "explicit") as s:
        assert s.grpc_port is not None
        out = run_client(s.grpc_port, "small")
        want = forward(root / "small" / "net.prototxt", root / "small" / "net.caffemodel",
                       {"data": np.full((1, 16), 0.5, np.float32)})["prob"]
        assert out["index_before"] == {"big": ["UNAVAILABLE", "not loaded"], "small": ["UNAVAILABLE", "not loaded"]}
        assert out["ready_index_before"] == []
        assert out["errors"]["load"] is None and out["ready_after_load"] is True
        np.testing.assert_allclose(out["answer"], want.ravel(), rtol=1e-5, atol=1e-6)
        assert out["index_loaded"]["small"] == ["READY", ""]
        assert out["errors"]["unload"] is None and out["ready_after_unload"] is False
        assert out["index_unloaded"]["small"] == ["UNAVAILABLE", "unloaded"]
        status, message = out["errors"]["load_unknown"]
        assert status == "StatusCode.NOT_FOUND" and "no-such-model" in message

        # a config pushed with the load (Triton's parameters["config"]), for a model the folder does not hold
        pushed = {"model": {"prototxt": str(root / "small" / "net.prototxt"),
                            "weights": str(root / "small" / "net.caffemodel")}, "backend": "pycaffe"}
        out = run_client(s.grpc_port, "pushed", pushed)
        assert out["errors"]["load"] is None
        np.testing.assert_allclose(out["answer"], want.ravel(), rtol=1e-5, atol=1e-6)


def test_grpc_status_codes_of_refused_calls(root):
    with server(root, "--memory-bytes", str(16 * 2**20)) as s:  # mode none: every model loads at start
        assert s.grpc_port is not None
        c = OIPClient(s.grpc_port)
        try:
            idx = c.call("RepositoryIndex", pb.RepositoryIndexRequest())
            states = {m.name: (m.state, m.reason) for m in idx.models}
            assert states["small"] == ("READY", "")
            assert states["big"][0] == "UNAVAILABLE" and "memory budget" in states["big"][1]
            assert [m.name for m in c.call("RepositoryIndex", pb.RepositoryIndexRequest(ready=True)).models] == [
                "small"]
            err = c.error("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="small"))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--model-control-mode explicit" in err.details()
        finally:
            c.close()
    with server(root, "--model-control-mode", "explicit", "--memory-bytes", str(16 * 2**20)) as s:
        assert s.grpc_port is not None
        c = OIPClient(s.grpc_port)
        try:
            err = c.error("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="big"))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "does not fit in this server's memory budget" in err.details()
            req = pb.RepositoryModelLoadRequest(model_name="small")
            req.parameters["config"].string_param = "{not json"
            err = c.error("RepositoryModelLoad", req)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not valid JSON" in err.details()
            c.call("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="small"))
            assert c.call("ModelReady", pb.ModelReadyRequest(name="small")).ready
        finally:
            c.close()

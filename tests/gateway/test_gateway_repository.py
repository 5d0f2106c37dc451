"""Triton's repository API through the gateway, REST (tritonclient.http) and gRPC (tritonclient.grpc in its own
process, kserve#3099): a load or an unload reaches every server of the model; a model the gateway does not know
is a 404/NOT_FOUND with a message; a server's refusal comes back as it was sent. Load and unload are admin calls
(caffe_gateway/auth.py): the gateway runs with tokens and `--admin-api`, and a caller who is not an admin is
refused before anything is forwarded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from caffe_testing.gateway import GatewayProcess, static
from caffe_testing.nets import forward
from caffe_testing.repository import dense_model
from caffe_testing.servers import ServerProcess, free_port, http

CLIENT = Path(__file__).resolve().parents[1] / "endpoint" / "clients" / "triton_grpc_repository.py"
TOKENS = 'admin-token,root,1,"admins"\nuser-token,alice,2,"team-a"\n'
ADMIN = {"Authorization": "Bearer admin-token"}
USER = {"Authorization": "Bearer user-token"}


def call(method: str, url: str, payload=None, headers: dict | None = None) -> tuple[int, dict | list | None]:
    """(status, JSON answer) of one call with `headers` (the admin's token unless given)."""
    body = None if payload is None else json.dumps(payload).encode()
    status, _, data = http(method, url, body, {"Content-Type": "application/json", **(headers or ADMIN)})
    return status, (json.loads(data) if data else None)


def repository_server(root: Path, *args: str) -> ServerProcess:
    port = free_port()
    s = ServerProcess(None, repository=root, args=["--grpc-port", str(port), *args])
    s.grpc_port = port
    return s


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gw-repository")
    nets = {"small": dense_model(root, "small", 16, 4, seed=1), "other": dense_model(root, "other", 8, 3, seed=2)}
    explicit = ("--model-control-mode", "explicit", "--load-model", "*")
    tokens = root / "tokens.csv"
    tokens.write_text(TOKENS)
    with repository_server(root, *explicit) as a, repository_server(root, *explicit) as b, \
            repository_server(root) as fixed:
        with GatewayProcess("--static", static("small", a, b), "--static", static("other", a, b),
                            "--static", static("fixed", fixed), "--auth", "tokens", "--auth-token-file", str(tokens),
                            "--admin-api", "--admin-groups", "admins") as gw:
            yield {"servers": (a, b), "fixed": fixed, "gateway": gw, "nets": nets}


def server_state(server: ServerProcess, model: str) -> str:
    answer = call("POST", server.url + "/v2/repository/index")[1]
    assert isinstance(answer, list)
    return {e["name"]: e["state"] for e in answer}[model]


def answer(url: str, model: str, net: dict) -> None:
    x = np.full((1, net["inputs"]), 0.25, np.float32)
    status, body = call("POST", f"{url}/v2/models/{model}/infer", {"inputs": [
        {"name": "data", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert status == 200 and isinstance(body, dict), body
    want = forward(net["proto"], net["weights"], {"data": x})["prob"]
    np.testing.assert_allclose(body["outputs"][0]["data"], want.ravel(), rtol=1e-5, atol=1e-6)


def test_rest_load_and_unload_reach_every_server_of_the_model(setup):
    gw, (a, b) = setup["gateway"], setup["servers"]
    client = httpclient.InferenceServerClient(gw.url.removeprefix("http://"))
    states = {e["name"]: e["state"] for e in client.get_model_repository_index(headers=USER)}
    assert states == {"fixed": "UNAVAILABLE", "other": "READY", "small": "READY"}  # fixed: its model is not there

    # a caller who is not an admin is refused by the gateway; nothing reaches the servers
    with pytest.raises(InferenceServerException, match="'alice' may not call the admin API"):
        client.unload_model("small", headers=USER)
    assert server_state(a, "small") == server_state(b, "small") == "READY"

    client.unload_model("small", headers=ADMIN)
    assert server_state(a, "small") == server_state(b, "small") == "UNAVAILABLE"
    status, body = call("POST", gw.url + "/v2/models/small/infer", {"inputs": []}, USER)
    assert status == 503  # no server holds it any more
    answer(gw.url, "other", setup["nets"]["other"])  # the other model never stopped

    client.load_model("small", headers=ADMIN)
    assert server_state(a, "small") == server_state(b, "small") == "READY"
    for _ in range(4):  # both replicas answer as the net does
        answer(gw.url, "small", setup["nets"]["small"])

    with pytest.raises(InferenceServerException, match="not known to the gateway"):
        client.load_model("nope", headers=ADMIN)
    # the server's own refusal, as it sent it: the fixed server loads at start only
    status, body = call("POST", gw.url + "/v2/repository/models/fixed/unload", {})
    assert status == 409 and isinstance(body, dict) and "--model-control-mode explicit" in body["error"]
    assert call("GET", gw.url + "/v2/repository/models/small/load")[0] == 405


def test_grpc_load_and_unload_through_the_gateway(setup):
    gw, (a, b) = setup["gateway"], setup["servers"]
    r = subprocess.run([sys.executable, str(CLIENT), str(gw.grpc_port), "other"], capture_output=True, text=True,
                       timeout=180, env={**os.environ, "CAFFE_TOKEN": "admin-token"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["index_before"]["other"] == ["READY", ""]
    assert out["errors"]["load"] is None and out["ready_after_load"] is True
    want = forward(setup["nets"]["other"]["proto"], setup["nets"]["other"]["weights"],
                   {"data": np.full((1, 8), 0.5, np.float32)})["prob"]
    np.testing.assert_allclose(out["answer"], want.ravel(), rtol=1e-5, atol=1e-6)
    assert out["errors"]["unload"] is None and out["ready_after_unload"] is False
    assert server_state(a, "other") == server_state(b, "other") == "UNAVAILABLE"
    status, message = out["errors"]["load_unknown"]
    assert status == "StatusCode.NOT_FOUND" and "not known to the gateway" in message
    # and back, through REST
    assert call("POST", gw.url + "/v2/repository/models/other/load", {}) == (200, {})
    answer(gw.url, "other", setup["nets"]["other"])

"""tritonclient.grpc, unchanged, drives the model repository API of a server or the gateway; run in its own
process by the repository tests (tritonclient.grpc's stubs and ours must not share one, kserve#3099).

argv: GRPC_PORT MODEL [CONFIG_JSON]; $CAFFE_TOKEN, when set, is sent as a bearer token on every call.
Loads MODEL (with CONFIG_JSON as Triton's `config` where given), infers
on it with zeros of its input shape, unloads it, loads a model that is not there, and prints one JSON object:
the index after each step, whether MODEL was ready, its answer, and the errors (status and message)."""

import json
import os
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

port, model = sys.argv[1], sys.argv[2]
config = sys.argv[3] if len(sys.argv) > 3 else None
token = os.environ.get("CAFFE_TOKEN")
H = {"authorization": f"Bearer {token}"} if token else None
c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
out: dict = {"errors": {}}


def index() -> dict:
    entries = c.get_model_repository_index(headers=H, as_json=True).get("models", [])
    return {e["name"]: [e.get("state", ""), e.get("reason", "")] for e in entries}


def error(step: str, call) -> None:
    try:
        call()
        out["errors"][step] = None
    except InferenceServerException as e:
        out["errors"][step] = [e.status(), e.message()]


out["index_before"] = index()
entries = c.get_model_repository_index(headers=H, as_json=True).get("models", [])
out["ready_index_before"] = sorted(e["name"] for e in entries if e.get("state") == "READY")
error("load", lambda: c.load_model(model, headers=H, config=config) if config else c.load_model(model, headers=H))
out["ready_after_load"] = c.is_model_ready(model, headers=H)
if out["ready_after_load"]:
    meta = c.get_model_metadata(model, headers=H, as_json=True)
    inp = meta["inputs"][0]
    shape = [1, *[int(d) for d in inp["shape"][1:]]]
    x = grpcclient.InferInput(inp["name"], shape, "FP32")
    x.set_data_from_numpy(np.full(shape, 0.5, np.float32))
    out["answer"] = c.infer(model, [x], headers=H).as_numpy(meta["outputs"][0]["name"]).ravel().tolist()
out["index_loaded"] = index()
error("unload", lambda: c.unload_model(model, headers=H))
out["ready_after_unload"] = c.is_model_ready(model, headers=H)
out["index_unloaded"] = index()
error("load_unknown", lambda: c.load_model("no-such-model", headers=H))
print(json.dumps(out))

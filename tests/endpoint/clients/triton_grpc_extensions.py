"""tritonclient.grpc, unchanged, asks a server or the gateway for what its ServerMetadata promises; run by
tests/endpoint/test_grpc_stats_config.py in its own process (tritonclient.grpc's stubs and ours must not share
one, kserve#3099). argv: GRPC_PORT MODEL; prints one JSON object: the listed extensions, which of them
worked (each with a real call), the statistics and the config as tritonclient returns them, and the errors
an unknown model gets."""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

port, model = sys.argv[1], sys.argv[2]
c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32) * 16


def infer(**kw):
    inp = grpcclient.InferInput("data", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return c.infer(model, [inp], client_timeout=30, **kw)


def classification() -> bool:
    top = infer(outputs=[grpcclient.InferRequestedOutput("prob", class_count=2)]).as_numpy("prob")
    return top.shape == (2, 2) and top[0][0].decode().count(":") == 2


def binary_tensor_data() -> bool:  # over gRPC: tensors as raw bytes (raw_input_contents), what the extension is
    return infer().as_numpy("prob").shape == (2, 10)


def statistics() -> bool:
    return [s["name"] for s in c.get_inference_statistics(model, as_json=True)["model_stats"]] == [model]


def model_configuration() -> bool:
    return c.get_model_config(model, as_json=True)["config"]["name"] == model


PROBES = {"binary_tensor_data": binary_tensor_data, "classification": classification, "statistics": statistics,
          "model_configuration": model_configuration}

out = {"extensions": c.get_server_metadata(as_json=True)["extensions"], "works": {}, "errors": {}}
for name, probe in PROBES.items():
    try:
        out["works"][name] = probe()
    except InferenceServerException as e:
        out["works"][name] = f"{e.status()}: {e.message()}"
infer()
out["stats"] = c.get_inference_statistics(model, as_json=True)
out["all_stats"] = c.get_inference_statistics(as_json=True)
out["config"] = c.get_model_config(model, as_json=True)["config"]
for call, fn in (("stats", c.get_inference_statistics), ("config", c.get_model_config)):
    try:
        fn("nope")
        out["errors"][call] = "answered"
    except InferenceServerException as e:
        out["errors"][call] = [e.status(), e.message()]
c.close()
print(json.dumps(out))

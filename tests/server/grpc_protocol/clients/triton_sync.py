"""tritonclient.grpc (sync), unchanged, against our server; run by tests/server/grpc_protocol/test_grpc_clients.py
in its own process (tritonclient.grpc's stubs and ours must not share one). argv: PORT CASES.npz; exit 0 = all good."""

import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

port, cases = sys.argv[1], np.load(sys.argv[2], allow_pickle=True)
labels = list(cases["labels"])
c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")

assert c.is_server_live() and c.is_server_ready()
assert c.is_model_ready("animals") and c.is_model_ready("animals", "3")
assert not c.is_model_ready("animals", "4") and not c.is_model_ready("nope")
meta = c.get_server_metadata(as_json=True)
assert meta["name"] == "caffe-serving" and {"binary_tensor_data", "classification"} <= set(meta["extensions"]), meta
meta = c.get_model_metadata("animals", "3", as_json=True)
assert meta["name"] == "animals" and meta["versions"] == ["3"] and meta["platform"] == "caffe", meta
assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] \
    == [("data", "FP32", [-1, 2, 6, 6])]
assert {t["name"] for t in meta["outputs"]} == {"prob", "embedding"}
try:
    c.get_model_metadata("nope")
    raise AssertionError("metadata of an unknown model")
except InferenceServerException as e:
    assert e.status() == "StatusCode.NOT_FOUND" and "nope" in e.message(), (e.status(), e.message())

x = cases["x"]
inp = grpcclient.InferInput("data", list(x.shape), "FP32")
inp.set_data_from_numpy(x)  # raw_input_contents
outs = [grpcclient.InferRequestedOutput("prob"), grpcclient.InferRequestedOutput("embedding")]
r = c.infer("animals", [inp], model_version="3", outputs=outs, request_id="r1", client_timeout=30)
for name in ("prob", "embedding"):
    got = r.as_numpy(name)
    assert got.dtype == np.float32 and got.shape == cases[name].shape, (name, got.shape)
    assert np.abs(got - cases[name]).max() <= 1e-6, name
resp = r.get_response()
assert resp.model_name == "animals" and resp.model_version == "3" and resp.id == "r1"

r = c.infer("animals", [inp])  # no outputs requested: all of them
assert {o.name for o in r.get_response().outputs} == {"prob", "embedding"}

r = c.infer("animals", [inp], outputs=[grpcclient.InferRequestedOutput("prob", class_count=3)])
top = r.as_numpy("prob")
assert top.shape == (x.shape[0], 3), top.shape
for row, probs in zip(top, cases["prob"], strict=True):
    for entry, i in zip(row, np.argsort(-probs)[:3], strict=True):
        score, index, label = entry.decode().split(":", 2)
        assert int(index) == i and label == labels[i] and abs(float(score) - probs[i]) < 1e-5, entry

bad = grpcclient.InferInput("data", [1, 2, 7, 7], "FP32")
bad.set_data_from_numpy(np.zeros((1, 2, 7, 7), np.float32))
try:
    c.infer("animals", [bad])
    raise AssertionError("a wrong shape was accepted")
except InferenceServerException as e:
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "[-1, 2, 6, 6]" in e.message(), (e.status(), e.message())
assert c.infer("animals", [inp]).as_numpy("prob").shape == cases["prob"].shape  # still serving
c.close()
print("OK")

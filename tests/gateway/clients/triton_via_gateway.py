"""tritonclient.grpc (sync and aio), unchanged, through the gateway; run by tests/gateway/test_gateway_grpc.py
in its own process (tritonclient.grpc's stubs and ours must not share one).
argv: GATEWAY_GRPC_PORT CASES.npz (blobs `x` (N, 1, 8, 8), their `labels`, PNGs `png` (N,) as bytes);
exit 0 = all good."""

import asyncio
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

port, cases = sys.argv[1], np.load(sys.argv[2], allow_pickle=True)
x, labels, pngs = cases["x"], cases["labels"], cases["png"]
c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")

assert c.is_server_live() and c.is_server_ready()
meta = c.get_server_metadata(as_json=True)
assert meta["name"] == "caffe-serving-gateway" and "classification" in meta["extensions"], meta
assert c.is_model_ready("digits") and not c.is_model_ready("nope")
meta = c.get_model_metadata("digits", as_json=True)  # the server's answer, through the gateway
assert meta["name"] == "digits" and meta["platform"] == "caffe", meta
for call in (lambda: c.get_model_metadata("nope"),
             lambda: c.infer("nope", [grpcclient.InferInput("data", [1], "FP32")])):
    try:
        call()
        raise AssertionError("an unknown model answered")
    except InferenceServerException as e:
        assert e.status() == "StatusCode.NOT_FOUND" and "'nope'" in e.message(), (e.status(), e.message())

# raw_input_contents, one request per image
right = 0
for i in range(len(x)):
    inp = grpcclient.InferInput("data", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(x[i:i + 1])
    r = c.infer("digits", [inp], outputs=[grpcclient.InferRequestedOutput("prob")], request_id=f"r{i}",
                headers={"x-request-id": f"r{i}"}, client_timeout=30)
    assert r.get_response().id == f"r{i}" and r.get_response().model_name == "digits"
    right += int(np.argmax(r.as_numpy("prob")[0]) == labels[i])
assert right >= 0.9 * len(x), right

# BYTES images with class_count: "score:index:label"
img = grpcclient.InferInput("data", [1], "BYTES")
img.set_data_from_numpy(np.array([pngs[0]], dtype=object))
top = c.infer("digits", [img], outputs=[grpcclient.InferRequestedOutput("prob", class_count=3)]).as_numpy("prob")
assert top.shape == (1, 3) and int(top[0][0].decode().split(":")[1]) == labels[0], top

# the server's INVALID_ARGUMENT and message come back unchanged; the gateway keeps serving
bad = grpcclient.InferInput("data", [1, 1, 7, 7], "FP32")
bad.set_data_from_numpy(np.zeros((1, 1, 7, 7), np.float32))
try:
    c.infer("digits", [bad])
    raise AssertionError("a wrong shape was accepted")
except InferenceServerException as e:
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "'data'" in e.message(), (e.status(), e.message())
c.close()


async def aio() -> None:
    a = aioclient.InferenceServerClient(f"127.0.0.1:{port}")
    assert await a.is_server_ready() and await a.is_model_ready("digits")
    inp = grpcclient.InferInput("data", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    results = await asyncio.gather(*[a.infer("digits", [inp], request_id=str(i)) for i in range(8)])  # multiplexed
    for i, r in enumerate(results):
        assert r.get_response().id == str(i) and r.as_numpy("prob").shape == (len(x), 10)
    await a.close()


asyncio.run(aio())
print("OK")

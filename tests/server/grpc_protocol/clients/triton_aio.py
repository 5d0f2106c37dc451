"""tritonclient.grpc.aio, unchanged, against our server, in its own process. argv: PORT CASES.npz."""

import asyncio
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException


async def main(port: str, cases) -> None:
    c = aioclient.InferenceServerClient(f"127.0.0.1:{port}")
    assert await c.is_server_live() and await c.is_server_ready()
    assert await c.is_model_ready("animals", "3") and not await c.is_model_ready("nope")
    meta = await c.get_model_metadata("animals", as_json=True)
    assert meta["inputs"][0]["name"] == "data", meta
    x = cases["x"]
    inp = grpcclient.InferInput("data", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    outs = [grpcclient.InferRequestedOutput("prob")]
    # several calls at once on one channel (HTTP/2 multiplexing)
    results = await asyncio.gather(*[c.infer("animals", [inp], outputs=outs, request_id=str(i)) for i in range(8)])
    for i, r in enumerate(results):
        assert r.get_response().id == str(i)
        assert np.abs(r.as_numpy("prob") - cases["prob"]).max() <= 1e-6
    r = await c.infer("animals", [inp], outputs=[grpcclient.InferRequestedOutput("prob", class_count=2)])
    assert r.as_numpy("prob").shape == (x.shape[0], 2)
    try:
        await c.infer("nope", [inp])
        raise AssertionError("an unknown model answered")
    except InferenceServerException as e:
        assert e.status() == "StatusCode.NOT_FOUND" and "nope" in e.message(), (e.status(), e.message())
    await c.close()


asyncio.run(main(sys.argv[1], np.load(sys.argv[2], allow_pickle=True)))
print("OK")

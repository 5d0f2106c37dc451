"""KServe's InferenceGRPCClient (kserve SDK), unchanged, against our server; runs in the kserve venv
(bench/setup_peers.sh), its own process. argv: PORT CASES.npz."""

import asyncio
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.infer_type import RequestedOutput


async def main(port: str, cases) -> None:
    c = InferenceGRPCClient(f"127.0.0.1:{port}", timeout=30)
    assert await c.is_server_live() and await c.is_server_ready()
    assert await c.is_model_ready("animals")
    x = cases["x"]

    raw = InferInput("data", list(x.shape), "FP32")
    raw.set_data_from_numpy(x, binary_data=True)  # raw_input_contents
    typed = InferInput("data", list(x.shape), "FP32", data=x.ravel().tolist())  # contents.fp32_contents
    for inp in (raw, typed):
        req = InferRequest(model_name="animals", infer_inputs=[inp], request_id="k1",
                           request_outputs=[RequestedOutput("prob"), RequestedOutput("embedding")])
        resp = await c.infer(req)
        assert resp.model_name == "animals" and resp.id == "k1", (resp.model_name, resp.id)
        got = {o.name: o.as_numpy() for o in resp.outputs}
        for name in ("prob", "embedding"):
            assert np.abs(got[name].reshape(cases[name].shape) - cases[name]).max() <= 1e-6, name

    req = InferRequest(model_name="animals", infer_inputs=[raw],
                       request_outputs=[RequestedOutput("prob", parameters={"classification": 3})])
    top = (await c.infer(req)).outputs[0].as_numpy()
    assert top.shape == (x.shape[0], 3), top.shape
    first = top.ravel()[0]
    first = first.decode() if isinstance(first, bytes) else first
    assert int(first.split(":")[1]) == int(np.argmax(cases["prob"][0]))
    await c.close()


asyncio.run(main(sys.argv[1], np.load(sys.argv[2], allow_pickle=True)))
print("OK")

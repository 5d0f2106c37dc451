"""The KServe peer: a `kserve.Model` whose predict runs a pycaffe Net on Open Inference Protocol inputs.

Written the way KServe's docs show a custom Python model: load in `load()`, a synchronous `predict`
on the V2 `InferRequest` (KServe calls it on its event loop, as it does any non-async predict), and
`ModelServer().start([model])`. Runs in its own venv (bench/setup_peers.sh) with pycaffe on PYTHONPATH.

    python kserve_model.py --model_name NAME --prototxt P --weights W --http_port N [ModelServer flags]
"""

from __future__ import annotations

import argparse

import caffe
import kserve
from caffe_forward import forward
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.utils.utils import generate_uuid


class CaffeModel(Model):
    """One pycaffe Net; every request's inputs are copied into its input blobs, then one forward pass."""

    def __init__(self, name: str, prototxt: str, weights: str):
        super().__init__(name)
        self.prototxt, self.weights = prototxt, weights
        self.net = None
        self.load()

    def load(self) -> bool:
        caffe.set_mode_cpu()
        self.net = caffe.Net(self.prototxt, caffe.TEST, weights=self.weights)
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        out = forward(self.net, ((t.name, t.as_numpy()) for t in payload.inputs))
        outputs = []
        for name in self.net.outputs:
            arr = out[name]
            o = InferOutput(name=name, shape=list(arr.shape), datatype="FP32")
            o.set_data_from_numpy(arr.copy(), binary_data=False)
            outputs.append(o)
        return InferResponse(response_id=payload.id or generate_uuid(), model_name=self.name, infer_outputs=outputs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--prototxt", required=True)
    parser.add_argument("--weights", required=True)
    args, _ = parser.parse_known_args()
    ModelServer().start([CaffeModel(args.model_name, args.prototxt, args.weights)])

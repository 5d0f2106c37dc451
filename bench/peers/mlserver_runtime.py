"""The MLServer peer: a custom inference runtime (an `MLModel`) that runs a pycaffe Net.

Written the way MLServer's docs show a custom runtime: load in `async load()`, decode V2 inputs with
`NumpyCodec`, encode outputs with it. `model-settings.json` names this class as its implementation
and passes the file paths in `parameters` (`uri`: the .caffemodel; `extra.prototxt`); bench/peers/
servers.py writes it and `settings.json` at run time. Runs in MLServer's own venv with pycaffe on
PYTHONPATH.
"""

from __future__ import annotations

import caffe
from caffe_forward import forward
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class CaffeRuntime(MLModel):
    """One pycaffe Net; every request's inputs are copied into its input blobs, then one forward pass."""

    async def load(self) -> bool:
        params = self.settings.parameters
        caffe.set_mode_cpu()
        self.net = caffe.Net(params.extra["prototxt"], caffe.TEST, weights=params.uri)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        out = forward(self.net, ((t.name, NumpyCodec.decode_input(t)) for t in payload.inputs))
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(name, out[name].copy()) for name in self.net.outputs],
        )

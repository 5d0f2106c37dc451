"""The Caffe side of a conversion: a loaded caffe.Net and its layer definitions after Caffe's upgrade.

We never parse the prototxt ourselves. Caffe loads it (upgrading V0/V1 nets, deprecated input
fields and old BatchNorm definitions, keeping only the TEST-phase layers, inserting Split layers),
then `Net.save` gives back that exact net as a NetParameter. Weights come from the loaded net's
blobs, already in their current shapes (old 4-D InnerProduct weights are 2-D by then).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from ...errors import ModelLoadError


@dataclass
class CaffeModel:
    layers: list  # caffe_pb2.LayerParameter, in execution order, without their weight blobs
    params: list[list[np.ndarray]]  # float32 weights per layer, parallel to `layers`
    shapes: dict[str, tuple[int, ...]]  # every blob's shape at the input shapes the net was reshaped to
    inputs: list[str]
    outputs: list[str]  # the blobs the graph returns: any blob of the net, not only Caffe's outputs


def load_net(prototxt: str, weights: str, input_shapes: dict[str, tuple[int, ...]] | None = None):
    """A CPU caffe.Net in TEST phase, reshaped to `input_shapes` (name → full shape) where given."""
    import caffe

    caffe.set_mode_cpu()
    try:
        net = caffe.Net(str(prototxt), 1, weights=str(weights))  # 1 == caffe.TEST
    except Exception as e:
        raise ModelLoadError(f"pycaffe could not load {prototxt} with weights {weights}: {e}") from None
    if input_shapes:
        for name, shape in input_shapes.items():
            if name not in net.inputs:
                raise ModelLoadError(f"config input '{name}' is not an input of the net (it has {list(net.inputs)})")
            net.blobs[name].reshape(*shape)
        net.reshape()
    return net


def _read_only_view(data: np.ndarray) -> np.ndarray:
    """The net's own weights, not a copy (a converter that wrote into them would raise, not corrupt the net)."""
    view = data.view()
    view.flags.writeable = False
    return view if view.dtype == np.float32 else view.astype(np.float32)


def read_net(net, outputs: list[str] | None = None) -> CaffeModel:
    """The loaded net as layers + weights + shapes; `outputs` are the blobs to serve (default: Caffe's net outputs)."""
    from caffe.proto import caffe_pb2

    fd, path = tempfile.mkstemp(suffix=".caffemodel")
    os.close(fd)
    try:
        net.save(path)
        proto = caffe_pb2.NetParameter()
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    finally:
        os.unlink(path)
    layers = []
    for layer in proto.layer:
        del layer.blobs[:]  # the weights come from the loaded net below
        kept = caffe_pb2.LayerParameter()
        kept.CopyFrom(layer)  # a message of its own: the parsed file's weights are freed with `proto`
        layers.append(kept)
    del proto
    if len(layers) != len(net.layers):
        raise ModelLoadError(f"the saved net has {len(layers)} layers, the loaded one {len(net.layers)}")
    params = [[_read_only_view(b.data) for b in net.layers[i].blobs] for i in range(len(layers))]
    shapes = {name: tuple(blob.data.shape) for name, blob in net.blobs.items()}
    return CaffeModel(layers, params, shapes, list(net.inputs), list(outputs) if outputs else list(net.outputs))

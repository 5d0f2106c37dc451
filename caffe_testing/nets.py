"""Caffe nets built with NetSpec and random weights, saved as deploy prototxt + caffemodel."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_net(netspec, directory: Path, name: str, seed: int = 0) -> tuple[Path, Path]:
    """Write `netspec` as NAME.prototxt and NAME.caffemodel with seeded random weights."""
    import caffe

    directory.mkdir(parents=True, exist_ok=True)
    proto = directory / f"{name}.prototxt"
    proto.write_text(str(netspec.to_proto()))
    net = caffe.Net(str(proto), caffe.TEST)
    rng = np.random.default_rng(seed)
    for layer_name, blobs in net.params.items():
        for i, b in enumerate(blobs):
            layer_type = net.layers[list(net._layer_names).index(layer_name)].type
            if layer_type == "BatchNorm":
                # mean, variance, moving-average factor: keep variance positive and the factor sane
                if i == 0:
                    b.data[...] = rng.normal(0, 0.5, b.data.shape)
                elif i == 1:
                    b.data[...] = rng.uniform(0.5, 2.0, b.data.shape)
                else:
                    b.data[...] = 0.999
            else:
                b.data[...] = rng.normal(0, 0.3, b.data.shape)
    weights = directory / f"{name}.caffemodel"
    net.save(str(weights))
    return proto, weights


def forward(proto: Path, weights: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A direct pycaffe forward pass: the reference the server must match."""
    import caffe

    caffe.set_mode_cpu()
    net = caffe.Net(str(proto), caffe.TEST, weights=str(weights))
    for k, v in inputs.items():
        net.blobs[k].reshape(*v.shape)
    net.reshape()
    for k, v in inputs.items():
        net.blobs[k].data[...] = v
    out = net.forward()
    return {k: v.copy() for k, v in out.items()}


def dense_net(inputs: int, outputs: int):
    """Input [1, inputs] → InnerProduct(outputs) → Softmax `prob`: the smallest net that serves."""
    import caffe
    from caffe import layers as L

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, inputs]))
    n.ip = L.InnerProduct(n.data, num_output=outputs)
    n.prob = L.Softmax(n.ip)
    return n


def image_net(outputs: int, relu: bool = False):
    """Input [1, 3, 8, 8] → Convolution(4, 3x3) [→ ReLU in place] → InnerProduct(outputs) → Softmax `prob`."""
    import caffe
    from caffe import layers as L

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3)
    if relu:
        n.relu = L.ReLU(n.conv, in_place=True)
    n.ip = L.InnerProduct(n.conv, num_output=outputs)
    n.prob = L.Softmax(n.ip)
    return n

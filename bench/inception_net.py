"""A GoogLeNet-size Caffe net with random weights, so that compute, not serving, dominates a request.

GoogLeNet's stem and its first inception blocks (3a, 3b, 4a) on a 224×224 RGB input, then global
average pooling and a 1000-way classifier: the same layer types and early shapes as GoogLeNet, cut
short so one CPU forward pass stays under ~100 ms on this machine's 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

INPUT_SHAPE = (1, 3, 224, 224)

# GoogLeNet's inception widths: 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection
BLOCKS = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
}


def _conv_relu(L, bottom, num_output, kernel, stride=1, pad=0):
    conv = L.Convolution(bottom, num_output=num_output, kernel_size=kernel, stride=stride, pad=pad,
                         weight_filler={"type": "xavier"}, bias_filler={"type": "constant", "value": 0.1})
    return conv, L.ReLU(conv, in_place=True)


def _inception(n, L, P, name, bottom, widths):
    c1, r3, c3, r5, c5, pp = widths
    n[f"inc{name}_1x1"], n[f"inc{name}_relu1x1"] = _conv_relu(L, bottom, c1, 1)
    n[f"inc{name}_3x3r"], n[f"inc{name}_relu3x3r"] = _conv_relu(L, bottom, r3, 1)
    n[f"inc{name}_3x3"], n[f"inc{name}_relu3x3"] = _conv_relu(L, n[f"inc{name}_relu3x3r"], c3, 3, pad=1)
    n[f"inc{name}_5x5r"], n[f"inc{name}_relu5x5r"] = _conv_relu(L, bottom, r5, 1)
    n[f"inc{name}_5x5"], n[f"inc{name}_relu5x5"] = _conv_relu(L, n[f"inc{name}_relu5x5r"], c5, 5, pad=2)
    n[f"inc{name}_pool"] = L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=3, stride=1, pad=1)
    n[f"inc{name}_proj"], n[f"inc{name}_reluproj"] = _conv_relu(L, n[f"inc{name}_pool"], pp, 1)
    n[f"inc{name}_out"] = L.Concat(n[f"inc{name}_relu1x1"], n[f"inc{name}_relu3x3"], n[f"inc{name}_relu5x5"],
                                   n[f"inc{name}_reluproj"])
    return n[f"inc{name}_out"]


def netspec():
    """The deploy net as a caffe.NetSpec: input `data` [1,3,224,224], output `prob` [1,1000]."""
    import caffe
    from caffe import layers as L, params as P

    n = caffe.NetSpec()
    n.data = L.Input(shape=[{"dim": list(INPUT_SHAPE)}])
    n.conv1, n.relu1 = _conv_relu(L, n.data, 64, 7, stride=2, pad=3)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.norm1 = L.LRN(n.pool1, local_size=5, alpha=1e-4, beta=0.75)
    n.conv2r, n.relu2r = _conv_relu(L, n.norm1, 64, 1)
    n.conv2, n.relu2 = _conv_relu(L, n.relu2r, 192, 3, pad=1)
    n.norm2 = L.LRN(n.relu2, local_size=5, alpha=1e-4, beta=0.75)
    n.pool2 = L.Pooling(n.norm2, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = _inception(n, L, P, "3a", n.pool2, BLOCKS["3a"])
    x = _inception(n, L, P, "3b", x, BLOCKS["3b"])
    n.pool3 = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = _inception(n, L, P, "4a", n.pool3, BLOCKS["4a"])
    n.pool4 = L.Pooling(x, pool=P.Pooling.AVE, global_pooling=True)
    n.fc = L.InnerProduct(n.pool4, num_output=1000, weight_filler={"type": "xavier"},
                          bias_filler={"type": "constant", "value": 0})
    n.prob = L.Softmax(n.fc)
    return n


def write(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write inception.prototxt and inception.caffemodel (seeded random weights) into `directory`."""
    import caffe

    directory.mkdir(parents=True, exist_ok=True)
    proto = directory / "inception.prototxt"
    proto.write_text(str(netspec().to_proto()))
    net = caffe.Net(str(proto), caffe.TEST)
    rng = np.random.default_rng(seed)
    for blobs in net.params.values():
        weight = blobs[0].data
        fan_in = int(np.prod(weight.shape[1:]))
        weight[...] = rng.normal(0.0, np.sqrt(2.0 / fan_in), weight.shape)  # He init: activations stay O(1)
        if len(blobs) > 1:
            blobs[1].data[...] = rng.normal(0.0, 0.01, blobs[1].data.shape)
    weights = directory / "inception.caffemodel"
    net.save(str(weights))
    return proto, weights

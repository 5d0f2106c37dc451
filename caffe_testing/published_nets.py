"""Whole published fork nets rebuilt with NetSpec from their deploy files' layer patterns (the files
themselves are not here), with weights shaped like trained ones, for the converter's parity figures.

- `enet`: TimoSaemann/ENet `enet_deploy_final.prototxt` (BN absorbed into the convolutions except the
  initial block and the decoder's deconvolutions): initial block, 5 stages of bottlenecks (downsampling
  with a pooling mask, regular, dilated 2/4/8/16, asymmetric 5x1 + 1x5 with pad 1), the decoder's
  Deconvolution + BN (INFERENCE) + Upsample from the masks, and `deconv6_0_0` to 19 classes.
- `se_resnet`: hujie-frank/SENet `SE-ResNet-50.prototxt`: BatchNorm + Scale after every convolution,
  per block global AVE pooling → 1x1 down → ReLU → 1x1 up → Sigmoid → Axpy with the shortcut,
  `pool5/7x7_s1` AVE pooling, the `classifier` InnerProduct on a 4-D blob, Softmax.

`trained_like_weights` fills a saved net's blobs as training leaves them: He-scaled convolutions, each
BatchNorm's statistics those of its own input (so activations stay O(1)); random N(0, 0.3) weights
instead make activations grow to 1e9 and more, where float32 rounding alone moves the outputs past 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def enet(height: int = 512, width: int = 1024, classes: int = 19):
    import caffe
    from caffe import layers as L, params as P

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, height, width]))
    n.conv0_1 = L.Convolution(n.data, num_output=13, kernel_size=3, pad=1, stride=2)
    n.pool0_1 = L.Pooling(n.data, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.concat0_1 = L.Concat(n.conv0_1, n.pool0_1, axis=1)
    n.bn0_1 = L.BN(n.concat0_1, bn_param=dict(bn_mode=1))
    n.prelu0_1 = L.PReLU(n.bn0_1)

    def act(name, bottom, relu):
        n[name] = L.ReLU(bottom) if relu else L.PReLU(bottom)
        return n[name]

    def downsampling(s, x, mid, out):
        n[f"conv{s}_0_0"] = L.Convolution(x, num_output=mid, kernel_size=2, stride=2)
        y = act(f"prelu{s}_0_0", n[f"conv{s}_0_0"], False)
        n[f"conv{s}_0_1"] = L.Convolution(y, num_output=mid, kernel_size=3, pad=1)
        y = act(f"prelu{s}_0_1", n[f"conv{s}_0_1"], False)
        n[f"conv{s}_0_2"] = L.Convolution(y, num_output=out, kernel_size=1)
        n[f"pool{s}_0_4"], n[f"pool{s}_0_4_mask"] = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=2, stride=2, ntop=2)
        n[f"conv{s}_0_4"] = L.Convolution(n[f"pool{s}_0_4"], num_output=out, kernel_size=1)
        n[f"eltwise{s}_0_4"] = L.Eltwise(n[f"conv{s}_0_4"], n[f"conv{s}_0_2"])
        return act(f"prelu{s}_0_4", n[f"eltwise{s}_0_4"], False)

    def bottleneck(s, i, x, mid, out, kind="regular", dilation=1, relu=False):
        p = f"{s}_{i}"
        n[f"conv{p}_0"] = L.Convolution(x, num_output=mid, kernel_size=1)
        y = act(f"prelu{p}_0", n[f"conv{p}_0"], relu)
        if kind == "asymmetric":
            n[f"conv{p}_1_a"] = L.Convolution(y, num_output=mid, pad=1, kernel_h=5, kernel_w=1)
            n[f"conv{p}_1"] = L.Convolution(n[f"conv{p}_1_a"], num_output=mid, pad=1, kernel_h=1, kernel_w=5)
        else:
            n[f"conv{p}_1"] = L.Convolution(y, num_output=mid, kernel_size=3, pad=dilation, dilation=dilation)
        y = act(f"prelu{p}_1", n[f"conv{p}_1"], relu)
        n[f"conv{p}_2"] = L.Convolution(y, num_output=out, kernel_size=1)
        n[f"eltwise{p}_4"] = L.Eltwise(x, n[f"conv{p}_2"])
        return act(f"prelu{p}_4", n[f"eltwise{p}_4"], relu)

    def upsampling(s, x, mid, out, mask):
        n[f"conv{s}_0_0"] = L.Convolution(x, num_output=mid, kernel_size=1)
        y = act(f"prelu{s}_0_0", n[f"conv{s}_0_0"], True)
        n[f"deconv{s}_0_1"] = L.Deconvolution(y, convolution_param=dict(num_output=mid, kernel_size=2, stride=2))
        n[f"bn{s}_0_1"] = L.BN(n[f"deconv{s}_0_1"], bn_param=dict(bn_mode=1))
        y = act(f"prelu{s}_0_1", n[f"bn{s}_0_1"], True)
        n[f"conv{s}_0_2"] = L.Convolution(y, num_output=out, kernel_size=1)
        n[f"conv{s}_0_4"] = L.Convolution(x, num_output=out, kernel_size=1)
        n[f"upsample{s}_0_4"] = L.Upsample(n[f"conv{s}_0_4"], mask, upsample_param=dict(scale=2))
        n[f"eltwise{s}_0_4"] = L.Eltwise(n[f"upsample{s}_0_4"], n[f"conv{s}_0_2"])
        return act(f"prelu{s}_0_4", n[f"eltwise{s}_0_4"], True)

    x = downsampling(1, n.prelu0_1, 16, 64)
    for i in range(1, 5):
        x = bottleneck(1, i, x, 16, 64)
    x = downsampling(2, x, 32, 128)
    stage = [("regular", 1), ("dilated", 2), ("asymmetric", 1), ("dilated", 4),
             ("regular", 1), ("dilated", 8), ("asymmetric", 1), ("dilated", 16)]
    for s in (2, 3):
        for i, (kind, dilation) in enumerate(stage, 1):
            x = bottleneck(s, i, x, 32, 128, kind, dilation)
    x = upsampling(4, x, 16, 64, n.pool2_0_4_mask)
    for i in (1, 2):
        x = bottleneck(4, i, x, 16, 64, relu=True)
    x = upsampling(5, x, 4, 16, n.pool1_0_4_mask)
    x = bottleneck(5, 1, x, 4, 16, relu=True)
    n.deconv6_0_0 = L.Deconvolution(x, convolution_param=dict(num_output=classes, kernel_size=2, stride=2))
    return n


def se_resnet(size: int = 224, blocks: tuple[int, ...] = (3, 4, 6, 3), classes: int = 1000):
    import caffe
    from caffe import layers as L, params as P

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, size, size]))

    def conv_bn(name, bottom, out, kernel, stride=1, pad=0, relu=True):
        n[name] = L.Convolution(bottom, num_output=out, kernel_size=kernel, stride=stride, pad=pad, bias_term=False)
        n[name + "/bn"] = L.BatchNorm(n[name], use_global_stats=True, in_place=True)
        n[name + "/bn/scale"] = L.Scale(n[name], bias_term=True, in_place=True)
        if relu:
            n[name + "/relu"] = L.ReLU(n[name], in_place=True)
        return n[name]

    x = conv_bn("conv1/7x7_s2", n.data, 64, 7, 2, 3)
    n["pool1/3x3_s2"] = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = n["pool1/3x3_s2"]
    width = 64
    for stage, count in enumerate(blocks, 2):
        for b in range(1, count + 1):
            p = f"conv{stage}_{b}"
            stride = 2 if b == 1 and stage > 2 else 1
            y = conv_bn(p + "_1x1_reduce", x, width, 1, stride)
            y = conv_bn(p + "_3x3", y, width, 3, 1, 1)
            y = conv_bn(p + "_1x1_increase", y, width * 4, 1, relu=False)
            n[p + "_global_pool"] = L.Pooling(y, pool=P.Pooling.AVE, global_pooling=True)
            n[p + "_1x1_down"] = L.Convolution(n[p + "_global_pool"], num_output=width // 4, kernel_size=1)
            n[p + "_1x1_down/relu"] = L.ReLU(n[p + "_1x1_down"], in_place=True)
            n[p + "_1x1_up"] = L.Convolution(n[p + "_1x1_down"], num_output=width * 4, kernel_size=1)
            n[p + "_prob"] = L.Sigmoid(n[p + "_1x1_up"], in_place=True)
            shortcut = conv_bn(p + "_1x1_proj", x, width * 4, 1, stride, relu=False) if b == 1 else x
            n[p] = L.Axpy(n[p + "_1x1_up"], y, shortcut)
            n[p + "/relu"] = L.ReLU(n[p], in_place=True)
            x = n[p]
        width *= 2
    n["pool5/7x7_s1"] = L.Pooling(x, pool=P.Pooling.AVE, kernel_size=size // 32, stride=1)
    n.classifier = L.InnerProduct(n["pool5/7x7_s1"], num_output=classes)
    n.prob = L.Softmax(n.classifier)
    return n


def trained_like_weights(proto: Path, seed: int = 0) -> Path:
    """Weights for `proto` shaped like trained ones, saved beside it as NAME.caffemodel (see the module's note)."""
    import caffe

    net = caffe.Net(str(proto), caffe.TEST)
    rng = np.random.default_rng(seed)
    layers = list(net._layer_names)
    for name, blobs in net.params.items():
        kind = net.layers[layers.index(name)].type
        for i, b in enumerate(blobs):
            shape = b.data.shape
            if kind == "BatchNorm":  # set from the data below
                b.data[...] = [0.0, 1.0, 1.0][i]
            elif kind == "BN" and len(blobs) == 4 and i >= 2:  # PSPNet's mean and variance: from the data below
                b.data[...] = [0.0, 1.0][i - 2]
            elif kind in ("Scale", "BN"):
                b.data[...] = rng.uniform(0.5, 1.5, shape) if i == 0 else rng.normal(0, 0.1, shape)
            elif kind == "PReLU":
                b.data[...] = rng.uniform(0.0, 0.3, shape)
            elif i == 0:
                fan_in = np.prod(shape[1:]) if kind != "Deconvolution" else shape[0] * np.prod(shape[2:])
                b.data[...] = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
            else:
                b.data[...] = rng.normal(0, 0.1, shape)
    net.blobs["data"].data[...] = rng.uniform(-1, 1, net.blobs["data"].data.shape)
    start = None
    for i, name in enumerate(layers):  # each BatchNorm (PSPNet's BN) normalizes its own input, as training leaves it
        kind = net.layers[i].type  # where its mean blob is: BatchNorm's first, PSPNet's BN's third
        stats = 0 if kind == "BatchNorm" else 2 if kind == "BN" and len(net.params[name]) == 4 else None
        if stats is not None:
            net.forward(start=start, end=layers[i - 1])
            blob = net.blobs[net.bottom_names[name][0]].data
            net.params[name][stats].data[...] = blob.mean(axis=(0, 2, 3)).reshape(net.params[name][stats].data.shape)
            var = blob.var(axis=(0, 2, 3))
            if blob.size // blob.shape[1] < 64:  # a few values per channel (pyramid bins): a dataset's spread instead
                var = rng.uniform(0.5, 2.0, var.shape) * max(float(blob.var()), 1e-3)
            net.params[name][stats + 1].data[...] = var.reshape(net.params[name][stats + 1].data.shape)
            start = name
    weights = proto.with_suffix(".caffemodel")
    net.save(str(weights))
    return weights

"""Caffe nets built with NetSpec and random weights, saved as deploy prototxt + caffemodel."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # for the annotations only: importing this module must not need pycaffe
    import caffe


def save_net(netspec, directory: Path, name: str, seed: int = 0) -> tuple[Path, Path]:
    """Write `netspec` as NAME.prototxt and NAME.caffemodel with seeded random weights."""
    directory.mkdir(parents=True, exist_ok=True)
    proto = directory / f"{name}.prototxt"
    proto.write_text(str(netspec.to_proto()))
    return proto, save_weights(proto, seed)


def save_weights(proto: Path, seed: int = 0) -> Path:
    """Seeded random weights for the net in `proto`, saved beside it as NAME.caffemodel."""
    import caffe

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
    weights = proto.with_suffix(".caffemodel")
    net.save(str(weights))
    return weights


def net_from_text(directory: Path, name: str, text: str, weights: dict[str, list[np.ndarray]] | None = None,
                  seed: int = 0) -> tuple[Path, Path]:
    """A hand-written prototxt → (proto, weights path): named layers' blobs set from `weights`, the rest
    random (a 4-blob BN's variance positive, as trained statistics are)."""
    import caffe

    proto = directory / f"{name}.prototxt"
    proto.write_text(text)
    net = caffe.Net(str(proto), caffe.TEST)
    rng = np.random.default_rng(seed)
    for layer, blobs in net.params.items():
        for i, b in enumerate(blobs):
            if weights and layer in weights:
                b.data[...] = weights[layer][i]
            elif len(blobs) == 4 and i == 3:
                b.data[...] = rng.uniform(0.5, 2.0, b.data.shape)
            else:
                b.data[...] = rng.normal(0, 0.5, b.data.shape)
    path = directory / f"{name}.caffemodel"
    net.save(str(path))
    return proto, path


def run_net(proto: Path, weights: Path, feed: dict[str, np.ndarray]) -> caffe.Net:
    """A pycaffe forward pass on the CPU at `feed`'s shapes; the Net, for any blob a test reads."""
    import caffe

    caffe.set_mode_cpu()
    net = caffe.Net(str(proto), caffe.TEST, weights=str(weights))
    for k, v in feed.items():
        net.blobs[k].reshape(*v.shape)
    net.reshape()
    for k, v in feed.items():
        net.blobs[k].data[...] = v
    net.forward()
    return net


def forward(proto: Path, weights: Path, inputs: dict[str, np.ndarray], blobs: list[str] | None = None
            ) -> dict[str, np.ndarray]:
    """A direct pycaffe forward pass: the reference the server must match (its outputs, or `blobs`)."""
    net = run_net(proto, weights, inputs)
    return {k: net.blobs[k].data.copy() for k in (net.outputs if blobs is None else blobs)}


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


# --- nets whose outputs do not follow the batch, or that Caffe reports no outputs for

def ssd_head():
    """An SSD-style detector head: L2 Normalize, loc/conf convolutions through Permute + Flatten, PriorBox
    and DetectionOutput, whose [1, 1, detections, 7] output holds every image's boxes (image id in
    column 0) and whose detection count depends on the data."""
    import caffe
    from caffe import layers as L, params as P

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 16, 16]))
    n.feat = L.Convolution(n.data, num_output=8, kernel_size=3, stride=2, pad=1)  # 8x8
    n.relu = L.ReLU(n.feat, in_place=True)
    n.norm = L.Normalize(n.feat, norm_param=dict(across_spatial=False, channel_shared=False,
                                                 scale_filler=dict(type="constant", value=20)))
    priors, classes = 3, 3  # min size + max size + aspect ratio 2 → 3 priors per cell
    n.loc = L.Convolution(n.norm, num_output=priors * 4, kernel_size=3, pad=1)
    n.loc_perm = L.Permute(n.loc, permute_param=dict(order=[0, 2, 3, 1]))
    n.loc_flat = L.Flatten(n.loc_perm, axis=1)
    n.conf = L.Convolution(n.norm, num_output=priors * classes, kernel_size=3, pad=1)
    n.conf_perm = L.Permute(n.conf, permute_param=dict(order=[0, 2, 3, 1]))
    n.conf_flat = L.Flatten(n.conf_perm, axis=1)
    n.priorbox = L.PriorBox(n.norm, n.data, prior_box_param=dict(
        min_size=[4.0], max_size=[8.0], aspect_ratio=[2.0], flip=False, clip=True, variance=[0.1, 0.1, 0.2, 0.2]))
    n.conf_shaped = L.Reshape(n.conf_flat, shape=dict(dim=[0, -1, classes]))
    n.conf_soft = L.Softmax(n.conf_shaped, axis=2)
    n.conf_scores = L.Flatten(n.conf_soft, axis=1)
    n.detection_out = L.DetectionOutput(n.loc_flat, n.conf_scores, n.priorbox, detection_output_param=dict(
        num_classes=classes, share_location=True, background_label_id=0,
        nms_param=dict(nms_threshold=0.45, top_k=100), code_type=P.PriorBox.CENTER_SIZE,
        keep_top_k=50, confidence_threshold=0.2))
    return n


def batch_folding_net():
    """A Reshape that folds the batch into one row: [N, 6] → [1, 6N]."""
    import caffe
    from caffe import layers as L

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4]))
    n.fc = L.InnerProduct(n.data, num_output=6)
    n.folded = L.Reshape(n.fc, shape=dict(dim=[1, -1]))
    return n


def fixed_batch_net():
    """A Reshape with the batch size written into it ([1, 2, 3]): Caffe aborts the process (a glog CHECK)
    on any other batch size, so only batch 1 may ever run."""
    import caffe
    from caffe import layers as L

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4]))
    n.fc = L.InnerProduct(n.data, num_output=6)
    n.grid = L.Reshape(n.fc, shape=dict(dim=[1, 2, 3]))
    return n


def batch_statistics_net():
    """BatchNorm told to normalize with the batch's own statistics: axis 0 follows the batch, but every
    item's answer depends on the others in its batch."""
    import caffe
    from caffe import layers as L

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 6, 6]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3)
    n.bn = L.BatchNorm(n.conv, use_global_stats=False)
    n.score = L.InnerProduct(n.bn, num_output=5)
    return n


def silenced_net():
    """A colorization-style net: its useful blob `class8_ab` feeds a Silence layer, so Caffe reports no
    net outputs at all; pycaffe users read it as net.blobs['class8_ab']."""
    import caffe
    from caffe import layers as L

    n = caffe.NetSpec()
    n.data_l = L.Input(shape=dict(dim=[1, 1, 8, 8]))
    n.conv1 = L.Convolution(n.data_l, num_output=6, kernel_size=3, pad=1)
    n.relu1 = L.ReLU(n.conv1, in_place=True)  # conv1 as pycaffe shows it is the rectified one
    n.class8_ab = L.Convolution(n.conv1, num_output=2, kernel_size=1)
    n.silence = L.Silence(n.class8_ab, ntop=0)
    return n


def small_input_dim_prototxt(directory: Path, name: str = "tiny_input") -> Path:
    """An old-style prototxt declaring `input_dim: 1 3 1 1` (as OpenPose's do), fully convolutional, so the
    served input shape alone decides the output's spatial size."""
    proto = directory / f"{name}.prototxt"
    proto.write_text(
        'name: "tiny_input"\n'
        'input: "image"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 1\ninput_dim: 1\n'
        'layer { name: "conv" type: "Convolution" bottom: "image" top: "conv"\n'
        '  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }\n'
        'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n'
        'layer { name: "pool" type: "Pooling" bottom: "conv" top: "heatmaps"\n'
        '  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
    )
    return proto


def zoo_net() -> caffe.NetSpec:
    """Grouped + dilated conv, BatchNorm+Scale, ceil-rounded MAX/AVE pooling, both LRNs, Concat,
    three Eltwise ops, Dropout, InnerProduct, Softmax; three output blobs."""
    import caffe
    from caffe import layers as L, params as P

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 15, 15]))  # odd size: 2x2/2 pooling rounds 7.5 up to 8
    n.conv_g = L.Convolution(n.data, num_output=6, kernel_size=3, pad=1, group=3)
    n.relu_g = L.ReLU(n.conv_g, in_place=True)
    n.conv_d = L.Convolution(n.conv_g, num_output=6, kernel_size=3, pad=2, dilation=2)
    n.bn = L.BatchNorm(n.conv_d, use_global_stats=True)
    n.scale = L.Scale(n.bn, bias_term=True)
    n.pool_max = L.Pooling(n.scale, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.pool_ave = L.Pooling(n.conv_g, pool=P.Pooling.AVE, kernel_size=3, stride=2, pad=1)
    n.lrn_across = L.LRN(n.pool_max, local_size=3, alpha=0.1, beta=0.75)
    n.lrn_within = L.LRN(n.pool_ave, local_size=3, alpha=0.1, beta=0.75, norm_region=P.LRN.WITHIN_CHANNEL)
    n.concat = L.Concat(n.lrn_across, n.lrn_within, axis=1)
    n.elt_sum = L.Eltwise(n.lrn_across, n.lrn_within, operation=P.Eltwise.SUM, coeff=[0.5, -1.0])
    n.elt_prod = L.Eltwise(n.lrn_across, n.lrn_within, operation=P.Eltwise.PROD)
    n.elt_max = L.Eltwise(n.elt_sum, n.elt_prod, operation=P.Eltwise.MAX)
    n.ip1 = L.InnerProduct(n.concat, num_output=16)
    n.drop = L.Dropout(n.ip1, dropout_ratio=0.5, in_place=True)
    n.logits = L.InnerProduct(n.ip1, num_output=10)
    n.prob = L.Softmax(n.logits)
    n.feat = L.InnerProduct(n.elt_max, num_output=5)
    n.pooled = L.Pooling(n.data, pool=P.Pooling.MAX, kernel_size=2, stride=2)  # an output: [N, 3, 8, 8]
    return n


def every_layer_net() -> caffe.NetSpec:
    """One net with every layer type the issue lists, odd sizes where pooling rounds, three outputs."""
    import caffe
    from caffe import layers as L, params as P

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 15, 13]))
    n.conv_g = L.Convolution(n.data, num_output=6, kernel_size=3, pad=1, group=3)
    n.prelu = L.PReLU(n.conv_g, in_place=True)
    n.dw = L.Convolution(n.conv_g, num_output=6, kernel_h=3, kernel_w=1, pad_h=1, group=6, bias_term=False)
    n.bn = L.BatchNorm(n.dw)
    n.scale = L.Scale(n.bn, bias_term=True)
    n.relu = L.ReLU(n.scale, negative_slope=0.1, in_place=True)
    n.dil = L.Convolution(n.relu, num_output=4, kernel_size=3, pad=2, dilation=2)
    n.elu = L.ELU(n.dil, alpha=0.7)
    n.sig = L.Sigmoid(n.dil)
    n.tanh = L.TanH(n.dil)
    n.prod = L.Eltwise(n.sig, n.tanh, operation=P.Eltwise.PROD)
    n.wsum = L.Eltwise(n.elu, n.prod, operation=P.Eltwise.SUM, coeff=[0.5, 2.0])
    n.emax = L.Eltwise(n.wsum, n.elu, operation=P.Eltwise.MAX)
    n.pool_ave = L.Pooling(n.emax, pool=P.Pooling.AVE, kernel_size=3, stride=2, pad=1)  # 15x13 -> 8x7
    n.pool_max = L.Pooling(n.emax, pool=P.Pooling.MAX, kernel_size=2, stride=2)  # ceil: 8x7
    n.lrn = L.LRN(n.pool_max, local_size=3, alpha=0.1, beta=0.75)
    n.cat = L.Concat(n.pool_ave, n.lrn, axis=1)
    n.a, n.b = L.Slice(n.cat, slice_point=[3], axis=1, ntop=2)
    n.up = L.Deconvolution(n.a, convolution_param=dict(num_output=2, kernel_size=2, stride=2))
    n.power = L.Power(n.up, power=2.0, scale=0.5, shift=0.1)
    n.gpool = L.Pooling(n.power, pool=P.Pooling.AVE, global_pooling=True)  # an output: [N, 2, 1, 1]
    n.flat = L.Flatten(n.b)
    n.drop = L.Dropout(n.flat, dropout_ratio=0.5, in_place=True)
    n.fc = L.InnerProduct(n.flat, num_output=12)
    n.shaped = L.Reshape(n.fc, shape=dict(dim=[0, 3, 4]))
    n.fc_axis2 = L.InnerProduct(n.shaped, num_output=5, axis=2)  # an output: [N, 3, 5]
    n.logits = L.InnerProduct(n.fc, num_output=10)
    n.prob = L.Softmax(n.logits)
    return n

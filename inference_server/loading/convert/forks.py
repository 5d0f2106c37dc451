"""Layers of the Caffe forks our build adds (scripts/caffe/caffe_forks/): Axpy (SE-Nets), ShuffleChannel
(ShuffleNet), ConvolutionDepthwise (MobileNet/ShuffleNet), BN (SegNet, ENet; PSPNet, ICNet) and Upsample (SegNet's
max-unpooling from a Pooling mask, or nearest-neighbour enlargement). Each follows the definition its
C++ file states; the parity check still gates every converted net.
"""

from __future__ import annotations

import numpy as np

from .builder import LayerContext
from .convolution import conv_geometry
from .registry import converts

LEARN, INFERENCE = 0, 1  # BNParameter.BNMode


@converts("Axpy", note="Mul (a per sample and channel) + Add")
def axpy(ctx: LayerContext):
    a, x, y = ctx.bottoms
    n, c = ctx.bottom_shapes[1][:2]
    scale = a
    if len(ctx.bottom_shapes[0]) != len(ctx.bottom_shapes[1]):  # a is N x C: give it x's rank
        scale = ctx.op("Reshape", [a, ctx.ints("shape", [0, c] + [1] * (ctx.rank(1) - 2))])
    return [ctx.op("Add", [ctx.op("Mul", [scale, x]), y])]


@converts("ShuffleChannel", note="Reshape (N, g, C/g, …) → Transpose → Reshape (N, C, …)")
def shuffle_channel(ctx: LayerContext):
    group = ctx.layer.shuffle_channel_param.group
    shape = ctx.bottom_shapes[0]
    channels, rest = shape[1], list(shape[2:])
    if group <= 0 or channels % group:
        raise ctx.unsupported(f"{channels} channels do not split into {group} groups")
    grouped = ctx.op("Reshape", [ctx.bottoms[0], ctx.ints("grouped", [0, group, channels // group] + rest)])
    perm = [0, 2, 1] + list(range(3, 3 + len(rest)))
    swapped = ctx.op("Transpose", [grouped], perm=perm)
    return [ctx.op("Reshape", [swapped, ctx.ints("shape", [0, channels] + rest)])]


@converts("ConvolutionDepthwise", "DepthwiseConvolution",
          note="Conv with group = input channels (weights (num_output, 1, kh, kw))")
def convolution_depthwise(ctx: LayerContext):
    p = ctx.layer.convolution_param
    if ctx.rank() != 4:
        raise ctx.unsupported(f"a 2-D convolution needs a 4-D input, got {list(ctx.bottom_shapes[0])}")
    attrs = conv_geometry(p, 2, ctx)
    weight = ctx.params[0]
    inputs = ["", ctx.const("weight", weight)]  # [0]: each bottom in turn
    if p.bias_term:
        inputs.append(ctx.const("bias", ctx.params[1].reshape(-1)))
    outs = []
    for bottom, shape in zip(ctx.bottoms, ctx.bottom_shapes, strict=True):
        inputs[0] = bottom
        outs.append(ctx.op("Conv", list(inputs), group=shape[1], **attrs))
    return outs


@converts("BN", note="SegNet's and ENet's 2 blobs in bn_mode INFERENCE: Mul + Add per channel (scale, shift); "
          "PSPNet's 4 blobs (slope, bias, mean, variance; TEST or frozen): Sub mean, Mul slope/sqrt(var + eps), "
          "Add bias. SegNet's LEARN (the batch's own statistics) is not converted")
def bn(ctx: LayerContext):
    """One type name, two layouts: the loaded layer's blob count says which (Caffe chose it from bn_param's
    fields when it built the layer), never the values."""
    p = ctx.layer.bn_param
    shape = [1, -1] + [1] * (ctx.rank() - 2)
    if len(ctx.params) == 4:  # PSPNet/ICNet: always the stored statistics in the TEST phase
        slope, bias, mean, var = (b.reshape(-1) for b in ctx.params)
        factor = slope * (np.float32(1) / np.sqrt(var + np.float32(p.eps)))  # float32, as the layer computes it
        centred = ctx.op("Sub", [ctx.bottoms[0], ctx.const("mean", mean.reshape(shape))])
        scaled = ctx.op("Mul", [centred, ctx.const("factor", factor.astype(np.float32).reshape(shape))])
        return [ctx.op("Add", [scaled, ctx.const("bias", bias.reshape(shape))])]
    if len(ctx.params) != 2:
        raise ctx.unsupported(f"expected 2 blobs (scale, shift) or 4 (slope, bias, mean, variance), "
                              f"got {len(ctx.params)}")
    if p.bn_mode != INFERENCE:
        raise ctx.unsupported("bn_mode LEARN normalizes with the statistics of each batch (set bn_mode: INFERENCE "
                              "once compute_bn_statistics.py has folded the dataset's statistics into the weights)")
    scale = ctx.const("scale", ctx.params[0].reshape(shape))
    shift = ctx.const("shift", ctx.params[1].reshape(shape))
    return [ctx.op("Add", [ctx.op("Mul", [ctx.bottoms[0], scale]), shift])]


@converts("Upsample", note="with a Pooling mask: ScatterElements of the values at the mask's indices into "
          "zeros; without: nearest-neighbour Resize by `scale`")
def upsample(ctx: LayerContext):
    p = ctx.layer.upsample_param
    out_shape = list(ctx.top_shapes[0])
    if len(ctx.bottoms) == 1:
        scales = [1.0] * ctx.rank()
        for axis in range(2 if p.dims_num == 4 else 1):
            scales[-1 - axis] = float(p.scale)
        return [ctx.op("Resize", [ctx.bottoms[0], "", ctx.const("scales", np.asarray(scales))],
                       mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")]
    if ctx.rank() != 4:
        raise ctx.unsupported(f"max-unpooling needs a 4-D input, got {list(ctx.bottom_shapes[0])}")
    x, mask = ctx.bottoms
    plane_in = ctx.bottom_shapes[0][2] * ctx.bottom_shapes[0][3]
    plane_out = out_shape[2] * out_shape[3]
    flat_in = ctx.ints("flat_in", [0, 0, plane_in])
    values = ctx.op("Reshape", [x, flat_in])
    indices = ctx.op("Cast", [ctx.op("Reshape", [mask, flat_in])], to=7)  # INT64
    nc = ctx.op("Slice", [ctx.op("Shape", [x]), ctx.ints("nc_start", [0]), ctx.ints("nc_end", [2])])
    zeros_shape = ctx.op("Concat", [nc, ctx.ints("plane_out", [plane_out])], axis=0)
    zeros = ctx.op("ConstantOfShape", [zeros_shape], value=_float_tensor(0.0))
    scattered = ctx.op("ScatterElements", [zeros, indices, values], axis=2)
    return [ctx.op("Reshape", [scattered, ctx.ints("shape", [0, 0, out_shape[2], out_shape[3]])])]


def _float_tensor(value: float):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray([value], dtype=np.float32))

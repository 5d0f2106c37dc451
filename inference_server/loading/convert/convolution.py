"""Convolution and Deconvolution: ONNX Conv / ConvTranspose with the same weight layouts as Caffe."""

from __future__ import annotations

from .builder import LayerContext
from .registry import converts


def _per_axis(values, n: int, default: int, what: str, ctx: LayerContext) -> list[int]:
    values = list(values)
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ctx.unsupported(f"{len(values)} {what} values for {n} spatial axes")
    return values


def conv_geometry(p, n_spatial: int, ctx: LayerContext) -> dict:
    """Kernel, stride, pad and dilation per spatial axis, read the way Caffe's BaseConvolutionLayer reads them."""
    if p.HasField("kernel_h") or p.HasField("kernel_w"):
        kernel = [p.kernel_h, p.kernel_w]
    else:
        kernel = _per_axis(p.kernel_size, n_spatial, 0, "kernel_size", ctx)
    if p.HasField("stride_h") or p.HasField("stride_w"):
        stride = [p.stride_h, p.stride_w]
    else:
        stride = _per_axis(p.stride, n_spatial, 1, "stride", ctx)
    if p.HasField("pad_h") or p.HasField("pad_w"):
        pad = [p.pad_h, p.pad_w]
    else:
        pad = _per_axis(p.pad, n_spatial, 0, "pad", ctx)
    dilation = _per_axis(p.dilation, n_spatial, 1, "dilation", ctx)
    if len(kernel) != n_spatial:
        raise ctx.unsupported(f"kernel_h/kernel_w need 2 spatial axes, the input has {n_spatial}")
    return {"kernel_shape": kernel, "strides": stride, "pads": pad + pad, "dilations": dilation}


def _convolution(ctx: LayerContext, op_type: str):
    p = ctx.layer.convolution_param
    if p.axis != 1:
        raise ctx.unsupported(f"convolution over axis {p.axis} (only the channel axis 1 is converted)")
    weight = ctx.params[0]
    n_spatial = weight.ndim - 2
    attrs = conv_geometry(p, n_spatial, ctx)
    inputs = [ctx.bottoms[0], ctx.const("weight", weight)]
    if p.bias_term:
        inputs.append(ctx.const("bias", ctx.params[1].reshape(-1)))
    outs = []
    for bottom in ctx.bottoms:  # Caffe applies the same filters to each bottom
        inputs[0] = bottom
        outs.append(ctx.op(op_type, list(inputs), group=p.group, **attrs))
    return outs


@converts("Convolution", note="Conv (groups, depthwise, dilation, rectangular kernels/pads, N-d, with or without bias)")
def convolution(ctx: LayerContext):
    return _convolution(ctx, "Conv")


@converts("Deconvolution", note="ConvTranspose (same weight layout; Caffe's output size, no output padding)")
def deconvolution(ctx: LayerContext):
    return _convolution(ctx, "ConvTranspose")

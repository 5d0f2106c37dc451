"""Pooling with Caffe's own output size and border rules, made exact in ONNX.

Caffe (pooling_layer.cpp) rounds the output size up by default (`ceil_mode`), then drops a last
window that would start in the right/bottom padding. ONNX's ceil_mode has its own rules, so we never
use it: we compute Caffe's output size and choose explicit end pads that give that size in floor mode.

AVE divides by the window clipped to the *padded* input [-pad, size+pad), not to the real input and
not to the extra end padding that ceil rounding adds. Where the symmetric padding alone gives Caffe's
size, ONNX's count_include_pad=1 is that rule exactly; otherwise we pool excluding padding and
multiply by a constant map of (real cells / Caffe's divisor) per output position.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .builder import LayerContext
from .registry import converts

MAX, AVE, STOCHASTIC = 0, 1, 2


def caffe_pooled_size(
    size: int, kernel: int, stride: int, pad: int, ceil_mode: bool, any_pad: bool | None = None
) -> int:
    """Caffe's output size along one axis. Caffe drops a last window starting in the padding on both
    axes as soon as *either* axis is padded, hence `any_pad`."""
    rounding = math.ceil if ceil_mode else math.floor
    out = int(rounding((size + 2 * pad - kernel) / stride)) + 1
    if (pad if any_pad is None else any_pad) and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def caffe_divisors(size: int, out: int, kernel: int, stride: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output position along one axis: (real input cells in the window, Caffe's AVE divisor)."""
    start = np.arange(out) * stride - pad
    end = np.minimum(start + kernel, size + pad)
    divisor = end - start
    real = np.minimum(end, size) - np.maximum(start, 0)
    return real, divisor


def _end_pad(size: int, out: int, kernel: int, stride: int, pad: int) -> int | None:
    """An end pad that makes floor-mode pooling produce exactly `out` windows: Caffe's own pad where
    that works (then padding is counted as Caffe counts it), else the least that reaches the last window."""
    def floor_out(end: int) -> int:
        return (size + pad + end - kernel) // stride + 1

    for end in (pad, max(0, (out - 1) * stride + kernel - size - pad)):
        if end < kernel and floor_out(end) == out:
            return end
    return None


def pool_geometry(p) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(kernel, stride, pad) as (h, w), read as PoolingLayer::LayerSetUp reads them."""
    kernel = (p.kernel_h, p.kernel_w) if p.HasField("kernel_h") else (p.kernel_size, p.kernel_size)
    stride = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride, p.stride)
    pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad)
    return kernel, stride, pad


@converts("Pooling", note="MaxPool / AveragePool with Caffe's ceil rounding and border divisors; "
          "GlobalMaxPool / GlobalAveragePool for global_pooling (STOCHASTIC is not converted)")
def pooling(ctx: LayerContext):
    p = ctx.layer.pooling_param
    if p.pool == STOCHASTIC:
        raise ctx.unsupported("STOCHASTIC pooling has no ONNX equivalent")
    if len(ctx.bottom_shapes[0]) != 4:
        raise ctx.unsupported(f"pooling needs a 4-D input, got {list(ctx.bottom_shapes[0])}")
    with_mask = len(ctx.layer.top) > 1  # MAX only (Caffe allows the mask top for MAX alone)
    if with_mask and p.global_pooling:
        raise ctx.unsupported("the mask top of global max pooling is not converted")
    _, _, height, width = ctx.bottom_shapes[0]
    x = ctx.bottoms[0]
    if p.global_pooling:
        return [ctx.op("GlobalMaxPool" if p.pool == MAX else "GlobalAveragePool", [x])]

    kernel, stride, pad = pool_geometry(p)
    ceil_mode = getattr(p, "ceil_mode", True)  # a field of this Caffe (default true); BVLC always rounds up
    sizes = (height, width)
    outs = [caffe_pooled_size(sizes[i], kernel[i], stride[i], pad[i], ceil_mode, any(pad)) for i in range(2)]
    expected = tuple(ctx.top_shapes[0][2:])
    if tuple(outs) != expected:
        raise ctx.unsupported(f"computed output size {outs} differs from Caffe's {list(expected)}")
    end_pads = [_end_pad(sizes[i], outs[i], kernel[i], stride[i], pad[i]) for i in range(2)]
    if None in end_pads:
        raise ctx.unsupported("a pooling window lies entirely outside the input")
    attrs: dict[str, Any] = {"kernel_shape": list(kernel), "strides": list(stride), "pads": [pad[0], pad[1], *end_pads]}

    if p.pool == MAX and with_mask:
        return max_pool_with_mask(ctx, x, height * width, attrs)
    if p.pool == MAX:
        return [ctx.op("MaxPool", [x], **attrs)]

    if list(end_pads) == list(pad):  # Caffe's divisor is the whole kernel everywhere
        return [ctx.op("AveragePool", [x], count_include_pad=1, **attrs)]
    real_h, div_h = caffe_divisors(height, outs[0], kernel[0], stride[0], pad[0])
    real_w, div_w = caffe_divisors(width, outs[1], kernel[1], stride[1], pad[1])
    ratio = (np.outer(real_h, real_w) / np.outer(div_h, div_w)).astype(np.float32)
    y = ctx.op("AveragePool", [x], count_include_pad=0, **attrs)
    if np.all(ratio == 1.0):
        return [y]
    return [ctx.op("Mul", [y, ctx.const("divisor_ratio", ratio.reshape(1, 1, *ratio.shape))])]


def max_pool_with_mask(ctx: LayerContext, x: str, plane: int, attrs: dict) -> list[str]:
    """Caffe's mask top holds, per pooled value, the index y * W + x of its input cell within the plane,
    as a float (SegNet's Upsample reads it). ONNX MaxPool's Indices count from the tensor's start, so
    the plane index is that modulo H * W. Both take the first maximum in the window's row-major order."""
    pooled, indices = ctx.op("MaxPool", [x], n_out=2, **attrs)
    within = ctx.op("Mod", [indices, ctx.const("plane", np.int64(plane), np.int64)])
    return [pooled, ctx.op("Cast", [within], to=1)]  # FLOAT

"""Interp (DeepLab v2, PSPNet, ICNet): bilinear resizing with the align-corners rule, as ONNX Resize.

The fork's layer (scripts/caffe/caffe_forks/interp_layer.cpp) first crops -pad_beg rows and columns at the
start and -pad_end at the end (both ≤ 0), then reads output pixel (y, x) at (y·(H'−1)/(Hout−1),
x·(W'−1)/(Wout−1)) of the cropped H'×W' input, weighting its four neighbours bilinearly, so corners map
to corners: ONNX Resize's `linear` mode with `align_corners`. The output size depends on shapes only
(height/width, zoom_factor, shrink_factor, or a second bottom's H×W), so it is Caffe's own top shape.
"""

from __future__ import annotations

import numpy as np

from .builder import LayerContext
from .registry import converts


def axis_samples(n_in: int, n_out: int):
    """Per output row (or column): the lower and upper input index and the two weights, in float32 as the
    layer computes them (ratio = (n_in − 1) / (n_out − 1), position = ratio · i, its fraction)."""
    i = np.arange(n_out, dtype=np.float32)
    ratio = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    pos = i if n_in == n_out else (ratio * i).astype(np.float32)
    low = pos.astype(np.int64)  # truncation: positions are >= 0
    frac = (pos - low.astype(np.float32)).astype(np.float32)
    high = np.where(low < n_in - 1, low + 1, low)
    return low, high, frac, (np.float32(1) - frac).astype(np.float32)


@converts("Interp", note="Slice for pad_beg/pad_end (cropping), then Gather of the two neighbours on each axis and "
          "the layer's own bilinear sum with its float32 weights (align corners)")
def interp(ctx: LayerContext):
    """Not ONNX Resize: its align-corners positions round differently from the layer's float32 ratio · i,
    which moved a 473-pixel PSPNet output by 8e-6 of its largest value; the same float32 weights and the
    same sum, hy·(hx·a + lx·b) + ly·(hx·c + lx·d), give the layer's values."""
    p = ctx.layer.interp_param
    if ctx.rank() != 4:
        raise ctx.unsupported(f"Interp needs a 4-D input, got {list(ctx.bottom_shapes[0])}")
    if p.pad_beg > 0 or p.pad_end > 0:
        raise ctx.unsupported("positive pad_beg/pad_end (only cropping is defined)")
    _, _, height, width = ctx.bottom_shapes[0]
    x = ctx.bottoms[0]
    if p.pad_beg or p.pad_end:
        x = ctx.op("Slice", [x, ctx.ints("starts", [-p.pad_beg] * 2),
                             ctx.ints("ends", [height + p.pad_end, width + p.pad_end]), ctx.ints("axes", [2, 3])])
    eff_h, eff_w = height + p.pad_beg + p.pad_end, width + p.pad_beg + p.pad_end
    out_h, out_w = ctx.top_shapes[0][2:]
    y_low, y_high, ly, hy = axis_samples(eff_h, out_h)
    x_low, x_high, lx, hx = axis_samples(eff_w, out_w)
    upper = ctx.op("Gather", [x, ctx.ints("y_low", y_low)], axis=2)
    lower = ctx.op("Gather", [x, ctx.ints("y_high", y_high)], axis=2)
    hx_c, lx_c = ctx.const("hx", hx.reshape(1, 1, 1, -1)), ctx.const("lx", lx.reshape(1, 1, 1, -1))

    def row_mix(rows: str) -> str:
        left = ctx.op("Gather", [rows, ctx.ints("x_low", x_low)], axis=3)
        right = ctx.op("Gather", [rows, ctx.ints("x_high", x_high)], axis=3)
        return ctx.op("Add", [ctx.op("Mul", [hx_c, left]), ctx.op("Mul", [lx_c, right])])

    top, bottom = row_mix(upper), row_mix(lower)
    return [ctx.op("Add", [ctx.op("Mul", [ctx.const("hy", hy.reshape(1, 1, -1, 1)), top]),
                           ctx.op("Mul", [ctx.const("ly", ly.reshape(1, 1, -1, 1)), bottom])])]

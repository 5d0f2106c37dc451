"""Interp (DeepLab v2, PSPNet, ICNet): bilinear resizing with the align-corners rule, as ONNX Resize.

The fork's layer (scripts/caffe/caffe_forks/interp_layer.cpp) first crops -pad_beg rows and columns at the
start and -pad_end at the end (both ≤ 0), then reads output pixel (y, x) at (y·(H'−1)/(Hout−1),
x·(W'−1)/(Wout−1)) of the cropped H'×W' input, weighting its four neighbours bilinearly, so corners map
to corners: ONNX Resize's `linear` mode with `align_corners`. The output size depends on shapes only
(height/width, zoom_factor, shrink_factor, or a second bottom's H×W), so it is Caffe's own top shape.
"""

from __future__ import annotations

from .builder import LayerContext
from .registry import converts


@converts("Interp", note="Slice for pad_beg/pad_end (cropping), then Resize (linear, align_corners) to Caffe's "
          "output size")
def interp(ctx: LayerContext):
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
    out_h, out_w = ctx.top_shapes[0][2:]
    nc = ctx.op("Slice", [ctx.op("Shape", [x]), ctx.ints("nc_start", [0]), ctx.ints("nc_end", [2])])
    sizes = ctx.op("Concat", [nc, ctx.ints("hw", [out_h, out_w])], axis=0)
    return [ctx.op("Resize", [x, "", "", sizes], mode="linear", coordinate_transformation_mode="align_corners")]

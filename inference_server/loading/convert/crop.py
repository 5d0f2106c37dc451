"""Crop (FCN's way of aligning an upsampled map with its input): ONNX Slice with Caffe's offsets.

Caffe's CropLayer keeps bottom 0's axes before `axis` and takes bottom 1's size from `axis` on,
starting at `offset` (none: 0; one: the same for every cropped axis; else one per cropped axis).
Bottom 1 only lends its shape, so the graph reads nothing from it.
"""

from __future__ import annotations

from .builder import LayerContext, canonical_axis
from .registry import converts


def crop_offsets(offsets: list[int], axis: int, rank: int) -> list[int]:
    """One offset per cropped axis (axis .. rank-1), read as CropLayer::Reshape reads them."""
    n = rank - axis
    if not offsets:
        return [0] * n
    if len(offsets) == 1:
        return offsets * n
    if len(offsets) != n:
        raise ValueError(f"{len(offsets)} offsets for the {n} axes from axis {axis}")
    return offsets


@converts("Crop", note="Slice of bottom 0 to bottom 1's shape from `axis`, at `offset` (one, or one per axis)")
def crop(ctx: LayerContext):
    p = ctx.layer.crop_param
    rank = ctx.rank()
    axis = canonical_axis(p.axis, rank)
    if axis == 0:
        raise ctx.unsupported("cropping along the batch axis")
    try:
        offsets = crop_offsets(list(p.offset), axis, rank)
    except ValueError as e:
        raise ctx.unsupported(str(e)) from None
    sizes = list(ctx.bottom_shapes[1][axis:])
    ends = [o + s for o, s in zip(offsets, sizes, strict=True)]
    return [ctx.op("Slice", [ctx.bottoms[0], ctx.ints("starts", offsets), ctx.ints("ends", ends),
                             ctx.ints("axes", list(range(axis, rank)))])]

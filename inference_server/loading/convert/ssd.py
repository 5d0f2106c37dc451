"""SSD's layers (Wei Liu's Caffe fork, which this Caffe carries): Normalize, Permute, PriorBox, and
DetectionOutput, which stays on pycaffe.

PriorBox depends only on shapes (its feature map's and the image's), never on values, so for the
input size the net is served at it is a constant, computed here the way prior_box_layer.cpp computes
it (min_size and max_size truncated to integers as that file does). Its output has batch 1 whatever
the batch, in Caffe and here.
"""

from __future__ import annotations

import math

import numpy as np

from .builder import LayerContext
from .registry import REFUSED, converts


@converts("Normalize", note="ReduceSumSquare over channels (or C,H,W with `across_spatial`) → +eps → Sqrt → "
          "Div, × the learned scale (per channel or `channel_shared`)")
def normalize(ctx: LayerContext):
    p = ctx.layer.norm_param
    if ctx.rank() != 4:
        raise ctx.unsupported(f"Normalize needs a 4-D input, got {list(ctx.bottom_shapes[0])}")
    x = ctx.bottoms[0]
    axes = [1, 2, 3] if p.across_spatial else [1]
    sq = ctx.op("ReduceSumSquare", [x], axes=axes, keepdims=1)
    norm = ctx.op("Sqrt", [ctx.op("Add", [sq, ctx.const("eps", np.float32(p.eps))])])
    y = ctx.op("Div", [x, norm])
    scale = ctx.params[0].reshape(-1)
    if p.channel_shared:
        return [ctx.op("Mul", [y, ctx.const("scale", scale[:1].reshape(()))])]
    return [ctx.op("Mul", [y, ctx.const("scale", scale.reshape(1, -1, 1, 1))])]


def permute_order(order: list[int], rank: int) -> list[int]:
    """PermuteLayer's order: the listed axes, then the unlisted ones in their order."""
    seen = []
    for axis in order:
        if axis < 0 or axis >= rank or axis in seen:
            raise ValueError(f"order {order} is not a permutation of the {rank} axes")
        seen.append(axis)
    return seen + [a for a in range(rank) if a not in seen]


@converts("Permute", note="Transpose (the listed axes first, the rest in order)")
def permute(ctx: LayerContext):
    try:
        perm = permute_order(list(ctx.layer.permute_param.order), ctx.rank())
    except ValueError as e:
        raise ctx.unsupported(str(e)) from None
    if perm[0] != 0:
        raise ctx.unsupported("moving the batch axis")
    if perm == list(range(ctx.rank())):
        return [ctx.op("Identity", ctx.bottoms[:1])]
    return [ctx.op("Transpose", ctx.bottoms[:1], perm=perm)]


def prior_boxes(p, layer_hw: tuple[int, ...], image_hw: tuple[int, ...]) -> np.ndarray:
    """PriorBox's top (1, 2, H*W*priors*4): boxes then variances, as prior_box_layer.cpp makes them."""
    ratios = [np.float32(1.0)]  # a vector<float> in Caffe
    for ar in map(np.float32, p.aspect_ratio):
        if all(abs(float(ar) - float(r)) >= 1e-6 for r in ratios):
            ratios.append(ar)
            if p.flip:
                ratios.append(np.float32(1.0 / float(ar)))
    layer_h, layer_w = layer_hw
    if p.HasField("img_h") or p.HasField("img_w"):
        img_h, img_w = p.img_h, p.img_w
    elif p.HasField("img_size"):
        img_h = img_w = p.img_size
    else:
        img_h, img_w = image_hw
    if p.HasField("step_h") or p.HasField("step_w"):
        step_h, step_w = np.float32(p.step_h), np.float32(p.step_w)
    elif p.HasField("step"):
        step_h = step_w = np.float32(p.step)
    else:
        step_h, step_w = np.float32(img_h / layer_h), np.float32(img_w / layer_w)
    offset = np.float32(p.offset)
    boxes = []
    for h in range(layer_h):
        for w in range(layer_w):
            cx = float(np.float32((np.float32(w) + offset) * step_w))
            cy = float(np.float32((np.float32(h) + offset) * step_h))
            for s, min_size in enumerate(p.min_size):
                min_size = int(min_size)
                sizes = [(float(min_size), float(min_size))]
                if p.max_size:
                    side = float(np.float32(math.sqrt(min_size * int(p.max_size[s]))))
                    sizes.append((side, side))
                for ar in ratios:
                    if abs(float(ar) - 1.0) < 1e-6:
                        continue
                    root = np.sqrt(ar)  # sqrt of a float is a float in C++
                    sizes.append((float(np.float32(min_size) * root), float(np.float32(min_size) / root)))
                for bw, bh in sizes:
                    boxes += [(cx - bw / 2.0) / img_w, (cy - bh / 2.0) / img_h,
                              (cx + bw / 2.0) / img_w, (cy + bh / 2.0) / img_h]
    coords = np.asarray(boxes, dtype=np.float32)
    if p.clip:
        coords = np.clip(coords, 0.0, 1.0)
    variance = list(p.variance) or [0.1]
    variances = np.resize(np.asarray(variance, dtype=np.float32), coords.shape)
    return np.stack([coords, variances]).reshape(1, 2, -1)


@converts("PriorBox", note="a constant: the prior boxes and variances for the served input size "
          "(they depend on shapes only)")
def prior_box(ctx: LayerContext):
    if ctx.rank() != 4:
        raise ctx.unsupported(f"PriorBox needs a 4-D feature map, got {list(ctx.bottom_shapes[0])}")
    image = ctx.bottom_shapes[1] if len(ctx.bottom_shapes) > 1 else (0, 0, 0, 0)
    value = prior_boxes(ctx.layer.prior_box_param, ctx.bottom_shapes[0][2:], tuple(image[-2:]))
    if tuple(value.shape) != tuple(ctx.top_shapes[0]):
        raise ctx.unsupported(f"computed {list(value.shape)} prior values, Caffe has {list(ctx.top_shapes[0])}")
    return [ctx.const("priors", value)]


# Not a converter: the type stays unsupported (`caffeserve check` lists it), with this reason.
REFUSED["DetectionOutput"] = (
    "SSD's DetectionOutput (box decoding, per-class non-maximum suppression and keep_top_k, with an output "
    "whose length depends on the detections) has no exact ONNX form here; pycaffe serves this net")

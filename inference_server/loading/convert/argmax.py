"""ArgMax (SegNet's and ENet's per-pixel class map) as ONNX TopK, with Caffe's tie rule.

argmax_layer.cpp partial-sorts (value, index) pairs with std::greater, so among equal values the
*higher* index ranks first. ONNX TopK ranks the lower index first, so the graph runs TopK on the axis
reversed and maps each index i back to dim − 1 − i. Indices come out as floats, as Caffe writes them.
Without `axis`, Caffe ranks each sample's values flattened, and the top is (N, 1, top_k) — or
(N, 2, top_k): the k indices, then the k values, with `out_max_val` — padded with 1s to the bottom's rank.
"""

from __future__ import annotations

import numpy as np

from .builder import LayerContext, canonical_axis
from .registry import converts

INT64_MIN = np.iinfo(np.int64).min
FLOAT = 1  # onnx.TensorProto.FLOAT


def _top_k_last_index_first(ctx: LayerContext, x: str, axis: int, dim: int, k: int) -> tuple[str, str]:
    """(values, float indices) of the k largest along `axis`, equal values ranked by the higher index."""
    reversed_x = ctx.op("Slice", [x, ctx.ints("rev_starts", [-1]), ctx.ints("rev_ends", [INT64_MIN]),
                                  ctx.ints("rev_axes", [axis]), ctx.ints("rev_steps", [-1])])
    values, rev_index = ctx.op("TopK", [reversed_x, ctx.ints("k", [k])], n_out=2, axis=axis, largest=1, sorted=1)
    index = ctx.op("Sub", [ctx.ints("last", np.int64(dim - 1)), rev_index])
    return values, ctx.op("Cast", [index], to=FLOAT)


@converts("ArgMax", note="TopK on the reversed axis (Caffe ranks equal values by the higher index), indices "
          "as floats; `top_k`, `out_max_val`, `axis` or each sample flattened")
def argmax(ctx: LayerContext):
    p = ctx.layer.argmax_param
    shape = ctx.bottom_shapes[0]
    k = int(p.top_k)
    if p.HasField("axis"):
        axis = canonical_axis(p.axis, len(shape))
        if axis == 0:
            raise ctx.unsupported("ranking along the batch axis")
        values, index = _top_k_last_index_first(ctx, ctx.bottoms[0], axis, shape[axis], k)
        return [values if p.out_max_val else index]
    dim = int(np.prod(shape[1:]))
    flat = ctx.op("Reshape", [ctx.bottoms[0], ctx.ints("flat", [0, dim])])
    values, index = _top_k_last_index_first(ctx, flat, 1, dim, k)
    top = list(ctx.top_shapes[0])
    ranked = ctx.op("Concat", [index, values], axis=1) if p.out_max_val else index
    return [ctx.op("Reshape", [ranked, ctx.ints("shape", [0, *top[1:]])])]

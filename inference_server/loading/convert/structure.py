"""Layers that move data around or change its shape: Input, Split, Concat, Slice, Flatten, Reshape,
InnerProduct, Softmax, Silence. Batch stays dynamic: target shapes copy leading dimensions (ONNX 0)
or infer them (-1) exactly where Caffe does, instead of baking in the batch size."""

from __future__ import annotations

import numpy as np

from .builder import LayerContext, canonical_axis
from .registry import converts


@converts("Input", note="a graph input (batch dimension dynamic)")
def input_layer(ctx: LayerContext):
    return list(ctx.layer.top)  # the graph inputs carry the blob names themselves


@converts("Split", note="nothing: every top is the bottom's value (Caffe inserts these itself)")
def split(ctx: LayerContext):
    return [ctx.bottoms[0]] * len(ctx.layer.top)


@converts("Silence", note="nothing")
def silence(ctx: LayerContext):
    return []


@converts("Concat", note="Concat")
def concat(ctx: LayerContext):
    p = ctx.layer.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") else canonical_axis(p.axis, ctx.rank())
    if len(ctx.bottoms) == 1:
        return [ctx.op("Identity", ctx.bottoms)]
    return [ctx.op("Concat", ctx.bottoms, axis=axis)]


@converts("Slice", note="Split at the slice points (not along the batch axis)")
def slice_layer(ctx: LayerContext):
    p = ctx.layer.slice_param
    axis = p.slice_dim if p.HasField("slice_dim") else canonical_axis(p.axis, ctx.rank())
    if axis == 0:
        raise ctx.unsupported("slicing along the batch axis")
    sizes = [shape[axis] for shape in ctx.top_shapes]
    if len(sizes) == 1:
        return [ctx.op("Identity", ctx.bottoms[:1])]
    return ctx.op("Split", [ctx.bottoms[0], ctx.ints("sizes", sizes)], n_out=len(sizes), axis=axis)


@converts("Flatten", note="Reshape (leading axes copied, the flattened range inferred)")
def flatten(ctx: LayerContext):
    p = ctx.layer.flatten_param
    rank = ctx.rank()
    axis, end = canonical_axis(p.axis, rank), canonical_axis(p.end_axis, rank)
    target = [0] * axis + [-1] + list(ctx.bottom_shapes[0][end + 1:])
    return [ctx.op("Reshape", [ctx.bottoms[0], ctx.ints("shape", target)])]


@converts("Reshape", note="Reshape with Caffe's 0 (copy) and -1 (infer) kept as ONNX's own")
def reshape(ctx: LayerContext):
    p = ctx.layer.reshape_param
    bottom = list(ctx.bottom_shapes[0])
    rank = len(bottom)
    start = p.axis if p.axis >= 0 else rank + p.axis + 1
    end = rank if p.num_axes == -1 else start + p.num_axes
    dims = list(p.shape.dim)
    trailing = bottom[end:]
    if len(dims) == end - start:
        trailing = [0] * len(trailing)  # same positions in and out: copy
    elif end == 0 and trailing:
        raise ctx.unsupported("inserting axes before the batch axis")
    target = [0] * start + dims + trailing
    return [ctx.op("Reshape", [ctx.bottoms[0], ctx.ints("shape", target)])]


@converts("InnerProduct", note="Gemm (axis 1), or Reshape + MatMul + Add for a later axis; transpose honoured")
def inner_product(ctx: LayerContext):
    p = ctx.layer.inner_product_param
    axis = canonical_axis(p.axis, ctx.rank())
    if axis == 0:
        raise ctx.unsupported("axis 0 folds the batch into one inner product")
    weight = ctx.params[0].reshape(ctx.params[0].shape[-2:])  # (num_output, K), or (K, num_output) if transpose
    bias = ctx.params[1].reshape(-1) if p.bias_term else None
    x = ctx.bottoms[0]
    if axis == 1:
        if ctx.rank() != 2:
            x = ctx.op("Flatten", [x], axis=1)
        inputs = [x, ctx.const("weight", weight)] + ([ctx.const("bias", bias)] if bias is not None else [])
        return [ctx.op("Gemm", inputs, transB=0 if p.transpose else 1)]
    x = ctx.op("Reshape", [x, ctx.ints("shape", [0] * axis + [-1])])
    y = ctx.op("MatMul", [x, ctx.const("weight", weight if p.transpose else np.ascontiguousarray(weight.T))])
    if bias is not None:
        y = ctx.op("Add", [y, ctx.const("bias", bias)])
    return [y]


@converts("Softmax", note="Softmax over `axis`")
def softmax(ctx: LayerContext):
    axis = canonical_axis(ctx.layer.softmax_param.axis, ctx.rank())
    return [ctx.op("Softmax", ctx.bottoms[:1], axis=axis)]

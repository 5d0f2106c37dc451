"""Eltwise, Scale and Bias: broadcasting arithmetic shaped the way Caffe lines up its axes."""

from __future__ import annotations

import numpy as np

from .builder import LayerContext, canonical_axis
from .registry import converts

PROD, SUM, MAX = 0, 1, 2


@converts("Eltwise", note="Sum / Add (Mul by each coefficient first), Mul for PROD, Max for MAX")
def eltwise(ctx: LayerContext):
    p = ctx.layer.eltwise_param
    xs = list(ctx.bottoms)
    if p.operation == PROD:
        y = xs[0]
        for x in xs[1:]:
            y = ctx.op("Mul", [y, x])
        return [y]
    if p.operation == MAX:
        return [ctx.op("Max", xs)]
    coeffs = list(p.coeff)
    if coeffs and len(coeffs) != len(xs):
        raise ctx.unsupported(f"{len(coeffs)} coefficients for {len(xs)} bottoms")
    terms = [x if not coeffs or coeffs[i] == 1 else ctx.op("Mul", [x, ctx.const(f"coeff{i}", np.float32(coeffs[i]))])
             for i, x in enumerate(xs)]
    if len(terms) == 1:
        return [terms[0] if terms[0] != xs[0] else ctx.op("Identity", terms)]
    if len(terms) == 2:
        return [ctx.op("Add", terms)]
    return [ctx.op("Sum", terms)]


def _broadcastable(ctx: LayerContext, value: np.ndarray, axis: int) -> np.ndarray:
    """A parameter that covers axes [axis, axis + ndim) of the bottom, padded with 1s on the right."""
    trailing = ctx.rank() - axis - value.ndim
    if trailing < 0:
        raise ctx.unsupported(f"a parameter of shape {list(value.shape)} does not fit at axis {axis}")
    return value.reshape(*value.shape, *([1] * trailing))


def _runtime_operand(ctx: LayerContext, axis: int) -> str:
    """The second bottom as the operand, reshaped to broadcast from `axis` (e.g. SE blocks' N×C scales)."""
    other = ctx.bottom_shapes[1]
    trailing = ctx.rank() - axis - len(other)
    if trailing < 0:
        raise ctx.unsupported(f"bottom of shape {list(other)} does not fit at axis {axis}")
    if trailing == 0:
        return ctx.bottoms[1]
    return ctx.op("Reshape", [ctx.bottoms[1], ctx.ints("shape", [0] * len(other) + [1] * trailing)])


def _scale_axis(ctx: LayerContext, p) -> int:
    return canonical_axis(p.axis, ctx.rank())


@converts("Scale", note="Mul (+ Add for bias_term); a learned scale or a second bottom, from `axis`")
def scale(ctx: LayerContext):
    p = ctx.layer.scale_param
    axis = _scale_axis(ctx, p)
    params = list(ctx.params)
    if len(ctx.bottoms) > 1:
        factor = _runtime_operand(ctx, axis)
    else:
        factor = ctx.const("scale", _broadcastable(ctx, params.pop(0), axis))
    y = ctx.op("Mul", [ctx.bottoms[0], factor])
    if p.bias_term:
        y = ctx.op("Add", [y, ctx.const("bias", _broadcastable(ctx, params[0], axis))])
    return [y]


@converts("Bias", note="Add of a learned bias or a second bottom, from `axis`")
def bias(ctx: LayerContext):
    p = ctx.layer.bias_param
    axis = _scale_axis(ctx, p)
    if len(ctx.bottoms) > 1:
        term = _runtime_operand(ctx, axis)
    else:
        term = ctx.const("bias", _broadcastable(ctx, ctx.params[0], axis))
    return [ctx.op("Add", [ctx.bottoms[0], term])]

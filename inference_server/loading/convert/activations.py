"""Element-wise activations and Caffe's little math layers, each as the ONNX ops of Caffe's formula."""

from __future__ import annotations

import math

import numpy as np

from .builder import LayerContext
from .registry import converts


@converts("ReLU", note="Relu, or LeakyRelu(alpha=negative_slope)")
def relu(ctx: LayerContext):
    slope = ctx.layer.relu_param.negative_slope
    if slope == 0:
        return [ctx.op("Relu", ctx.bottoms[:1])]
    return [ctx.op("LeakyRelu", ctx.bottoms[:1], alpha=float(slope))]


@converts("PReLU", note="PRelu with the slopes broadcast over the channel axis (or one shared slope)")
def prelu(ctx: LayerContext):
    slope = ctx.params[0].reshape(-1)
    if not ctx.layer.prelu_param.channel_shared:
        slope = slope.reshape(-1, *([1] * (ctx.rank() - 2)))
    return [ctx.op("PRelu", [ctx.bottoms[0], ctx.const("slope", slope)])]


@converts("Sigmoid", note="Sigmoid")
def sigmoid(ctx: LayerContext):
    return [ctx.op("Sigmoid", ctx.bottoms[:1])]


@converts("TanH", note="Tanh")
def tanh(ctx: LayerContext):
    return [ctx.op("Tanh", ctx.bottoms[:1])]


@converts("ELU", note="Elu(alpha)")
def elu(ctx: LayerContext):
    return [ctx.op("Elu", ctx.bottoms[:1], alpha=float(ctx.layer.elu_param.alpha))]


@converts("AbsVal", note="Abs")
def absval(ctx: LayerContext):
    return [ctx.op("Abs", ctx.bottoms[:1])]


@converts("BNLL", note="Softplus (log(1 + exp(x)))")
def bnll(ctx: LayerContext):
    return [ctx.op("Softplus", ctx.bottoms[:1])]


@converts("Dropout", note="nothing: the identity at inference (× (1 − ratio) where scale_train is false)")
def dropout(ctx: LayerContext):
    p = ctx.layer.dropout_param
    if getattr(p, "scale_train", True):
        return [ctx.bottoms[0]]  # no node: the top is the bottom's value
    return [ctx.op("Mul", [ctx.bottoms[0], ctx.const("keep", np.float32(1.0 - p.dropout_ratio))])]


@converts("Power", note="Mul, Add, Pow: (shift + scale·x)^power, skipping the identity steps")
def power(ctx: LayerContext):
    p = ctx.layer.power_param
    x = ctx.bottoms[0]
    if p.power == 0 or p.scale == 0:  # Caffe fills a constant
        value = 1.0 if p.power == 0 else math.pow(p.shift, p.power)
        return [ctx.op("Expand", [ctx.const("value", np.float32(value)), ctx.op("Shape", [x])])]
    if p.scale != 1:
        x = ctx.op("Mul", [x, ctx.const("scale", np.float32(p.scale))])
    if p.shift != 0:
        x = ctx.op("Add", [x, ctx.const("shift", np.float32(p.shift))])
    if p.power != 1:
        x = ctx.op("Pow", [x, ctx.const("power", np.float32(p.power))])
    if x == ctx.bottoms[0]:
        x = ctx.op("Identity", [x])
    return [x]


@converts("Exp", note="Exp, scaled as Caffe does: base^(shift + scale·x)")
def exp(ctx: LayerContext):
    p = ctx.layer.exp_param
    log_base = 1.0 if p.base == -1 else math.log(p.base)
    inner, outer = np.float32(log_base * p.scale), np.float32(1.0 if p.shift == 0 else math.exp(log_base * p.shift))
    x = ctx.bottoms[0]
    if inner != 1:
        x = ctx.op("Mul", [x, ctx.const("inner_scale", inner)])
    x = ctx.op("Exp", [x])
    if outer != 1:
        x = ctx.op("Mul", [x, ctx.const("outer_scale", outer)])
    return [x]


@converts("Log", note="Log, scaled as Caffe does: log_base(shift + scale·x)")
def log(ctx: LayerContext):
    p = ctx.layer.log_param
    base_scale = np.float32(1.0 if p.base == -1 else 1.0 / math.log(p.base))
    x = ctx.bottoms[0]
    if p.scale != 1:
        x = ctx.op("Mul", [x, ctx.const("scale", np.float32(p.scale))])
    if p.shift != 0:
        x = ctx.op("Add", [x, ctx.const("shift", np.float32(p.shift))])
    x = ctx.op("Log", [x])
    if base_scale != 1:
        x = ctx.op("Mul", [x, ctx.const("base_scale", base_scale)])
    return [x]

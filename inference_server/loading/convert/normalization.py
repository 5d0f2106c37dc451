"""BatchNorm (Caffe's stored statistics, moving-average factor included) and LRN."""

from __future__ import annotations

import numpy as np

from .builder import LayerContext
from .registry import converts

ACROSS_CHANNELS, WITHIN_CHANNEL = 0, 1


def batchnorm_statistics(params: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance as Caffe's BatchNorm uses them at inference.

    Caffe stores running sums: blobs 0 and 1 are the mean and variance multiplied by the
    moving-average factor in blob 2, and divides them by that factor (0 when the factor is 0),
    in float32. Forgetting the factor, or dividing by (factor + eps) as the PyPI converter
    caffe2onnx does, shifts every normalized value.
    """
    factor = np.float32(params[2].reshape(-1)[0])
    scale = np.float32(0.0) if factor == 0 else np.float32(1.0) / factor
    return (params[0].reshape(-1) * scale).astype(np.float32), (params[1].reshape(-1) * scale).astype(np.float32)


@converts("BatchNorm", note="BatchNormalization with mean and variance divided by the stored moving-average factor")
def batchnorm(ctx: LayerContext):
    p = ctx.layer.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        raise ctx.unsupported("use_global_stats: false normalizes with each batch's own statistics")
    if ctx.rank() < 2:
        raise ctx.unsupported("BatchNorm over a 1-D blob")
    mean, var = batchnorm_statistics(ctx.params)
    channels = mean.shape[0]
    inputs = [ctx.bottoms[0], ctx.const("gamma", np.ones(channels)), ctx.const("beta", np.zeros(channels)),
              ctx.const("mean", mean), ctx.const("var", var)]
    return [ctx.op("BatchNormalization", inputs, epsilon=float(np.float32(p.eps)))]


@converts("LRN", note="LRN across channels (same formula); within a channel as x · (1 + α·avg(x²))^−β")
def lrn(ctx: LayerContext):
    p = ctx.layer.lrn_param
    if p.local_size % 2 == 0:
        raise ctx.unsupported("an even local_size")
    x = ctx.bottoms[0]
    if p.norm_region == ACROSS_CHANNELS:
        return [ctx.op("LRN", [x], size=p.local_size, alpha=float(p.alpha), beta=float(p.beta), bias=float(p.k))]
    # Caffe: x² → AVE pool (local_size, pad (size-1)/2, stride 1) → Power(shift 1, scale α, power −β) → × x
    pad = (p.local_size - 1) // 2
    squared = ctx.op("Mul", [x, x])
    pooled = ctx.op("AveragePool", [squared], kernel_shape=[p.local_size] * 2, strides=[1, 1],
                    pads=[pad] * 4, count_include_pad=1)
    scaled = ctx.op("Add", [ctx.op("Mul", [pooled, ctx.const("alpha", np.float32(p.alpha))]),
                            ctx.const("one", np.float32(1.0))])
    factor = ctx.op("Pow", [scaled, ctx.const("neg_beta", np.float32(-p.beta))])
    return [ctx.op("Mul", [x, factor])]

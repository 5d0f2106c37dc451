"""NumPy implementations of the fork layers' published definitions, and nets built with their constructs.

The references here are written from the definitions (scripts/caffe/caffe_forks/*.cpp say which), not from
our C++: tests compare pycaffe's output with them, then ONNX Runtime's with pycaffe's.
"""

from __future__ import annotations

import numpy as np


def axpy(a: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return a.reshape(x.shape[0], x.shape[1], *([1] * (x.ndim - 2))) * x + y


def shuffle_channel(x: np.ndarray, group: int) -> np.ndarray:
    n, c = x.shape[:2]
    return x.reshape(n, group, c // group, *x.shape[2:]).swapaxes(1, 2).reshape(x.shape)


def depthwise_conv(x, weight, bias, kernel, stride, pad, dilation) -> np.ndarray:
    """Output channel o convolves input channel o // (num_output / C) with weight[o, 0]."""
    n, c, h, w = x.shape
    o_ch = weight.shape[0]
    mult = o_ch // c
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, pad, dilation
    oh = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), np.float64)
    padded[:, :, ph:ph + h, pw:pw + w] = x
    out = np.zeros((n, o_ch, oh, ow), np.float64)
    for o in range(o_ch):
        src = padded[:, o // mult]
        for ky in range(kh):
            for kx in range(kw):
                ys, xs = ky * dh, kx * dw
                out[:, o] += weight[o, 0, ky, kx] * src[:, ys:ys + sh * (oh - 1) + 1:sh, xs:xs + sw * (ow - 1) + 1:sw]
        if bias is not None:
            out[:, o] += bias[o]
    return out


def bn_inference(x, scale, shift) -> np.ndarray:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return scale.reshape(shape) * x + shift.reshape(shape)


def bn_learn(x, scale, shift, eps: float = 1e-9):
    """SegNet's LEARN mode: the batch's own mean and biased variance over N, H, W; and those statistics."""
    axes = (0,) + tuple(range(2, x.ndim))
    xd = x.astype(np.float64)
    mean, var = xd.mean(axis=axes, keepdims=True), xd.var(axis=axes, keepdims=True)
    y = (xd - mean) / np.sqrt(var + eps)
    return bn_inference(y, scale, shift), mean.reshape(1, -1, 1, 1), var.reshape(1, -1, 1, 1)


def max_pool_with_mask(x, kernel: int, stride: int):
    """Caffe MAX pooling (no padding, ceil rounding) and its mask: the first maximum's index y * W + x."""
    n, c, h, w = x.shape
    oh, ow = -(-(h - kernel) // stride) + 1, -(-(w - kernel) // stride) + 1
    pooled = np.zeros((n, c, oh, ow), x.dtype)
    mask = np.zeros((n, c, oh, ow), np.float32)
    for i in range(oh):
        for j in range(ow):
            y0, x0 = i * stride, j * stride
            win = x[:, :, y0:min(y0 + kernel, h), x0:min(x0 + kernel, w)]
            flat = win.reshape(n, c, -1)
            arg = flat.argmax(axis=2)  # numpy takes the first maximum, as Caffe's strict > does
            pooled[:, :, i, j] = flat.max(axis=2)
            wy, wx = np.divmod(arg, win.shape[3])
            mask[:, :, i, j] = (y0 + wy) * w + (x0 + wx)
    return pooled, mask


def unpool(x, mask, out_h: int, out_w: int) -> np.ndarray:
    """SegNet's Upsample: zeros, with each value written at its mask index in the output plane."""
    n, c = x.shape[:2]
    out = np.zeros((n, c, out_h * out_w), x.dtype)
    idx = mask.reshape(n, c, -1).astype(np.int64)
    np.put_along_axis(out, idx, x.reshape(n, c, -1), axis=2)
    return out.reshape(n, c, out_h, out_w)


def nearest_upsample(x, scale: int) -> np.ndarray:
    return x.repeat(scale, axis=-1).repeat(scale, axis=-2)


def normalize(x, scale, across_spatial: bool, channel_shared: bool, eps: float = 1e-10) -> np.ndarray:
    xd = x.astype(np.float64)
    axes = (1, 2, 3) if across_spatial else (1,)
    y = xd / np.sqrt((xd ** 2).sum(axis=axes, keepdims=True) + eps)
    return y * (scale.reshape(-1)[0] if channel_shared else scale.reshape(1, -1, 1, 1))


# --- one net per model family, with the constructs of the published deploy files --------------------

def ssd_head(detection: bool = True):
    """An SSD head (VGG-SSD, MobileNet-SSD, OpenCV's face detector): Normalize on the first feature map,
    loc/conf convolutions → Permute → Flatten, PriorBox per map, Concat, conf Reshape → Softmax → Flatten,
    and DetectionOutput with OpenCV's `clip`. Without `detection`, the three concatenated tensors are the outputs."""
    import caffe
    from caffe import layers as L, params as P

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 32, 32]))
    n.conv1 = L.Convolution(n.data, num_output=8, kernel_size=3, pad=1, stride=2)  # 16 x 16
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.conv1_norm = L.Normalize(n.conv1, norm_param=dict(across_spatial=False, channel_shared=False,
                                                        scale_filler=dict(type="constant", value=20)))
    n.conv2 = L.Convolution(n.conv1, num_output=8, kernel_size=3, pad=1, stride=2)  # 8 x 8
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    locs, confs, priors = [], [], []
    classes = 3
    for name, fmap, (lo, hi), step in (("conv1_norm", n.conv1_norm, (6, 12), 2), ("conv2", n.conv2, (12, 24), 4)):
        n[f"{name}_loc"] = L.Convolution(fmap, num_output=4 * 4, kernel_size=3, pad=1)
        n[f"{name}_loc_perm"] = L.Permute(n[f"{name}_loc"], order=[0, 2, 3, 1])
        n[f"{name}_loc_flat"] = L.Flatten(n[f"{name}_loc_perm"], axis=1)
        n[f"{name}_conf"] = L.Convolution(fmap, num_output=4 * classes, kernel_size=3, pad=1)
        n[f"{name}_conf_perm"] = L.Permute(n[f"{name}_conf"], order=[0, 2, 3, 1])
        n[f"{name}_conf_flat"] = L.Flatten(n[f"{name}_conf_perm"], axis=1)
        n[f"{name}_priorbox"] = L.PriorBox(fmap, n.data, min_size=lo, max_size=hi, aspect_ratio=[2], flip=True,
                                           clip=False, variance=[0.1, 0.1, 0.2, 0.2], step=step, offset=0.5)
        locs.append(n[f"{name}_loc_flat"])
        confs.append(n[f"{name}_conf_flat"])
        priors.append(n[f"{name}_priorbox"])
    n.mbox_loc = L.Concat(*locs, axis=1)
    n.mbox_conf = L.Concat(*confs, axis=1)
    n.mbox_priorbox = L.Concat(*priors, axis=2)
    n.mbox_conf_reshape = L.Reshape(n.mbox_conf, shape=dict(dim=[0, -1, classes]))
    n.mbox_conf_softmax = L.Softmax(n.mbox_conf_reshape, axis=2)
    n.mbox_conf_flatten = L.Flatten(n.mbox_conf_softmax, axis=1)
    if detection:
        n.detection_out = L.DetectionOutput(
            n.mbox_loc, n.mbox_conf_flatten, n.mbox_priorbox,
            detection_output_param=dict(num_classes=classes, share_location=True, background_label_id=0,
                                        nms_param=dict(nms_threshold=0.45, top_k=100),
                                        code_type=P.PriorBox.CENTER_SIZE, keep_top_k=50,
                                        confidence_threshold=0.01, clip=True))
    return n


def segnet_block(height: int = 15, width: int = 20):
    """SegNet's encoder–decoder: conv → BN (INFERENCE) → ReLU → MAX Pooling with its mask top, and the
    decoder's Upsample from that mask (upsample_h/upsample_w where the size is odd, as SegNet's files do)."""
    import caffe
    from caffe import layers as L, params as P

    def conv_bn_relu(n, name, bottom, channels):
        n[name] = L.Convolution(bottom, num_output=channels, kernel_size=3, pad=1)
        n[f"{name}_bn"] = L.BN(n[name], bn_param=dict(bn_mode=1, scale_filler=dict(type="constant", value=1),
                                                       shift_filler=dict(type="constant", value=0.001)),
                               in_place=True)
        n[f"{name}_relu"] = L.ReLU(n[name], in_place=True)
        return n[name]

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, height, width]))
    x = conv_bn_relu(n, "conv1", n.data, 8)
    n.pool1, n.pool1_mask = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=2, stride=2, ntop=2)
    x = conv_bn_relu(n, "conv2", n.pool1, 8)
    n.pool2, n.pool2_mask = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=2, stride=2, ntop=2)
    x = conv_bn_relu(n, "conv3", n.pool2, 8)
    n.upsample2 = L.Upsample(x, n.pool2_mask, upsample_param=dict(scale=2))
    x = conv_bn_relu(n, "conv2_D", n.upsample2, 8)
    n.upsample1 = L.Upsample(x, n.pool1_mask, upsample_param=dict(scale=2, upsample_h=height, upsample_w=width))
    n.conv1_D = L.Convolution(n.upsample1, num_output=4, kernel_size=3, pad=1)
    n.prob = L.Softmax(n.conv1_D)
    return n


def enet_block(bn_mode: int = 1):
    """ENet's initial block (conv ‖ max-pool → Concat → BN → PReLU), a bottleneck with asymmetric and
    dilated convolutions, a downsampling bottleneck that keeps the pooling mask, and the decoder's Upsample."""
    import caffe
    from caffe import layers as L, params as P

    def bn(n, name, bottom):
        n[name] = L.BN(bottom, bn_param=dict(bn_mode=bn_mode, scale_filler=dict(type="constant", value=1),
                                             shift_filler=dict(type="constant", value=0.001)))
        n[f"{name}_prelu"] = L.PReLU(n[name])
        return n[f"{name}_prelu"]

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 16, 16]))
    n.conv0_1 = L.Convolution(n.data, num_output=13, kernel_size=3, pad=1, stride=2)
    n.pool0_1 = L.Pooling(n.data, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.concat0_1 = L.Concat(n.conv0_1, n.pool0_1, axis=1)  # 16 x 8 x 8
    x0 = bn(n, "bn0_1", n.concat0_1)
    n.conv1_1 = L.Convolution(x0, num_output=4, kernel_size=1, bias_term=False)
    x = bn(n, "bn1_1", n.conv1_1)
    n.conv1_2a = L.Convolution(x, num_output=4, kernel_h=5, kernel_w=1, pad_h=2, pad_w=0, bias_term=False)
    n.conv1_2b = L.Convolution(n.conv1_2a, num_output=4, kernel_h=1, kernel_w=5, pad_h=0, pad_w=2)
    x = bn(n, "bn1_2", n.conv1_2b)
    n.conv1_3 = L.Convolution(x, num_output=4, kernel_size=3, pad=2, dilation=2)
    x = bn(n, "bn1_3", n.conv1_3)
    n.conv1_4 = L.Convolution(x, num_output=16, kernel_size=1, bias_term=False)
    x = bn(n, "bn1_4", n.conv1_4)
    n.drop1 = L.Dropout(x, dropout_ratio=0.1, in_place=True)
    n.eltwise1 = L.Eltwise(x, x0)
    n.pool2, n.pool2_mask = L.Pooling(n.eltwise1, pool=P.Pooling.MAX, kernel_size=2, stride=2, ntop=2)
    n.conv2_1 = L.Convolution(n.pool2, num_output=16, kernel_size=3, pad=1)
    x = bn(n, "bn2_1", n.conv2_1)
    n.upsample2 = L.Upsample(x, n.pool2_mask, upsample_param=dict(scale=2))
    n.deconv = L.Deconvolution(n.upsample2, convolution_param=dict(num_output=4, kernel_size=2, stride=2))
    return n


def se_block():
    """A squeeze-and-excitation residual block as SE-ResNet-50 writes it: global AVE pooling → 1x1 down →
    ReLU → 1x1 up → Sigmoid, and Axpy(scale, residual branch, shortcut) fusing the scaling and the sum."""
    import caffe
    from caffe import layers as L, params as P

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 8, 9, 7]))
    n.conv = L.Convolution(n.data, num_output=8, kernel_size=3, pad=1)
    n.conv_relu = L.ReLU(n.conv, in_place=True)
    n.conv_2 = L.Convolution(n.conv, num_output=8, kernel_size=1)
    n.global_pool = L.Pooling(n.conv_2, pool=P.Pooling.AVE, global_pooling=True)
    n.down = L.Convolution(n.global_pool, num_output=2, kernel_size=1)
    n.down_relu = L.ReLU(n.down, in_place=True)
    n.up = L.Convolution(n.down, num_output=8, kernel_size=1)
    n.prob = L.Sigmoid(n.up, in_place=True)
    n.axpy = L.Axpy(n.up, n.conv_2, n.data)
    n.out = L.ReLU(n.axpy, in_place=True)
    return n


def shufflenet_unit():
    """ShuffleNet's units: grouped 1x1 conv → BatchNorm/Scale → ReLU → ShuffleChannel → 3x3
    ConvolutionDepthwise → BatchNorm/Scale → grouped 1x1 → sum with the input; and the stride-2 unit
    (depthwise stride 2, AVE-pooled shortcut, Concat)."""
    import caffe
    from caffe import layers as L, params as P

    def bn_scale(n, name, bottom, relu=False):
        n[f"{name}_bn"] = L.BatchNorm(bottom, in_place=True)
        n[f"{name}_scale"] = L.Scale(bottom, bias_term=True, in_place=True)
        if relu:
            n[f"{name}_relu"] = L.ReLU(bottom, in_place=True)
        return bottom

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 12, 8, 8]))
    n.gconv1 = L.Convolution(n.data, num_output=12, kernel_size=1, group=3, bias_term=False)
    x = bn_scale(n, "gconv1", n.gconv1, relu=True)
    n.shuffle1 = L.ShuffleChannel(x, shuffle_channel_param=dict(group=3))
    n.dwconv1 = L.ConvolutionDepthwise(n.shuffle1, convolution_param=dict(num_output=12, kernel_size=3, pad=1,
                                                                         bias_term=False))
    x = bn_scale(n, "dwconv1", n.dwconv1)
    n.gconv2 = L.Convolution(x, num_output=12, kernel_size=1, group=3, bias_term=False)
    x = bn_scale(n, "gconv2", n.gconv2)
    n.sum1 = L.Eltwise(n.data, x)
    n.sum1_relu = L.ReLU(n.sum1, in_place=True)
    # stride 2: the shortcut is AVE-pooled and concatenated
    n.gconv3 = L.Convolution(n.sum1, num_output=12, kernel_size=1, group=3, bias_term=False)
    x = bn_scale(n, "gconv3", n.gconv3, relu=True)
    n.shuffle2 = L.ShuffleChannel(x, shuffle_channel_param=dict(group=3))
    n.dwconv2 = L.ConvolutionDepthwise(n.shuffle2, convolution_param=dict(num_output=12, kernel_size=3, pad=1,
                                                                         stride=2, bias_term=False))
    x = bn_scale(n, "dwconv2", n.dwconv2)
    n.gconv4 = L.Convolution(x, num_output=12, kernel_size=1, group=3, bias_term=False)
    x = bn_scale(n, "gconv4", n.gconv4)
    n.shortcut = L.Pooling(n.sum1, pool=P.Pooling.AVE, kernel_size=3, stride=2)
    n.concat = L.Concat(n.shortcut, x, axis=1)
    n.out = L.ReLU(n.concat, in_place=True)
    return n


FAMILIES = {"ssd": ssd_head, "segnet": segnet_block, "enet": enet_block, "senet": se_block,
            "shufflenet": shufflenet_unit}

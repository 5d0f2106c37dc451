"""NumPy implementations of issue 25's fork layers (segmentation: Interp, PSPNet's BN; detection: ROIPooling,
PSROIPooling, YOLOv2's Reorg), written from their published definitions (scripts/caffe/caffe_forks/*.cpp
say which), not from our C++; a proposal-like Caffe Python layer; and one net per family built with the
published deploy files' constructs. Tests compare pycaffe with these references, then serve the nets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

F32 = np.float32


# --- references ---------------------------------------------------------------------------------

# interp_param settings and the matching size arguments of interp_size: the layer's tests (against this
# module) and the converter's (against pycaffe) run the same cases
INTERP_CASES = [
    ("height: 11 width: 7", {"height": 11, "width": 7}),  # up on one axis, down on the other
    ("height: 3 width: 4", {"height": 3, "width": 4}),
    ("height: 1 width: 1", {"height": 1, "width": 1}),  # r = 0: the corner
    ("zoom_factor: 3", {"zoom": 3}),
    ("zoom_factor: 8", {"zoom": 8}),
    ("shrink_factor: 2", {"shrink": 2}),
    ("shrink_factor: 3 zoom_factor: 2", {"shrink": 3, "zoom": 2}),
    ("height: 9 width: 9 pad_beg: -1 pad_end: -2", {"height": 9, "width": 9, "pad_beg": -1, "pad_end": -2}),
    ("zoom_factor: 2 pad_beg: -1 pad_end: -1", {"zoom": 2, "pad_beg": -1, "pad_end": -1}),
    ("height: 6 width: 9", {"height": 6, "width": 9}),  # the same size on one axis: a copy there
]


def interp_size(h: int, w: int, height=None, width=None, zoom=None, shrink=None, pad_beg=0, pad_end=0):
    """The DeepLab fork's Interp output size: shrink alone, zoom alone, height/width, shrink then zoom."""
    eh, ew = h + pad_beg + pad_end, w + pad_beg + pad_end
    if shrink and not zoom:
        return (eh - 1) // shrink + 1, (ew - 1) // shrink + 1
    if zoom and not shrink:
        return eh + (eh - 1) * (zoom - 1), ew + (ew - 1) * (zoom - 1)
    if height and width:
        return height, width
    oh, ow = (eh - 1) // shrink + 1, (ew - 1) // shrink + 1
    return oh + (oh - 1) * (zoom - 1), ow + (ow - 1) * (zoom - 1)


def _interp_axis(n_in: int, n_out: int):
    """Align-corners sample positions, in single precision as the fork computes them."""
    ratio = F32(n_in - 1) / F32(n_out - 1) if n_out > 1 else F32(0)
    pos = (ratio * np.arange(n_out, dtype=F32)).astype(F32)
    low = pos.astype(np.int64)  # truncation; positions are >= 0
    frac = (pos - low).astype(F32)
    high = np.where(low < n_in - 1, low + 1, low)
    return low, high, frac


def interp(x: np.ndarray, out_h: int, out_w: int, pad_beg: int = 0, pad_end: int = 0) -> np.ndarray:
    """Bilinear resize with aligned corners after cropping -pad_beg / -pad_end (both <= 0) at each end."""
    h, w = x.shape[2:]
    eh, ew = h + pad_beg + pad_end, w + pad_beg + pad_end
    crop = x[:, :, -pad_beg:-pad_beg + eh, -pad_beg:-pad_beg + ew].astype(np.float64)
    y0, y1, fy = _interp_axis(eh, out_h)
    x0, x1, fx = _interp_axis(ew, out_w)
    fx, fy = fx.astype(np.float64), fy.astype(np.float64)[:, None]
    upper = crop[:, :, y0][:, :, :, x0] * (1 - fx) + crop[:, :, y0][:, :, :, x1] * fx
    lower = crop[:, :, y1][:, :, :, x0] * (1 - fx) + crop[:, :, y1][:, :, :, x1] * fx
    return upper * (1 - fy) + lower * fy


def bn_pspnet(x, slope, bias, mean, var, eps: float = 1e-5) -> np.ndarray:
    """PSPNet's BN with its stored statistics: slope (x - mean) / sqrt(var + eps) + bias per channel."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    xd = x.astype(np.float64)
    return slope.reshape(shape) * (xd - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) + bias.reshape(shape)


def c_round(v):
    """C's round(): halves away from zero (numpy's round goes to even)."""
    v = np.asarray(v, F32)
    return (np.sign(v) * np.floor(np.abs(v) + F32(0.5))).astype(F32)


def roi_pooling(x: np.ndarray, rois: np.ndarray, pooled_h: int, pooled_w: int, scale: float) -> np.ndarray:
    """py-faster-rcnn's ROIPooling: per region, max over each of pooled_h x pooled_w cells (0 if empty)."""
    n, c, h, w = x.shape
    out = np.zeros((len(rois), c, pooled_h, pooled_w), F32)
    for r, roi in enumerate(rois.reshape(-1, 5).astype(F32)):
        b = int(roi[0])
        x1, y1, x2, y2 = (int(c_round(v * F32(scale))) for v in roi[1:])
        rh, rw = max(y2 - y1 + 1, 1), max(x2 - x1 + 1, 1)
        bh, bw = F32(rh) / F32(pooled_h), F32(rw) / F32(pooled_w)
        for ph in range(pooled_h):
            hs = min(max(int(np.floor(F32(ph) * bh)) + y1, 0), h)
            he = min(max(int(np.ceil(F32(ph + 1) * bh)) + y1, 0), h)
            for pw in range(pooled_w):
                ws = min(max(int(np.floor(F32(pw) * bw)) + x1, 0), w)
                we = min(max(int(np.ceil(F32(pw + 1) * bw)) + x1, 0), w)
                if he > hs and we > ws:
                    out[r, :, ph, pw] = x[b, :, hs:he, ws:we].max(axis=(1, 2))
    return out


def psroi_pooling(x: np.ndarray, rois: np.ndarray, output_dim: int, group_size: int, scale: float) -> np.ndarray:
    """R-FCN's PSROIPooling: cell (ph, pw) of output channel c averages input channel (c k + ph) k + pw."""
    n, c, h, w = x.shape
    k, s = group_size, F32(scale)
    out = np.zeros((len(rois), output_dim, k, k), F32)
    for r, roi in enumerate(rois.reshape(-1, 5).astype(F32)):
        b = int(roi[0])
        x1, y1 = c_round(roi[1]) * s, c_round(roi[2]) * s
        x2, y2 = (c_round(roi[3]) + F32(1)) * s, (c_round(roi[4]) + F32(1)) * s
        bh, bw = max(y2 - y1, F32(0.1)) / F32(k), max(x2 - x1, F32(0.1)) / F32(k)
        for ph in range(k):
            hs = min(max(int(np.floor(F32(ph) * bh + y1)), 0), h)
            he = min(max(int(np.ceil(F32(ph + 1) * bh + y1)), 0), h)
            for pw in range(k):
                ws = min(max(int(np.floor(F32(pw) * bw + x1)), 0), w)
                we = min(max(int(np.ceil(F32(pw + 1) * bw + x1)), 0), w)
                if he > hs and we > ws:
                    for o in range(output_dim):
                        out[r, o, ph, pw] = x[b, (o * k + ph) * k + pw, hs:he, ws:we].astype(np.float64).mean()
    return out


def reorg(x: np.ndarray, stride: int, reverse: bool = False) -> np.ndarray:
    """darknet's reorg_cpu over the input's N x C x H x W: forward reads the same memory as
    N x C/s^2 x Hs x Ws (out[flat] = in[wide]); reverse writes it (out[wide] = in[flat])."""
    n, c, h, w = x.shape
    s, cw = stride, c // (stride * stride)
    b, k, j, i = np.meshgrid(np.arange(n), np.arange(c), np.arange(h), np.arange(w), indexing="ij")
    flat = i + w * (j + h * (k + c * b))
    offset = k // cw
    wide = (i * s + offset % s) + w * s * ((j * s + offset // s) + h * s * (k % cw + cw * b))
    src, out = x.reshape(-1), np.empty(x.size, x.dtype)
    if reverse:
        out[wide.ravel()] = src[flat.ravel()]
        return out.reshape(n, cw, h * s, w * s)
    out[flat.ravel()] = src[wide.ravel()]
    return out.reshape(n, c * s * s, h // s, w // s)


# --- a Caffe Python layer, written into the model's folder by the tests ---------------------------

PROPOSAL_MODULE = '''\
"""A proposal-like Caffe Python layer (the role of py-faster-rcnn's rpn.proposal_layer): anchors on the
feature grid, moved by the RPN's box deltas, clipped to the image that im_info describes, the top_n by
objectness as (batch index, x1, y1, x2, y2) rows; top 1 (optional): their scores."""
import ast

import caffe
import numpy as np


class ProposalLayer(caffe.Layer):
    def setup(self, bottom, top):
        params = ast.literal_eval(self.param_str)
        self.stride = params["feat_stride"]
        self.sizes = np.array(params["anchor_sizes"], np.float32)
        self.top_n = params["top_n"]
        top[0].reshape(self.top_n, 5)
        if len(top) > 1:
            top[1].reshape(self.top_n, 1)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        a = len(self.sizes)
        scores = bottom[0].data[0, a:]  # (A, H, W): the foreground half of the softmax
        deltas = bottom[1].data[0].reshape(a, 4, *scores.shape[1:])
        im_h, im_w = max(float(bottom[2].data[0, 0]), 1.0), max(float(bottom[2].data[0, 1]), 1.0)
        ys, xs = np.meshgrid(np.arange(scores.shape[1]), np.arange(scores.shape[2]), indexing="ij")
        cx = (xs[None] + 0.5) * self.stride + deltas[:, 0] * self.sizes[:, None, None]
        cy = (ys[None] + 0.5) * self.stride + deltas[:, 1] * self.sizes[:, None, None]
        half_w = 0.5 * self.sizes[:, None, None] * np.exp(np.clip(deltas[:, 2], -4, 4))
        half_h = 0.5 * self.sizes[:, None, None] * np.exp(np.clip(deltas[:, 3], -4, 4))
        boxes = np.stack([np.clip(cx - half_w, 0, im_w - 1), np.clip(cy - half_h, 0, im_h - 1),
                          np.clip(cx + half_w, 0, im_w - 1), np.clip(cy + half_h, 0, im_h - 1)], axis=-1)
        order = np.argsort(-scores.ravel(), kind="stable")[: self.top_n]
        top[0].reshape(len(order), 5)
        top[0].data[:, 0] = 0
        top[0].data[:, 1:] = boxes.reshape(-1, 4)[order]
        if len(top) > 1:
            top[1].reshape(len(order), 1)
            top[1].data[:, 0] = scores.ravel()[order]

    def backward(self, top, propagate_down, bottom):
        pass
'''


def proposals(cls_prob: np.ndarray, bbox_pred: np.ndarray, im_info: np.ndarray, stride: int, sizes, top_n: int):
    """What PROPOSAL_MODULE computes, here in the test process: the regions ROIPooling then reads."""
    sizes = np.asarray(sizes, F32)
    a = len(sizes)
    scores = cls_prob[0, a:]
    deltas = bbox_pred[0].reshape(a, 4, *scores.shape[1:])
    im_h, im_w = max(float(im_info[0, 0]), 1.0), max(float(im_info[0, 1]), 1.0)
    ys, xs = np.meshgrid(np.arange(scores.shape[1]), np.arange(scores.shape[2]), indexing="ij")
    cx = (xs[None] + 0.5) * stride + deltas[:, 0] * sizes[:, None, None]
    cy = (ys[None] + 0.5) * stride + deltas[:, 1] * sizes[:, None, None]
    half_w = 0.5 * sizes[:, None, None] * np.exp(np.clip(deltas[:, 2], -4, 4))
    half_h = 0.5 * sizes[:, None, None] * np.exp(np.clip(deltas[:, 3], -4, 4))
    boxes = np.stack([np.clip(cx - half_w, 0, im_w - 1), np.clip(cy - half_h, 0, im_h - 1),
                      np.clip(cx + half_w, 0, im_w - 1), np.clip(cy + half_h, 0, im_h - 1)], axis=-1)
    order = np.argsort(-scores.ravel(), kind="stable")[:top_n]
    rois = np.zeros((len(order), 5), F32)
    rois[:, 1:] = boxes.reshape(-1, 4)[order]
    return rois


def write_proposal_module(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "proposal_layer.py").write_text(PROPOSAL_MODULE)
    return folder


# --- one net per family, with the published deploy files' constructs -----------------------------

def _psp_bn(name: str, bottom: str) -> str:
    return f"""
layer {{ name: "{name}/bn" type: "BN" bottom: "{bottom}" top: "{bottom}"
  param {{ lr_mult: 1 decay_mult: 0 }} param {{ lr_mult: 1 decay_mult: 0 }}
  param {{ lr_mult: 0 decay_mult: 0 }} param {{ lr_mult: 0 decay_mult: 0 }}
  bn_param {{ slope_filler {{ type: "constant" value: 1 }} bias_filler {{ type: "constant" value: 0 }}
             frozen: true momentum: 0.95 }} }}
layer {{ name: "{name}/relu" type: "ReLU" bottom: "{bottom}" top: "{bottom}" }}"""


def pspnet_text(size: int = 33) -> str:
    """PSPNet's head as its deploy files write it (pspnet50_ADE20K_473.prototxt): conv → 4-blob BN (frozen)
    → ReLU trunk at 1/4, the pyramid pooling module (AVE pooling to 1, 2, 3, 6 bins, 1x1 conv, BN, ReLU,
    Interp back with height/width), Concat, conv, BN, the classifier and Interp zoom_factor back up; and
    ICNet's shrink_factor Interp on a side branch."""
    feat = (size - 1) // 4 + 1  # two stride-2 3x3 pad-1 convolutions
    text = f'input: "data"\ninput_shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }}\n'
    text += """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 bias_term: false } }"""
    text += _psp_bn("conv1", "conv1")
    text += """
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 12 kernel_size: 3 stride: 2 pad: 1 bias_term: false } }"""
    text += _psp_bn("conv2", "conv2")
    branches = []
    for bins in (1, 2, 3, 6):
        k = -(-feat // bins)
        name = f"conv2_pool{bins}"
        text += f"""
layer {{ name: "{name}" type: "Pooling" bottom: "conv2" top: "{name}"
  pooling_param {{ pool: AVE kernel_size: {k} stride: {k} }} }}
layer {{ name: "{name}_conv" type: "Convolution" bottom: "{name}" top: "{name}_conv"
  convolution_param {{ num_output: 4 kernel_size: 1 bias_term: false }} }}"""
        text += _psp_bn(f"{name}_conv", f"{name}_conv")
        text += f"""
layer {{ name: "{name}_interp" type: "Interp" bottom: "{name}_conv" top: "{name}_interp"
  interp_param {{ height: {feat} width: {feat} }} }}"""
        branches.append(f"{name}_interp")
    text += '\nlayer { name: "concat" type: "Concat" bottom: "conv2" ' + " ".join(
        f'bottom: "{b}"' for b in reversed(branches)) + ' top: "concat" }'
    text += """
layer { name: "conv3" type: "Convolution" bottom: "concat" top: "conv3"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false } }"""
    text += _psp_bn("conv3", "conv3")
    text += f"""
layer {{ name: "conv3/dropout" type: "Dropout" bottom: "conv3" top: "conv3" dropout_param {{ dropout_ratio: 0.1 }} }}
layer {{ name: "conv4" type: "Convolution" bottom: "conv3" top: "conv4"
  convolution_param {{ num_output: 5 kernel_size: 1 }} }}
layer {{ name: "conv4_interp" type: "Interp" bottom: "conv4" top: "conv4_interp" interp_param {{ zoom_factor: 4 }} }}
layer {{ name: "conv4_sub" type: "Interp" bottom: "conv4" top: "conv4_sub" interp_param {{ shrink_factor: 2 }} }}
layer {{ name: "conv4_crop" type: "Interp" bottom: "conv4_interp" top: "conv4_crop"
  interp_param {{ height: {size} width: {size} pad_beg: -1 pad_end: -2 }} }}
layer {{ name: "prob" type: "Softmax" bottom: "conv4_crop" top: "prob" }}
"""
    return text


FASTER_RCNN: dict = {"feat_stride": 4, "anchor_sizes": [8, 16, 24], "top_n": 6, "classes": 4}


def faster_rcnn_text(size: int = 32) -> str:
    """Faster R-CNN's test.prototxt shape (py-faster-rcnn): a conv trunk, the RPN head (rpn_cls_score →
    Reshape to 2 x (A H) x W → Softmax → Reshape back, rpn_bbox_pred), the Python proposal layer on
    (rpn_cls_prob_reshape, rpn_bbox_pred, im_info), ROIPooling at 1/4, fc6, cls_score → cls_prob, bbox_pred."""
    p = FASTER_RCNN
    a = len(p["anchor_sizes"])
    param_str = repr({k: p[k] for k in ("feat_stride", "anchor_sizes", "top_n")})
    return f'''input: "data"
input_shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }}
input: "im_info"
input_shape {{ dim: 1 dim: 3 }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param {{ num_output: 12 kernel_size: 3 pad: 1 }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "rpn_conv/3x3" type: "Convolution" bottom: "pool2" top: "rpn/output"
  convolution_param {{ num_output: 12 kernel_size: 3 pad: 1 }} }}
layer {{ name: "rpn_relu/3x3" type: "ReLU" bottom: "rpn/output" top: "rpn/output" }}
layer {{ name: "rpn_cls_score" type: "Convolution" bottom: "rpn/output" top: "rpn_cls_score"
  convolution_param {{ num_output: {2 * a} kernel_size: 1 }} }}
layer {{ name: "rpn_bbox_pred" type: "Convolution" bottom: "rpn/output" top: "rpn_bbox_pred"
  convolution_param {{ num_output: {4 * a} kernel_size: 1 }} }}
layer {{ name: "rpn_cls_score_reshape" type: "Reshape" bottom: "rpn_cls_score" top: "rpn_cls_score_reshape"
  reshape_param {{ shape {{ dim: 0 dim: 2 dim: -1 dim: 0 }} }} }}
layer {{ name: "rpn_cls_prob" type: "Softmax" bottom: "rpn_cls_score_reshape" top: "rpn_cls_prob" }}
layer {{ name: "rpn_cls_prob_reshape" type: "Reshape" bottom: "rpn_cls_prob" top: "rpn_cls_prob_reshape"
  reshape_param {{ shape {{ dim: 0 dim: {2 * a} dim: -1 dim: 0 }} }} }}
layer {{ name: "proposal" type: "Python" bottom: "rpn_cls_prob_reshape" bottom: "rpn_bbox_pred" bottom: "im_info"
  top: "rois" python_param {{ module: "proposal_layer" layer: "ProposalLayer" param_str: "{param_str}" }} }}
layer {{ name: "roi_pool5" type: "ROIPooling" bottom: "pool2" bottom: "rois" top: "pool5"
  roi_pooling_param {{ pooled_w: 3 pooled_h: 3 spatial_scale: 0.25 }} }}
layer {{ name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6" inner_product_param {{ num_output: 16 }} }}
layer {{ name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }}
layer {{ name: "cls_score" type: "InnerProduct" bottom: "fc6" top: "cls_score"
  inner_product_param {{ num_output: {p["classes"]} }} }}
layer {{ name: "bbox_pred" type: "InnerProduct" bottom: "fc6" top: "bbox_pred"
  inner_product_param {{ num_output: {4 * p["classes"]} }} }}
layer {{ name: "cls_prob" type: "Softmax" bottom: "cls_score" top: "cls_prob" }}
'''


def rfcn_head_text(size: int = 16, k: int = 3, classes: int = 3) -> str:
    """R-FCN's head (rfcn_test.prototxt): position-sensitive score maps (classes x k^2 channels), PSROIPooling
    over the regions, AVE pooling over the k x k grid, Softmax. The region is an input here, one per image
    (the server's inputs share their batch axis; R-FCN takes its regions from the same Python proposal layer
    as Faster R-CNN)."""
    return f'''input: "data"
input_shape {{ dim: 1 dim: 4 dim: {size} dim: {size} }}
input: "rois"
input_shape {{ dim: 1 dim: 5 }}
layer {{ name: "rfcn_cls" type: "Convolution" bottom: "data" top: "rfcn_cls"
  convolution_param {{ num_output: {classes * k * k} kernel_size: 1 }} }}
layer {{ name: "psroipooled_cls_rois" type: "PSROIPooling" bottom: "rfcn_cls" bottom: "rois" top: "psroipooled_cls_rois"
  psroi_pooling_param {{ spatial_scale: 0.5 output_dim: {classes} group_size: {k} }} }}
layer {{ name: "ave_cls_score_rois" type: "Pooling" bottom: "psroipooled_cls_rois" top: "cls_score"
  pooling_param {{ pool: AVE kernel_size: {k} stride: {k} }} }}
layer {{ name: "cls_prob" type: "Softmax" bottom: "cls_score" top: "cls_prob" }}
'''


def yolov2_text(size: int = 16) -> str:
    """YOLOv2's passthrough (yolo-voc): a 1/2-resolution branch through Reorg stride 2, Concat with the
    1/4 trunk, a 1x1 detection convolution (the region step is left to the client)."""
    return f'''input: "data"
input_shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 stride: 2 }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" relu_param {{ negative_slope: 0.1 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param {{ num_output: 12 kernel_size: 3 pad: 1 stride: 2 }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" relu_param {{ negative_slope: 0.1 }} }}
layer {{ name: "conv_pass" type: "Convolution" bottom: "conv1" top: "conv_pass"
  convolution_param {{ num_output: 4 kernel_size: 1 }} }}
layer {{ name: "reorg" type: "Reorg" bottom: "conv_pass" top: "reorg" reorg_param {{ stride: 2 }} }}
layer {{ name: "concat" type: "Concat" bottom: "reorg" bottom: "conv2" top: "concat" }}
layer {{ name: "conv_det" type: "Convolution" bottom: "concat" top: "conv_det"
  convolution_param {{ num_output: 10 kernel_size: 1 }} }}
'''

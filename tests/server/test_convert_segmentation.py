"""The converter on issue 25's segmentation layers: Interp (DeepLab v2, PSPNet, ICNet) and PSPNet's 4-blob BN
beside SegNet's 2-blob BN. ONNX Runtime running the converted graph gives pycaffe's answers, max |Δ| ≤ 1e-5 ×
max(1, max |pycaffe|), and both equal a NumPy implementation of the published definition
(caffe_testing/seg_det_nets.py). A PSPNet-shaped net passes the parity gate as a whole.

Real pycaffe (with layers-25's C++ layers), real ONNX Runtime; nothing is mocked.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import caffe_testing.seg_det_nets as ref
from caffe_testing.nets import net_from_text as build
from caffe_testing.seg_det_nets import INTERP_CASES
from inference_server.loading import parity
from inference_server.loading.convert import convert_net, load_net, model_info
from inference_server.loading.selection import _parity_session_model

TOL = 1e-5




def uniform(*shape, seed=0, low=-2.0, high=2.0):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def both(proto, weights, feed: dict[str, np.ndarray], blob: str) -> tuple[np.ndarray, np.ndarray]:
    """(pycaffe's, ONNX Runtime's) value of `blob` for `feed` (converted at the net's declared shapes)."""
    net = load_net(proto, weights)
    model = convert_net(net, outputs=[blob])
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run([blob], feed)[0]
    for k, v in feed.items():
        net.blobs[k].reshape(*v.shape)
    net.reshape()
    for k, v in feed.items():
        net.blobs[k].data[...] = v
    net.forward()
    return net.blobs[blob].data.copy(), got


def close(got, want, tol=TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = float(np.abs(got - want).max())
    assert diff <= tol * max(1.0, float(np.abs(want).max())), f"max |Δ| {diff:.3g}"


@pytest.mark.parametrize("params,kw", INTERP_CASES, ids=[c[0] for c in INTERP_CASES])
def test_interp_converts_to_resize_with_aligned_corners(tmp_path, params, kw):
    h, w = 6, 5
    text = f"""
input: "data" input_shape {{ dim: 1 dim: 3 dim: {h} dim: {w} }}
layer {{ name: "interp" type: "Interp" bottom: "data" top: "out" interp_param {{ {params} }} }}
"""
    proto, weights = build(tmp_path, "interp", text)
    x = uniform(3, 3, h, w)  # a batch other than the declared one: the graph's batch is dynamic
    want, got = both(proto, weights, {"data": x}, "out")
    out_h, out_w = ref.interp_size(h, w, kw.get("height"), kw.get("width"), kw.get("zoom"), kw.get("shrink"),
                                   kw.get("pad_beg", 0), kw.get("pad_end", 0))
    close(got, want)
    close(got, ref.interp(x, out_h, out_w, kw.get("pad_beg", 0), kw.get("pad_end", 0)))


def test_interp_sized_by_a_second_bottom(tmp_path):
    text = """
input: "data" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 }
input: "like" input_shape { dim: 1 dim: 7 dim: 10 dim: 13 }
layer { name: "interp" type: "Interp" bottom: "data" bottom: "like" top: "out" }
"""
    proto, weights = build(tmp_path, "interp2", text)
    x = uniform(2, 2, 4, 4)
    want, got = both(proto, weights, {"data": x, "like": uniform(2, 7, 10, 13)}, "out")
    close(got, want)
    close(got, ref.interp(x, 10, 13))


PSP_BN = """
input: "data" input_shape {{ dim: 1 dim: 4 dim: 5 dim: 3 }}
layer {{ name: "bn" type: "BN" bottom: "data" top: "out"
  bn_param {{ slope_filler {{ type: "constant" value: 1 }} bias_filler {{ type: "constant" value: 0 }} {extra} }} }}
"""


@pytest.mark.parametrize("extra", ["frozen: true momentum: 0.95", "momentum: 0.95", "frozen: true eps: 0.001"])
def test_pspnet_bn_converts_with_its_stored_statistics(tmp_path, extra):
    """slope (x − mean) / sqrt(variance + eps) + bias, in the TEST phase whether or not `frozen` is set."""
    stats = [uniform(1, 4, 1, 1, seed=5), uniform(1, 4, 1, 1, seed=6), uniform(1, 4, 1, 1, seed=7),
             uniform(1, 4, 1, 1, seed=8, low=0.2, high=3.0)]
    proto, weights = build(tmp_path, "psp_bn", PSP_BN.format(extra=extra), {"bn": stats})
    x = uniform(3, 4, 5, 3, seed=9)
    want, got = both(proto, weights, {"data": x}, "out")
    close(got, want)
    close(got, ref.bn_pspnet(x, *stats, eps=1e-3 if "eps" in extra else 1e-5))


def test_segnet_and_pspnet_bn_in_one_net_each_convert_by_their_own_layout(tmp_path):
    text = """
input: "data" input_shape { dim: 1 dim: 4 dim: 3 dim: 3 }
layer { name: "segnet_bn" type: "BN" bottom: "data" top: "a" bn_param { bn_mode: INFERENCE } }
layer { name: "psp_bn" type: "BN" bottom: "a" top: "a"
  bn_param { slope_filler { type: "constant" value: 1 } bias_filler { type: "constant" value: 0 } frozen: true } }
"""
    scale, shift = uniform(1, 4, 1, 1, seed=1), uniform(1, 4, 1, 1, seed=2)
    stats = [uniform(1, 4, 1, 1, seed=3), uniform(1, 4, 1, 1, seed=4), uniform(1, 4, 1, 1, seed=5),
             uniform(1, 4, 1, 1, seed=6, low=0.2, high=3.0)]
    proto, weights = build(tmp_path, "two_bn", text, {"segnet_bn": [scale, shift], "psp_bn": stats})
    x = uniform(2, 4, 3, 3, seed=7)
    want, got = both(proto, weights, {"data": x}, "a")
    close(got, want)
    close(got, ref.bn_pspnet(scale * x.astype(np.float64) + shift, *stats))


def test_a_pspnet_shaped_net_passes_the_parity_gate(tmp_path):
    """PSPNet's head (4-blob BN trunk, pyramid pooling, Interp back to each size, zoom_factor, ICNet's
    shrink_factor, a cropping Interp, Softmax) converted whole and judged by the gate as `auto` judges it."""
    proto, weights = build(tmp_path, "pspnet", ref.pspnet_text())
    net = load_net(proto, weights)
    model = convert_net(net)
    info = model_info(model)
    assert {"Interp", "BN"} <= set(info["layer_types"])
    sess = ort.InferenceSession(_parity_session_model(model, info["softmax_logits"] + info["selections"]),
                                providers=["CPUExecutionProvider"])
    outputs = [name for name, _ in info["outputs"]]
    inputs = parity.parity_inputs({"data": (1, 3, 33, 33)})
    report = parity.check_parity(net, sess, outputs, info["softmax_logits"], inputs, TOL, info["selections"])
    assert report.passed, report.summary()

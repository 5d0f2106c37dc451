"""The Caffe → ONNX converter: for nets built with NetSpec and seeded random weights, ONNX Runtime
running the converted graph gives pycaffe's answers, max |Δ| ≤ 1e-5 × max(1, max |pycaffe|) on
every output, at a batch size other than the one the net declares (the batch is dynamic).

Real pycaffe, real onnx and onnxruntime; nothing is mocked.
"""

from __future__ import annotations

import caffe
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from caffe import layers as L, params as P

from caffe_testing.nets import forward, save_net
from caffe_testing.servers import REPO
from inference_server.loading.convert import UnsupportedLayer, convert_net, load_net, model_info, supported_types
from inference_server.loading.convert.pooling import caffe_pooled_size

TOL = 1e-5
BATCH = 3


def converted(ns: caffe.NetSpec, tmp_path, name: str):
    proto, weights = save_net(ns, tmp_path, name)
    model = convert_net(load_net(proto, weights))
    onnx.checker.check_model(model)
    return proto, weights, model


def run_onnx(model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed), strict=True))


def random_feed(model, seed: int = 0, batch: int = BATCH, lo: float = -2.0, hi: float = 2.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(lo, hi, (batch, *shape[1:])).astype(np.float32)
            for name, shape in model_info(model)["inputs"]}


def assert_matches_pycaffe(ns: caffe.NetSpec, tmp_path, name: str, seeds=(0, 1), **feed_kw) -> dict:
    proto, weights, model = converted(ns, tmp_path, name)
    for seed in seeds:
        feed = random_feed(model, seed, **feed_kw)
        ref = forward(proto, weights, feed)
        got = run_onnx(model, feed)
        assert set(got) == set(ref)
        for blob, r in ref.items():
            assert got[blob].shape == r.shape, blob
            diff = float(np.abs(got[blob] - r).max())
            assert diff <= TOL * max(1.0, float(np.abs(r).max())), f"{name}/{blob}: max |Δ| {diff:.3g}"
    return model


def test_convolutions_groups_depthwise_dilation_no_bias_rectangular(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 6, 13, 11]))
    n.grouped = L.Convolution(n.data, num_output=9, kernel_size=3, pad=1, group=3)
    n.depthwise = L.Convolution(n.data, num_output=6, kernel_size=3, stride=2, pad=1, group=6)
    n.dilated = L.Convolution(n.data, num_output=4, kernel_size=3, pad=2, dilation=2)
    n.no_bias = L.Convolution(n.data, num_output=4, kernel_size=1, bias_term=False)
    n.rect = L.Convolution(n.data, num_output=5, kernel_h=3, kernel_w=5, pad_h=0, pad_w=2, stride_h=2, stride_w=1)
    n.strided = L.Convolution(n.data, num_output=3, kernel_size=4, stride=3, pad=1)
    assert_matches_pycaffe(n, tmp_path, "conv")


def test_deconvolution(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4, 5, 7]))
    n.up = L.Deconvolution(n.data, convolution_param=dict(num_output=3, kernel_size=4, stride=2, pad=1))
    n.up_grouped = L.Deconvolution(n.data, convolution_param=dict(num_output=4, kernel_size=3, stride=2, group=2,
                                                                  bias_term=False))
    n.up_rect = L.Deconvolution(n.data, convolution_param=dict(num_output=2, kernel_h=2, kernel_w=3, stride_h=2,
                                                               stride_w=1, pad_w=1))
    assert_matches_pycaffe(n, tmp_path, "deconv")


# (kernel, stride, pad): chosen so that on these odd and even sizes Caffe's ceil rounding adds a last
# window past the input, drops one that would start in the padding, and AVE's divisor is clipped
POOL_GEOMETRIES = [(2, 2, 0), (3, 2, 0), (3, 2, 1), (2, 2, 1), (3, 1, 1), (3, 3, 1), (4, 3, 2), (5, 2, 2), (3, 3, 0)]


@pytest.mark.parametrize("size", [5, 6, 7, 9, 13])
def test_pooling_max_and_ave_follow_caffes_rounding_and_border_divisors(tmp_path, size):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, size, size + 2]))
    for i, (k, s, p) in enumerate(POOL_GEOMETRIES):
        setattr(n, f"max{i}", L.Pooling(n.data, pool=P.Pooling.MAX, kernel_size=k, stride=s, pad=p))
        setattr(n, f"ave{i}", L.Pooling(n.data, pool=P.Pooling.AVE, kernel_size=k, stride=s, pad=p))
    n.ave_rect = L.Pooling(n.data, pool=P.Pooling.AVE, kernel_h=3, kernel_w=2, stride_h=2, stride_w=3, pad_h=1, pad_w=0)
    n.max_rect = L.Pooling(n.data, pool=P.Pooling.MAX, kernel_h=2, kernel_w=4, stride_h=1, stride_w=2, pad_h=1, pad_w=1)
    n.ave_floor = L.Pooling(n.data, pool=P.Pooling.AVE, kernel_size=3, stride=2, pad=1, ceil_mode=False)
    n.max_floor = L.Pooling(n.data, pool=P.Pooling.MAX, kernel_size=2, stride=2, ceil_mode=False)
    assert_matches_pycaffe(n, tmp_path, f"pool{size}")


def test_pooling_output_sizes_are_caffes():
    # ceil rounds 7/2 up to 4 windows; with pad 1 a 4th window would start in the padding and is dropped
    assert caffe_pooled_size(7, 2, 2, 0, True) == 4
    assert caffe_pooled_size(5, 2, 2, 1, True) == 3
    assert caffe_pooled_size(7, 3, 2, 0, False) == 3


def test_global_pooling(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 7, 5]))
    n.gmax = L.Pooling(n.data, pool=P.Pooling.MAX, global_pooling=True)
    n.gave = L.Pooling(n.data, pool=P.Pooling.AVE, global_pooling=True)
    assert_matches_pycaffe(n, tmp_path, "global")


def test_activations_and_math_layers(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4, 3, 3]))
    n.relu = L.ReLU(n.data)
    n.leaky = L.ReLU(n.data, negative_slope=0.1)
    n.prelu = L.PReLU(n.data)
    n.prelu_shared = L.PReLU(n.data, channel_shared=True)
    n.sigmoid = L.Sigmoid(n.data)
    n.tanh = L.TanH(n.data)
    n.elu = L.ELU(n.data, alpha=0.5)
    n.absval = L.AbsVal(n.data)
    n.bnll = L.BNLL(n.data)
    n.exp = L.Exp(n.data, base=2.0, scale=0.5, shift=0.25)
    n.log = L.Log(n.data, base=10.0, scale=0.5, shift=2.0)  # inputs in [-2, 2]: argument stays positive
    n.power = L.Power(n.data, power=2.0, scale=0.5, shift=1.0)
    n.sqrt = L.Power(n.data, power=0.5, shift=2.0, scale=0.5)
    n.ones = L.Power(n.data, power=0.0)
    n.dropped = L.Dropout(n.data, dropout_ratio=0.3)
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=1)
    n.drop_in_place = L.Dropout(n.conv, dropout_ratio=0.5, in_place=True)
    assert_matches_pycaffe(n, tmp_path, "activations")


def test_lrn_across_and_within_channels(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 7, 6, 5]))
    n.across = L.LRN(n.data, local_size=5, alpha=1e-2, beta=0.75, k=2.0)
    n.within = L.LRN(n.data, local_size=3, alpha=0.1, beta=0.75, norm_region=P.LRN.WITHIN_CHANNEL)
    assert_matches_pycaffe(n, tmp_path, "lrn")


def test_inner_product_axes_transpose_and_softmax_axes(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 4, 5]))
    n.ip = L.InnerProduct(n.data, num_output=7)
    n.ip_axis2 = L.InnerProduct(n.data, num_output=6, axis=2)
    n.ip_axis3 = L.InnerProduct(n.data, num_output=2, axis=-1, bias_term=False)
    n.ip_t = L.InnerProduct(n.data, num_output=4, transpose=True)
    n.sm = L.Softmax(n.ip)
    n.sm_axis2 = L.Softmax(n.data, axis=2)
    n.sm_last = L.Softmax(n.data, axis=-1)
    assert_matches_pycaffe(n, tmp_path, "ip")


def test_concat_slice_flatten_reshape(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 6, 4, 3]))
    n.other = L.Input(shape=dict(dim=[1, 2, 4, 3]))
    n.cat1 = L.Concat(n.data, n.other, axis=1)
    n.cat2 = L.Concat(n.data, n.data, axis=2)
    n.s1, n.s2, n.s3 = L.Slice(n.data, slice_point=[1, 4], axis=1, ntop=3)
    n.h1, n.h2 = L.Slice(n.data, axis=2, ntop=2)  # equal halves
    n.flat = L.Flatten(n.data)
    n.flat_tail = L.Flatten(n.data, axis=2)
    n.flat_mid = L.Flatten(n.data, axis=1, end_axis=2)
    n.re = L.Reshape(n.data, shape=dict(dim=[0, -1, 6]))
    n.re_part = L.Reshape(n.data, shape=dict(dim=[3, 2]), axis=1, num_axes=1)
    n.re_tail = L.Reshape(n.data, shape=dict(dim=[2, -1]), axis=2)
    assert_matches_pycaffe(n, tmp_path, "shapes")


def caffe_argmax(x: np.ndarray, top_k: int, axis: int | None, out_max_val: bool) -> np.ndarray:
    """argmax_layer.cpp's definition: rank (value, index) pairs by std::greater, so equal values by the
    higher index; indices as floats. Without an axis each sample is ranked flattened, top (N, 1|2, k, 1…)."""
    def ranked(rows: np.ndarray):  # rows: (..., dim) -> indices, values (..., k)
        order = np.lexsort((np.broadcast_to(np.arange(rows.shape[-1]), rows.shape), rows), axis=-1)[..., ::-1]
        index = order[..., :top_k]
        return index.astype(np.float32), np.take_along_axis(rows, index, axis=-1)

    if axis is not None:
        index, values = ranked(np.moveaxis(x, axis, -1))
        return np.moveaxis(values if out_max_val else index, -1, axis)
    index, values = ranked(x.reshape(len(x), -1))
    top = np.stack([index, values], axis=1) if out_max_val else index[:, None]
    return top.reshape(len(x), top.shape[1], top_k, *[1] * (x.ndim - 3))


ARGMAX_CASES = {  # name: (argmax_param, bottom shape)
    "pixel_class": (dict(axis=1), (1, 5, 4, 6)),
    "pixel_top3_values": (dict(axis=1, top_k=3, out_max_val=True), (1, 5, 4, 6)),
    "last_axis_top2": (dict(axis=-1, top_k=2), (1, 3, 4, 7)),
    "flat_top4": (dict(top_k=4), (1, 3, 2, 5)),
    "flat_top2_with_values": (dict(top_k=2, out_max_val=True), (1, 3, 2, 5)),
    "flat_2d": (dict(top_k=3, out_max_val=True), (1, 10)),
}


@pytest.mark.parametrize("case", sorted(ARGMAX_CASES))
def test_argmax_resolves_ties_as_caffe_does(tmp_path, case):
    """Scores of a few distinct values, so most rankings have ties: Caffe puts the higher index first."""
    param, shape = ARGMAX_CASES[case]
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(shape)))
    n.best = L.ArgMax(n.data, argmax_param=param)
    proto, weights, model = converted(n, tmp_path, case)
    rng = np.random.default_rng(3)
    feed = {"data": rng.integers(-1, 2, (BATCH, *shape[1:])).astype(np.float32)}
    want = forward(proto, weights, feed)["best"]
    definition = caffe_argmax(feed["data"], param.get("top_k", 1), param.get("axis"), param.get("out_max_val", False))
    np.testing.assert_array_equal(want, definition)  # pycaffe follows the definition, ties included
    np.testing.assert_array_equal(run_onnx(model, feed)["best"], want)


def test_argmax_along_the_batch_axis_is_refused_with_the_reason(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3]))
    n.best = L.ArgMax(n.data, axis=0)
    proto, weights = save_net(n, tmp_path, "argmax_batch")
    with pytest.raises(UnsupportedLayer, match="ranking along the batch axis"):
        convert_net(load_net(proto, weights))


def test_crop_axes_and_offsets(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 5, 9, 11]))
    n.ref = L.Input(shape=dict(dim=[1, 2, 4, 6]))
    n.plain = L.Crop(n.data, n.ref)  # axis 2, offset 0
    n.one_offset = L.Crop(n.data, n.ref, offset=[3])  # the same offset on H and W
    n.per_axis = L.Crop(n.data, n.ref, axis=1, offset=[2, 5, 1])  # channels too
    n.last_axis = L.Crop(n.data, n.ref, axis=-1, offset=[5])
    n.conv = L.Convolution(n.data, num_output=3, kernel_size=3)
    n.cropped_conv = L.Crop(n.conv, n.ref, offset=[1, 2])  # a computed bottom, per-axis offsets
    assert_matches_pycaffe(n, tmp_path, "crop")


def test_fcn_style_net_upsamples_and_crops_back_to_the_input(tmp_path):
    """FCN: a padded first convolution, pooling down, Deconvolution up, a cropped skip branch fused in,
    the score map cropped to the input's H×W, Softmax per pixel."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 20, 18]))
    n.conv1 = L.Convolution(n.data, num_output=8, kernel_size=3, pad=10)  # 38×36: room to crop
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)  # 19×18
    n.conv2 = L.Convolution(n.pool1, num_output=8, kernel_size=3)  # 17×16
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.pool2 = L.Pooling(n.relu2, pool=P.Pooling.MAX, kernel_size=2, stride=2)  # 9×8
    n.score = L.Convolution(n.pool2, num_output=4, kernel_size=1)
    n.upscore2 = L.Deconvolution(n.score, convolution_param=dict(num_output=4, kernel_size=4, stride=2,
                                                                bias_term=False))  # 20×18
    n.score_pool1 = L.Convolution(n.pool1, num_output=4, kernel_size=1)  # 19×18
    n.upscore2c = L.Crop(n.upscore2, n.score_pool1, offset=[1, 0])  # 19×18
    n.fuse = L.Eltwise(n.upscore2c, n.score_pool1)
    n.upscore = L.Deconvolution(n.fuse, convolution_param=dict(num_output=4, kernel_size=4, stride=2,
                                                              bias_term=False))  # 40×38
    n.score_full = L.Crop(n.upscore, n.data, offset=[11, 10])  # back to 20×18
    n.prob = L.Softmax(n.score_full)
    model = assert_matches_pycaffe(n, tmp_path, "fcn")
    assert model_info(model)["outputs"] == [["prob", [1, 4, 20, 18]]]


def test_crop_along_the_batch_axis_is_refused_with_the_reason(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3]))
    n.ref = L.Input(shape=dict(dim=[1, 3]))
    n.crop = L.Crop(n.data, n.ref, axis=0)
    proto, weights = save_net(n, tmp_path, "batchcrop")
    with pytest.raises(UnsupportedLayer, match="layer 'crop' of type 'Crop' .*: cropping along the batch axis"):
        convert_net(load_net(proto, weights))


def test_eltwise_sum_with_coefficients_prod_max(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 4, 4]))
    n.a = L.Convolution(n.data, num_output=3, kernel_size=1)
    n.b = L.Convolution(n.data, num_output=3, kernel_size=1)
    n.sum = L.Eltwise(n.data, n.a, n.b, operation=P.Eltwise.SUM)
    n.weighted = L.Eltwise(n.a, n.b, operation=P.Eltwise.SUM, coeff=[0.5, -2.0])
    n.prod = L.Eltwise(n.data, n.a, n.b, operation=P.Eltwise.PROD)
    n.max = L.Eltwise(n.a, n.b, n.data, operation=P.Eltwise.MAX)
    assert_matches_pycaffe(n, tmp_path, "eltwise")


def test_batchnorm_with_moving_average_factor_and_scale_in_place_or_not(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4, 5, 5]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1)
    n.bn_inplace = L.BatchNorm(n.conv, in_place=True)
    n.scale_inplace = L.Scale(n.bn_inplace, bias_term=True, in_place=True)
    n.bn = L.BatchNorm(n.data, eps=1e-3)
    n.scaled = L.Scale(n.bn, bias_term=True)  # not in place: the case the PyPI converter fails on
    n.scale_only = L.Scale(n.data, axis=1, num_axes=2)
    n.flat = L.Flatten(n.data)
    n.bn_2d = L.BatchNorm(n.flat)
    n.biased = L.Bias(n.data)
    n.se = L.InnerProduct(n.data, num_output=4)
    n.se_scaled = L.Scale(n.conv, n.se, axis=0)  # squeeze-and-excitation: an N×C scale from a bottom
    assert_matches_pycaffe(n, tmp_path, "bn")


def test_batchnorm_factor_is_honoured(tmp_path):
    """Caffe divides the stored statistics by the moving-average factor; the graph must too."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 2, 2]))
    n.bn = L.BatchNorm(n.data)
    proto, weights = save_net(n, tmp_path, "bnfactor")
    net = caffe.Net(str(proto), caffe.TEST, weights=str(weights))
    net.params["bn"][2].data[...] = 4.0  # statistics accumulated 4× their value
    net.save(str(weights))
    model = convert_net(load_net(proto, weights))
    feed = random_feed(model)
    ref = forward(proto, weights, feed)["bn"]
    assert np.abs(run_onnx(model, feed)["bn"] - ref).max() <= TOL * max(1.0, np.abs(ref).max())


def test_old_format_prototxt_is_converted_after_caffes_own_upgrade(tmp_path):
    """V1 `layers` with enum types and the deprecated `input`/`input_dim` fields: Caffe upgrades, we convert."""
    proto = tmp_path / "v1.prototxt"
    proto.write_text(
        'name: "old"\ninput: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 9\ninput_dim: 9\n'
        'layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"\n'
        '  convolution_param { num_output: 4 kernel_size: 3 stride: 2 } }\n'
        'layers { name: "relu" type: RELU bottom: "conv" top: "conv" }\n'
        'layers { name: "pool" type: POOLING bottom: "conv" top: "pool"\n'
        '  pooling_param { pool: AVE kernel_size: 3 stride: 2 } }\n'
        'layers { name: "fc" type: INNER_PRODUCT bottom: "pool" top: "fc" inner_product_param { num_output: 5 } }\n'
        'layers { name: "prob" type: SOFTMAX bottom: "fc" top: "prob" }\n'
    )
    net = caffe.Net(str(proto), caffe.TEST)
    rng = np.random.default_rng(0)
    for blobs in net.params.values():
        for b in blobs:
            b.data[...] = rng.normal(0, 0.3, b.data.shape)
    weights = tmp_path / "v1.caffemodel"
    net.save(str(weights))
    model = convert_net(load_net(proto, weights))
    assert model_info(model)["layer_types"] == ["Input", "Convolution", "ReLU", "Pooling", "InnerProduct", "Softmax"]
    feed = random_feed(model)
    ref = forward(proto, weights, feed)["prob"]
    assert np.abs(run_onnx(model, feed)["prob"] - ref).max() <= TOL


def test_in_place_chains_and_the_splits_caffe_inserts_for_shared_blobs(tmp_path):
    """Blobs rewritten in place several times, then read by two layers (Caffe inserts a Split)."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 4, 4]))
    n.conv = L.Convolution(n.data, num_output=3, kernel_size=3, pad=1)
    n.relu = L.ReLU(n.conv, in_place=True, negative_slope=0.2)
    n.sig = L.Sigmoid(n.relu, in_place=True)
    n.branch = L.Pooling(n.sig, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.out = L.Pooling(n.sig, pool=P.Pooling.AVE, kernel_size=2, stride=2)
    n.sum = L.Eltwise(n.branch, n.out)
    model = assert_matches_pycaffe(n, tmp_path, "inplace")
    assert "Split" in model_info(model)["layer_types"]


def test_any_blob_can_be_a_graph_output_with_the_value_pycaffe_shows_after_the_forward(tmp_path):
    """A blob feeding Silence (Caffe reports no outputs) and one rewritten in place (pycaffe shows the last write)."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 5, 5]))
    n.conv = L.Convolution(n.data, num_output=3, kernel_size=3, pad=1)
    n.relu = L.ReLU(n.conv, in_place=True)
    n.ab = L.Convolution(n.conv, num_output=2, kernel_size=1)
    n.silence = L.Silence(n.ab, ntop=0)
    proto, weights = save_net(n, tmp_path, "silenced")
    net = load_net(proto, weights)
    assert list(net.outputs) == []
    model = convert_net(net, outputs=["ab", "conv"])
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["ab", "conv"]
    assert [name for name, _ in model_info(model)["outputs"]] == ["ab", "conv"]
    feed = random_feed(model)
    ref, got = forward(proto, weights, feed, blobs=["ab", "conv"]), run_onnx(model, feed)
    for blob in ("ab", "conv"):
        assert np.abs(got[blob] - ref[blob]).max() <= TOL * max(1.0, float(np.abs(ref[blob]).max())), blob
    assert ref["conv"].min() >= 0


def test_graph_records_io_shapes_layer_types_and_the_logits_of_a_final_softmax(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 4, 4]))
    n.fc = L.InnerProduct(n.data, num_output=10)
    n.prob = L.Softmax(n.fc)
    _, _, model = converted(n, tmp_path, "meta")
    info = model_info(model)
    assert info["inputs"] == [["data", [2, 3, 4, 4]]] and info["outputs"] == [["prob", [2, 10]]]
    assert info["layer_types"] == ["Input", "InnerProduct", "Softmax"]
    assert [(e["layer"], e["blob"]) for e in info["softmax_logits"]] == [("prob", "fc")]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "N"  # any batch size


def test_a_layer_type_without_a_converter_is_named_in_the_error(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 3, 3]))
    n.norm = L.MVN(n.data)
    proto, weights = save_net(n, tmp_path, "mvn")
    with pytest.raises(UnsupportedLayer) as e:
        convert_net(load_net(proto, weights))
    assert str(e.value) == "layer 'norm' of type 'MVN' is not supported by the onnxruntime backend"


def test_a_supported_type_with_an_unconvertible_setting_says_which(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 6, 6]))
    n.pool = L.Pooling(n.data, pool=P.Pooling.STOCHASTIC, kernel_size=2, stride=2)
    proto, weights = save_net(n, tmp_path, "stochastic")
    with pytest.raises(UnsupportedLayer) as e:
        convert_net(load_net(proto, weights))
    assert str(e.value).startswith("layer 'pool' of type 'Pooling' is not supported by the onnxruntime backend: ")
    assert "STOCHASTIC" in str(e.value)


def test_every_layer_type_the_issue_lists_has_a_converter():
    wanted = {"Convolution", "Deconvolution", "Pooling", "ReLU", "PReLU", "Sigmoid", "TanH", "ELU", "LRN",
              "InnerProduct", "Softmax", "Concat", "Slice", "Eltwise", "BatchNorm", "Scale", "Dropout",
              "Flatten", "Reshape", "Power", "Input", "Crop"}
    assert wanted <= set(supported_types())


def test_the_docs_table_lists_every_converted_layer_type():
    table = (REPO / "docs" / "onnx.md").read_text().split("## Layers converted", 1)[1].split("\n## ", 1)[0]
    listed = {name.strip() for line in table.splitlines() if line.startswith("| ")
              for name in line.split("|")[1].split(",")}
    assert set(supported_types()) <= listed

"""The Caffe forks' layers and fields in our build (scripts/caffe/patch_caffe_forks.py, scripts/caffe/caffe_forks/).

For each new layer, a net with it: pycaffe's output equals a NumPy implementation of the layer's
published definition (tests/fork_nets.py), and the converted graph under ONNX Runtime equals pycaffe.
The five errors issue #20 reported for the published deploy files can no longer occur. Real pycaffe
built by scripts/caffe/install_pycaffe.sh: if these fail with "Unknown layer type", rebuild it.
"""

from __future__ import annotations

import subprocess
import sys

import caffe
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from caffe import layers as L, params as P
from caffe.proto import caffe_pb2
from google.protobuf import text_format

import caffe_testing.fork_nets as ref
from caffe_testing import REPO
from caffe_testing.caffe_sources import fork_targets
from caffe_testing.nets import net_from_text, run_net, save_net
from inference_server.loading.convert import UnsupportedLayer, convert_net, load_net

SCRIPTS = REPO / "scripts" / "caffe"
TOL = 1e-5






def onnx_matches_pycaffe(proto, weights, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Convert at the net's declared shapes, run ONNX Runtime at the feed's batch: every output within TOL."""
    model = convert_net(load_net(proto, weights))
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, feed), strict=True))
    net = run_net(proto, weights, feed)
    for name in net.outputs:
        want = net.blobs[name].data
        assert got[name].shape == want.shape, name
        diff = float(np.abs(got[name] - want).max())
        assert diff <= TOL * max(1.0, float(np.abs(want).max())), f"{name}: max |Δ| {diff:.3g}"
    return got


def close(got, want, tol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) <= tol * max(1.0, float(np.abs(want).max()))


def uniform(*shape, seed=0):
    return np.random.default_rng(seed).uniform(-2, 2, shape).astype(np.float32)


# --- the build patch -------------------------------------------------------------------------------

def test_the_cache_key_covers_the_fork_sources():
    """build_caffe.sh keys its cache by build_key.py, which hashes every file the forks' patch adds: a changed
    layer is never served from a stale cache (tests/packaging/test_build_scripts.py changes one and sees it)."""
    listed = subprocess.run([sys.executable, str(SCRIPTS / "apply_patches.py"), "files"], capture_output=True,
                            text=True, check=True).stdout.split()
    assert {f"caffe_forks/{p.name}" for p in (SCRIPTS / "caffe_forks").iterdir()} <= set(listed)
    assert "patch_caffe_forks.py" in listed


def test_the_patch_adds_layers_and_fields_once_and_refuses_unknown_sources(tmp_path):
    fork_targets(tmp_path)
    run = [sys.executable, str(SCRIPTS / "patch_caffe_forks.py"), str(tmp_path)]
    first = subprocess.run(run, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    proto = (tmp_path / "src/caffe/proto/caffe.proto").read_text()
    for field in ("optional bool clip = 1000", "optional BNMode bn_mode", "optional FillerParameter scale_filler",
                  "optional FillerParameter shift_filler", "optional uint32 upsample_h",
                  "optional ShuffleChannelParameter shuffle_channel_param", "message ShuffleChannelParameter"):
        assert proto.count(field) == 1, field
    layers = {p.name for p in (tmp_path / "src/caffe/layers").iterdir()}
    assert {"axpy_layer.cpp", "shuffle_channel_layer.cpp", "conv_depthwise_layer.cpp", "segnet_bn_layer.cpp",
            "upsample_layer.cpp"} <= layers
    assert "detection_output_param().clip()" in (tmp_path / "src/caffe/layers/detection_output_layer.cpp").read_text()
    again = subprocess.run(run, capture_output=True, text=True)
    assert again.returncode == 0 and "patched\n" not in again.stdout.replace("already patched", "")
    assert (tmp_path / "src/caffe/proto/caffe.proto").read_text() == proto
    (tmp_path / "src/caffe/layers/detection_output_layer.cpp").write_text("const bool clip = false;\n")
    refused = subprocess.run(run, capture_output=True, text=True)
    assert refused.returncode == 1 and "update the patch" in refused.stderr


def test_no_fork_source_is_third_party_code():
    for path in (SCRIPTS / "caffe_forks").glob("*.cpp"):
        head = path.read_text().split("\n", 1)[0]
        assert head.startswith("// caffe-serving:"), path
        assert "Copyright" not in path.read_text(), path


# --- the five errors of the issue --------------------------------------------------------------------

PUBLISHED_CONSTRUCTS = {
    # OpenCV's face detector (deploy.prototxt of the res10 SSD)
    "DetectionOutputParameter has no field clip": """
        layer { name: "detection_out" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "priors"
          top: "detection_out" include { phase: TEST }
          detection_output_param { num_classes: 2 share_location: true background_label_id: 0
            nms_param { nms_threshold: 0.45 top_k: 400 } code_type: CENTER_SIZE keep_top_k: 200
            confidence_threshold: 0.01 clip: 1 } }""",
    # SegNet (segnet_inference.prototxt)
    "BNParameter has no field bn_mode": """
        layer { name: "conv1_1_bn" type: "BN" bottom: "x" top: "x" bn_param { bn_mode: INFERENCE } }""",
    # ENet (enet_deploy prototxts)
    "BNParameter has no field scale_filler": """
        layer { name: "bn0_1" type: "BN" bottom: "x" top: "bn0_1"
          param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 1 decay_mult: 0 }
          bn_param { scale_filler { type: "constant" value: 1 } shift_filler { type: "constant" value: 0.001 }
                     bn_mode: INFERENCE } }""",
    # SE-ResNet-50
    "Unknown layer type: Axpy": """
        layer { name: "axpy" type: "Axpy" bottom: "s" bottom: "x" bottom: "y" top: "z" }""",
    # ShuffleNet
    "LayerParameter has no field shuffle_channel_param": """
        layer { name: "shuffle" type: "ShuffleChannel" bottom: "x" top: "y" shuffle_channel_param { group: 3 } }""",
}


@pytest.mark.parametrize("error", list(PUBLISHED_CONSTRUCTS))
def test_the_published_constructs_parse(error):
    net = caffe_pb2.NetParameter()
    text_format.Merge(PUBLISHED_CONSTRUCTS[error], net)  # raised `error` before the fork fields
    assert len(net.layer) == 1


def test_every_fork_layer_type_is_registered():
    registered = set(caffe.layer_type_list())
    assert {"Axpy", "ShuffleChannel", "ConvolutionDepthwise", "DepthwiseConvolution", "BN", "Upsample",
            "DetectionOutput", "PriorBox", "Normalize", "Permute"} <= registered


# --- each layer against NumPy, then ONNX Runtime against pycaffe ------------------------------------

def test_axpy_is_a_times_x_plus_y(tmp_path):
    text = """
input: "a" input_shape { dim: 2 dim: 5 dim: 1 dim: 1 }
input: "x" input_shape { dim: 2 dim: 5 dim: 4 dim: 3 }
input: "y" input_shape { dim: 2 dim: 5 dim: 4 dim: 3 }
layer { name: "axpy" type: "Axpy" bottom: "a" bottom: "x" bottom: "y" top: "z" }
"""
    proto, weights = net_from_text(tmp_path, "axpy", text)
    feed = {"a": uniform(2, 5, 1, 1, seed=1), "x": uniform(2, 5, 4, 3, seed=2), "y": uniform(2, 5, 4, 3, seed=3)}
    net = run_net(proto, weights, feed)
    close(net.blobs["z"].data, ref.axpy(feed["a"], feed["x"], feed["y"]))
    onnx_matches_pycaffe(proto, weights, feed)


def test_axpy_takes_a_two_dimensional_scale(tmp_path):
    text = """
input: "a" input_shape { dim: 1 dim: 4 }
input: "x" input_shape { dim: 1 dim: 4 dim: 3 dim: 3 }
input: "y" input_shape { dim: 1 dim: 4 dim: 3 dim: 3 }
layer { name: "axpy" type: "Axpy" bottom: "a" bottom: "x" bottom: "y" top: "z" }
"""
    proto, weights = net_from_text(tmp_path, "axpy2", text)
    feed = {"a": uniform(3, 4, seed=1), "x": uniform(3, 4, 3, 3, seed=2), "y": uniform(3, 4, 3, 3, seed=3)}
    close(run_net(proto, weights, feed).blobs["z"].data, ref.axpy(feed["a"], feed["x"], feed["y"]))
    onnx_matches_pycaffe(proto, weights, feed)


@pytest.mark.parametrize("group", [1, 2, 3, 6])
def test_shuffle_channel_transposes_groups(tmp_path, group):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 6, 3, 4]))
    n.shuffled = L.ShuffleChannel(n.data, shuffle_channel_param=dict(group=group))
    proto, weights = save_net(n, tmp_path, f"shuffle{group}")
    x = uniform(2, 6, 3, 4)
    got = run_net(proto, weights, {"data": x}).blobs["shuffled"].data
    assert np.array_equal(got, ref.shuffle_channel(x, group))
    if group == 3:  # output channel j*g + i is input channel i*(C/g) + j
        assert np.array_equal(got[:, 1], x[:, 2]) and np.array_equal(got[:, 3], x[:, 1])
    onnx_matches_pycaffe(proto, weights, {"data": x})


def test_shuffle_channel_refuses_channels_that_do_not_split(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 5, 2, 2]))
    n.shuffled = L.ShuffleChannel(n.data, shuffle_channel_param=dict(group=2))
    (tmp_path / "bad.prototxt").write_text(str(n.to_proto()))
    # a CHECK failure aborts the process: load it in a child, as the server's load check does
    code = f"import caffe; caffe.Net({str(tmp_path / 'bad.prototxt')!r}, caffe.TEST)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "do not split into 2 groups" in result.stderr


@pytest.mark.parametrize("type_name", ["ConvolutionDepthwise", "DepthwiseConvolution"])
@pytest.mark.parametrize("geometry", [
    "num_output: 6 kernel_size: 3 pad: 1",
    "num_output: 6 kernel_size: 3 stride: 2 pad: 1 bias_term: false",
    "num_output: 12 kernel_h: 3 kernel_w: 5 pad_h: 1 pad_w: 2 stride_h: 1 stride_w: 2",
    "num_output: 6 kernel_size: 3 pad: 2 dilation: 2 group: 6",
])
def test_depthwise_convolution_is_a_per_channel_convolution(tmp_path, type_name, geometry):
    text = f"""
input: "data" input_shape {{ dim: 1 dim: 6 dim: 9 dim: 11 }}
layer {{ name: "dw" type: "{type_name}" bottom: "data" top: "dw" convolution_param {{ {geometry} }} }}
"""
    proto, weights = net_from_text(tmp_path, "dw", text)
    x = uniform(2, 6, 9, 11)
    net = run_net(proto, weights, {"data": x})
    p = net.layers[list(net._layer_names).index("dw")]
    w = p.blobs[0].data
    b = p.blobs[1].data if len(p.blobs) > 1 else None
    pm = caffe_pb2.NetParameter()
    text_format.Merge(text, pm)
    c = pm.layer[0].convolution_param
    kernel = (c.kernel_h, c.kernel_w) if c.HasField("kernel_h") else (c.kernel_size[0],) * 2
    stride = (c.stride_h, c.stride_w) if c.HasField("stride_h") else ((c.stride or [1])[0],) * 2
    pad = (c.pad_h, c.pad_w) if c.HasField("pad_h") else ((c.pad or [0])[0],) * 2
    dilation = ((c.dilation or [1])[0],) * 2
    close(net.blobs["dw"].data, ref.depthwise_conv(x, w, b, kernel, stride, pad, dilation))
    onnx_matches_pycaffe(proto, weights, {"data": x})


def test_depthwise_weights_are_those_of_a_grouped_convolution(tmp_path):
    """A MobileNet trained with Convolution group = C loads into ConvolutionDepthwise unchanged."""
    base = 'input: "data" input_shape { dim: 1 dim: 4 dim: 7 dim: 7 }\n'
    grouped = base + ('layer { name: "dw" type: "Convolution" bottom: "data" top: "dw" '
                      'convolution_param { num_output: 4 group: 4 kernel_size: 3 pad: 1 } }')
    proto_g, weights = net_from_text(tmp_path, "grouped", grouped)
    proto_d = tmp_path / "depthwise.prototxt"
    proto_d.write_text(grouped.replace('type: "Convolution"', 'type: "ConvolutionDepthwise"'))
    x = uniform(1, 4, 7, 7)
    close(
        run_net(proto_d, weights, {"data": x}).blobs["dw"].data, run_net(proto_g, weights, {"data": x}).blobs["dw"].data
    )


def bn_text(mode: str, tops: int = 1) -> str:
    extra = "".join(f' top: "stat{i}"' for i in range(1, tops))
    return f"""
input: "data" input_shape {{ dim: 2 dim: 4 dim: 5 dim: 3 }}
layer {{ name: "bn" type: "BN" bottom: "data" top: "out"{extra}
  bn_param {{ scale_filler {{ type: "constant" value: 1 }} shift_filler {{ type: "constant" value: 0.001 }}
             bn_mode: {mode} }} }}
"""


def test_bn_inference_is_scale_times_x_plus_shift(tmp_path):
    scale, shift = uniform(1, 4, 1, 1, seed=5), uniform(1, 4, 1, 1, seed=6)
    proto, weights = net_from_text(tmp_path, "bn_inf", bn_text("INFERENCE"), {"bn": [scale, shift]})
    x = uniform(2, 4, 5, 3)
    close(run_net(proto, weights, {"data": x}).blobs["out"].data, ref.bn_inference(x, scale, shift))
    onnx_matches_pycaffe(proto, weights, {"data": uniform(3, 4, 5, 3, seed=9)})


def test_bn_learn_normalizes_with_the_batch_statistics_and_outputs_them(tmp_path):
    scale, shift = uniform(1, 4, 1, 1, seed=5), uniform(1, 4, 1, 1, seed=6)
    proto, weights = net_from_text(tmp_path, "bn_learn", bn_text("LEARN", tops=3), {"bn": [scale, shift]})
    x = uniform(2, 4, 5, 3) * 3 + 1
    net = run_net(proto, weights, {"data": x})
    want, mean, var = ref.bn_learn(x, scale, shift)
    close(net.blobs["out"].data, want)
    close(net.blobs["stat1"].data, mean)
    close(net.blobs["stat2"].data, var)
    with pytest.raises(UnsupportedLayer, match="bn_mode LEARN normalizes with the statistics of each batch"):
        convert_net(load_net(proto, weights))


def test_bn_weights_from_a_file_with_the_forks_field_numbers_load(tmp_path):
    """A .caffemodel written by a fork numbers bn_param's fields its own way; Caffe takes only the blobs
    from weights, and protobuf keeps a field whose number means something else here as an unknown field."""
    scale, shift = uniform(1, 4, 1, 1, seed=5), uniform(1, 4, 1, 1, seed=6)
    proto, weights = net_from_text(tmp_path, "bn_nums", bn_text("INFERENCE"), {"bn": [scale, shift]})
    param = caffe_pb2.NetParameter()
    param.ParseFromString(weights.read_bytes())
    layer = next(x for x in param.layer if x.name == "bn")
    layer.ClearField("bn_param")
    # bn_param (field 1111 here) holding field 3 as a varint (an enum, as a fork's bn_mode = 3 would be);
    # here field 3 is BNParameter.momentum, a float: a wire-type mismatch, kept as unknown
    raw = layer.SerializeToString() + bytes([0xBA, 0x45, 0x02, 0x18, 0x01])
    layer.ParseFromString(raw)
    weights.write_bytes(param.SerializeToString())
    x = uniform(2, 4, 5, 3)
    close(run_net(proto, weights, {"data": x}).blobs["out"].data, ref.bn_inference(x, scale, shift))


@pytest.mark.parametrize("size", [(8, 10), (7, 9)])
def test_pooling_mask_and_upsample_unpool_to_the_argmax_positions(tmp_path, size):
    h, w = size
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, h, w]))
    n.pool, n.mask = L.Pooling(n.data, pool=P.Pooling.MAX, kernel_size=2, stride=2, ntop=2)
    n.up = L.Upsample(n.pool, n.mask, upsample_param=dict(scale=2, upsample_h=h, upsample_w=w))
    n.up_default = L.Upsample(n.pool, n.mask)  # SegNet's default scale 2 (pad_out where the size is odd)
    n.mask_out = L.Power(n.mask)  # the mask itself as an output (identity)
    proto, weights = save_net(n, tmp_path, f"unpool{h}")
    x = uniform(2, 3, h, w)
    net = run_net(proto, weights, {"data": x})
    pooled, mask = ref.max_pool_with_mask(x, 2, 2)
    close(net.blobs["pool"].data, pooled)
    assert np.array_equal(net.blobs["mask"].data, mask)
    close(net.blobs["up"].data, ref.unpool(pooled, mask, h, w))
    ph, pw = pooled.shape[2:]
    assert net.blobs["up_default"].data.shape == (2, 3, 2 * ph, 2 * pw)
    # the mask's index is written as it is, into the larger plane: why SegNet's files give upsample_h/_w
    close(net.blobs["up_default"].data, ref.unpool(pooled, mask, 2 * ph, 2 * pw))
    got = onnx_matches_pycaffe(proto, weights, {"data": x})
    assert np.array_equal(got["mask_out"], mask)


def test_upsample_with_one_bottom_is_nearest_neighbour(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 3, 4]))
    n.up = L.Upsample(n.data, upsample_param=dict(scale=3))
    proto, weights = save_net(n, tmp_path, "nearest")
    x = uniform(2, 2, 3, 4)
    assert np.array_equal(run_net(proto, weights, {"data": x}).blobs["up"].data, ref.nearest_upsample(x, 3))
    onnx_matches_pycaffe(proto, weights, {"data": x})


@pytest.mark.parametrize("across_spatial,channel_shared", [(False, False), (True, False), (False, True), (True, True)])
def test_normalize_and_permute(tmp_path, across_spatial, channel_shared):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4, 3, 5]))
    n.norm = L.Normalize(n.data, norm_param=dict(across_spatial=across_spatial, channel_shared=channel_shared))
    n.perm = L.Permute(n.norm, order=[0, 2, 3, 1])
    n.perm2 = L.Permute(n.data, order=[0, 3])  # the unlisted axes follow in order: (0, 3, 1, 2)
    proto, weights = save_net(n, tmp_path, "norm")
    x = uniform(2, 4, 3, 5)
    net = run_net(proto, weights, {"data": x})
    scale = net.params["norm"][0].data
    want = ref.normalize(x, scale, across_spatial, channel_shared)
    close(net.blobs["perm"].data, want.transpose(0, 2, 3, 1))
    close(net.blobs["perm2"].data, x.transpose(0, 3, 1, 2))
    onnx_matches_pycaffe(proto, weights, {"data": x})


def test_prior_box_is_a_constant_of_the_input_size(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 30, 40]))
    n.fmap = L.Convolution(n.data, num_output=2, kernel_size=3, stride=4)
    n.p1 = L.PriorBox(n.fmap, n.data, min_size=[7.5, 12], max_size=[11, 20], aspect_ratio=[2, 3, 2], flip=True,
                      clip=True, variance=[0.1, 0.1, 0.2, 0.2], offset=0.5)
    n.p2 = L.PriorBox(n.fmap, n.data, min_size=5, aspect_ratio=[0.5], flip=False, clip=False, variance=[0.1],
                      step_h=3.5, step_w=4.5, img_h=33, img_w=44, offset=0.25)
    proto, weights = save_net(n, tmp_path, "priors")
    got = onnx_matches_pycaffe(proto, weights, {"data": uniform(2, 3, 30, 40)})
    assert got["p1"].shape[0] == 1  # one set of priors, whatever the batch
    coords = got["p1"][0, 0].reshape(-1, 4)
    assert coords.min() >= 0 and coords.max() <= 1


def test_detection_output_clips_boxes_only_with_clip(tmp_path):
    """OpenCV's `clip: true`: decoded boxes reaching past the image are cut to [0, 1]."""
    def net_text(clip: bool) -> str:
        return f"""
input: "loc" input_shape {{ dim: 1 dim: 8 }}
input: "conf" input_shape {{ dim: 1 dim: 4 }}
input: "priors" input_shape {{ dim: 1 dim: 2 dim: 8 }}
layer {{ name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "priors" top: "det"
  detection_output_param {{ num_classes: 2 share_location: true background_label_id: 0
    nms_param {{ nms_threshold: 0.45 top_k: 10 }} code_type: CENTER_SIZE keep_top_k: 10
    confidence_threshold: 0.01 clip: {str(clip).lower()} }} }}
"""
    feed = {
        "loc": np.array([[2, 2, 1, 1, -2, -2, 1, 1]], np.float32),  # both boxes pushed out of the image
        "conf": np.array([[0.1, 0.9, 0.2, 0.8]], np.float32),
        "priors": np.array([[[0.7, 0.7, 0.95, 0.95, 0.05, 0.05, 0.3, 0.3], [0.1, 0.1, 0.2, 0.2] * 2]], np.float32),
    }
    boxes = {}
    for clip in (False, True):
        proto, weights = net_from_text(tmp_path, f"det_{clip}", net_text(clip))
        boxes[clip] = run_net(proto, weights, feed).blobs["det"].data.reshape(-1, 7)[:, 3:]
    assert len(boxes[True]) == len(boxes[False]) == 2
    assert boxes[False].min() < 0 and boxes[False].max() > 1
    assert boxes[True].min() >= 0 and boxes[True].max() <= 1
    inside = (boxes[False] >= 0) & (boxes[False] <= 1)
    assert np.allclose(boxes[True][inside], boxes[False][inside])


def test_the_converter_knows_the_fork_layers_and_why_detection_output_stays_on_pycaffe():
    from inference_server.loading.convert import supported_types
    from inference_server.loading.convert.registry import converter_for

    types = set(supported_types())
    assert {"Normalize", "Permute", "Flatten", "PriorBox", "Axpy", "ShuffleChannel", "ConvolutionDepthwise",
            "DepthwiseConvolution", "BN", "Upsample", "Crop"} <= types
    assert "DetectionOutput" not in types  # `caffeserve check` lists it among the types without a converter
    with pytest.raises(UnsupportedLayer, match="DetectionOutput.*non-maximum suppression.*pycaffe serves this net"):
        converter_for("det", "DetectionOutput")


def test_a_mask_index_outside_the_upsample_output_fails_the_pass_not_the_process(tmp_path):
    """Where the maxima fall depends on the data: a too-small upsample_h/_w must not abort the server."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 8, 8]))
    n.pool, n.mask = L.Pooling(n.data, pool=P.Pooling.MAX, kernel_size=2, stride=2, ntop=2)
    n.up = L.Upsample(n.pool, n.mask, upsample_param=dict(upsample_h=4, upsample_w=4))
    proto, weights = save_net(n, tmp_path, "small_up")
    with pytest.raises(RuntimeError, match="mask index .* is outside the 4x4 output"):
        run_net(proto, weights, {"data": uniform(1, 1, 8, 8)})
    # (this process is still alive to assert it)

"""Issue 25's fork layers in our build (scripts/caffe/caffe_forks/): Interp (DeepLab v2, PSPNet, ICNet), PSPNet's
4-blob BN beside SegNet's, ROIPooling (Fast/Faster R-CNN), PSROIPooling (R-FCN), Reorg (YOLOv2), and Caffe's
Python layer (WITH_PYTHON_LAYER in the CPU build).

Each layer in a small hand-written net: pycaffe's output equals a NumPy implementation of the layer's
published definition (caffe_testing/seg_det_nets.py). Real pycaffe built by scripts/caffe/install_pycaffe.sh:
if these fail with "Unknown layer type" or "has no field named", rebuild it (make setup).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import caffe
import numpy as np
import pytest
from caffe.proto import caffe_pb2
from google.protobuf import text_format

import caffe_testing.seg_det_nets as ref
from caffe_testing import REPO
from caffe_testing.caffe_sources import PYTHON_LAYER_SNIPPET, fork_targets
from caffe_testing.nets import net_from_text as build, run_net as run
from caffe_testing.seg_det_nets import INTERP_CASES

SCRIPTS = REPO / "scripts" / "caffe"






def close(got, want, tol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert float(np.abs(got - want).max()) <= tol * max(1.0, float(np.abs(want).max()))


def uniform(*shape, seed=0, low=-2.0, high=2.0):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def load_in_child(proto: Path, weights: Path | None = None) -> subprocess.CompletedProcess:
    """Build the Net in a child: a CHECK failure aborts the process, as the server's load probe expects."""
    args = f"{str(proto)!r}, caffe.TEST" + ("" if weights is None else f", weights={str(weights)!r}")
    code = f"import caffe; caffe.Net({args})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


# --- the build patch -------------------------------------------------------------------------------

def test_the_patch_adds_the_new_layers_fields_and_the_python_layer_gil(tmp_path):
    fork_targets(tmp_path)
    (tmp_path / "include/caffe/layers").mkdir(parents=True)
    header = tmp_path / "include/caffe/layers/python_layer.hpp"
    header.write_text(PYTHON_LAYER_SNIPPET)
    for script in ("patch_caffe_forks.py", "patch_python_layer.py"):
        r = subprocess.run([sys.executable, str(SCRIPTS / script), str(tmp_path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    proto = (tmp_path / "src/caffe/proto/caffe.proto").read_text()
    for field in ("optional InterpParameter interp_param = 165", "optional ReorgParameter reorg_param = 159",
                  "optional ROIPoolingParameter roi_pooling_param = 8266711", "message InterpParameter",
                  "optional int32 zoom_factor = 3", "message ROIPoolingParameter", "optional uint32 pooled_h = 1",
                  "message ReorgParameter", "optional bool reverse = 2"):
        assert proto.count(field) == 1, field
    layers = {p.name for p in (tmp_path / "src/caffe/layers").iterdir()}
    assert {"interp_layer.cpp", "roi_pooling_layer.cpp", "psroi_pooling_layer.cpp", "reorg_layer.cpp"} <= layers
    patched = header.read_text()
    assert patched.count("PythonLayerGIL gil;") == 4 and "PyGILState_Ensure" in patched
    again = subprocess.run([sys.executable, str(SCRIPTS / "patch_python_layer.py"), str(tmp_path)],
                           capture_output=True, text=True)
    assert again.returncode == 0 and "already patched" in again.stdout and header.read_text() == patched
    header.write_text("namespace caffe {\n}\n")
    refused = subprocess.run([sys.executable, str(SCRIPTS / "patch_python_layer.py"), str(tmp_path)],
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "update the patch" in refused.stderr


def test_the_new_layer_types_are_registered():
    assert {"Interp", "ROIPooling", "PSROIPooling", "Reorg", "Python", "BN"} <= set(caffe.layer_type_list())


PUBLISHED_CONSTRUCTS = {
    # pspnet50_ADE20K_473.prototxt, pspnet101_VOC2012_473.prototxt; DeepLab v2 and ICNet use the same
    'LayerParameter has no field named "interp_param"': """
        layer { name: "conv6_interp" type: "Interp" bottom: "conv6" top: "conv6_interp"
          interp_param { zoom_factor: 8 } }
        layer { name: "pool1_interp" type: "Interp" bottom: "pool1" top: "pool1_interp"
          interp_param { height: 60 width: 60 } }
        layer { name: "sub2" type: "Interp" bottom: "data" top: "data_sub2" interp_param { shrink_factor: 2 } }""",
    # PSPNet's BN
    "expected 2 blobs": """
        layer { name: "conv1/bn" type: "BN" bottom: "conv1" top: "conv1"
          bn_param { slope_filler { type: "constant" value: 1 } bias_filler { type: "constant" value: 0 }
                     frozen: true momentum: 0.95 } }""",
    # py-faster-rcnn's test.prototxt
    'LayerParameter has no field named "roi_pooling_param"': """
        layer { name: "roi_pool5" type: "ROIPooling" bottom: "conv5_3" bottom: "rois" top: "pool5"
          roi_pooling_param { pooled_w: 7 pooled_h: 7 spatial_scale: 0.0625 } }
        layer { name: "proposal" type: "Python" bottom: "rpn_cls_prob_reshape" bottom: "rpn_bbox_pred"
          bottom: "im_info" top: "rois" python_param { module: "rpn.proposal_layer" layer: "ProposalLayer"
          param_str: "'feat_stride': 16" } }""",
    # YOLOv2 Caffe ports (yolo-voc)
    'LayerParameter has no field named "reorg_param"': """
        layer { name: "reorg1" type: "Reorg" bottom: "conv20" top: "reorg1" reorg_param { stride: 2 } }""",
}


@pytest.mark.parametrize("error", list(PUBLISHED_CONSTRUCTS))
def test_the_published_constructs_parse(error):
    net = caffe_pb2.NetParameter()
    text_format.Merge(PUBLISHED_CONSTRUCTS[error], net)  # raised `error` before the fields (or the layers) existed
    assert len(net.layer) >= 1


# --- Interp ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("params,kw", INTERP_CASES, ids=[c[0] for c in INTERP_CASES])
def test_interp_is_the_forks_align_corners_bilinear(tmp_path, params, kw):
    h, w = 6, 5
    text = f"""
input: "data" input_shape {{ dim: 2 dim: 3 dim: {h} dim: {w} }}
layer {{ name: "interp" type: "Interp" bottom: "data" top: "out" interp_param {{ {params} }} }}
"""
    proto, weights = build(tmp_path, "interp", text)
    x = uniform(2, 3, h, w)
    got = run(proto, weights, {"data": x}).blobs["out"].data
    out_h, out_w = ref.interp_size(h, w, kw.get("height"), kw.get("width"), kw.get("zoom"), kw.get("shrink"),
                                   kw.get("pad_beg", 0), kw.get("pad_end", 0))
    assert got.shape == (2, 3, out_h, out_w)
    want = ref.interp(x, out_h, out_w, kw.get("pad_beg", 0), kw.get("pad_end", 0))
    close(got, want, 1e-6)
    if "pad_beg" not in kw and min(out_h, out_w) > 1:  # align corners: the corners are the input's (the far ones
        # up to the single-precision ratio)
        np.testing.assert_array_equal(got[:, :, 0, 0], x[:, :, 0, 0])
        for yy, xx in ((-1, -1), (0, -1), (-1, 0)):
            np.testing.assert_allclose(got[:, :, yy, xx], x[:, :, yy, xx], rtol=1e-5, atol=1e-6)


def test_interp_takes_its_size_from_a_second_bottom(tmp_path):
    text = """
input: "data" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 }
input: "like" input_shape { dim: 1 dim: 7 dim: 10 dim: 13 }
layer { name: "interp" type: "Interp" bottom: "data" bottom: "like" top: "out" }
"""
    proto, weights = build(tmp_path, "interp2", text)
    x = uniform(1, 2, 4, 4)
    got = run(proto, weights, {"data": x, "like": uniform(1, 7, 10, 13)}).blobs["out"].data
    close(got, ref.interp(x, 10, 13), 1e-6)


def test_interp_without_a_size_or_with_padding_is_refused_naming_the_field(tmp_path):
    for name, params, words in (("nosize", "", "set interp_param height and width"),
                                ("pad", "zoom_factor: 2 pad_beg: 1", "pad_beg must be <= 0")):
        proto = tmp_path / f"{name}.prototxt"
        proto.write_text(f'input: "data" input_shape {{ dim: 1 dim: 1 dim: 4 dim: 4 }}\n'
                         f'layer {{ name: "i" type: "Interp" bottom: "data" top: "o" interp_param {{ {params} }} }}\n')
        r = load_in_child(proto)
        assert r.returncode != 0 and words in r.stderr, r.stderr[-2000:]


# --- BN: PSPNet's four blobs beside SegNet's two -----------------------------------------------------

PSP_BN = """
input: "data" input_shape {{ dim: 2 dim: 4 dim: 5 dim: 3 }}
layer {{ name: "bn" type: "BN" bottom: "data" top: "out"
  param {{ lr_mult: 1 decay_mult: 0 }} param {{ lr_mult: 1 decay_mult: 0 }}
  param {{ lr_mult: 0 decay_mult: 0 }} param {{ lr_mult: 0 decay_mult: 0 }}
  bn_param {{ slope_filler {{ type: "constant" value: 1 }} bias_filler {{ type: "constant" value: 0 }} {extra} }} }}
"""


def psp_stats(seed=5):
    slope, bias = uniform(1, 4, 1, 1, seed=seed), uniform(1, 4, 1, 1, seed=seed + 1)
    mean, var = uniform(1, 4, 1, 1, seed=seed + 2), uniform(1, 4, 1, 1, seed=seed + 3, low=0.2, high=3.0)
    return [slope, bias, mean, var]


@pytest.mark.parametrize("extra", ["frozen: true momentum: 0.95", "momentum: 0.95", "frozen: true eps: 0.001"])
def test_pspnet_bn_normalizes_with_its_stored_mean_and_variance(tmp_path, extra):
    """TEST phase (or frozen): slope (x - mean) / sqrt(variance + eps) + bias, eps 1e-5 unless set."""
    stats = psp_stats()
    proto, weights = build(tmp_path, "psp_bn", PSP_BN.format(extra=extra), {"bn": stats})
    net = run(proto, weights, {"data": uniform(2, 4, 5, 3, seed=9)})
    assert [b.data.shape for b in net.params["bn"]] == [(1, 4, 1, 1)] * 4  # the fork's blob shape
    eps = 1e-3 if "eps" in extra else 1e-5
    close(net.blobs["out"].data, ref.bn_pspnet(uniform(2, 4, 5, 3, seed=9), *stats, eps=eps))


def test_pspnet_bn_in_place_on_the_published_constructs(tmp_path):
    """In place (top = bottom), as PSPNet's files write every BN, then ReLU in place."""
    text = """
input: "data" input_shape { dim: 1 dim: 4 dim: 6 dim: 6 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }
layer { name: "conv/bn" type: "BN" bottom: "conv" top: "conv"
  bn_param { slope_filler { type: "constant" value: 1 } bias_filler { type: "constant" value: 0 }
    frozen: true momentum: 0.95 } }
layer { name: "conv/relu" type: "ReLU" bottom: "conv" top: "conv" }
"""
    stats = psp_stats(seed=11)
    kernel = uniform(4, 4, 1, 1, seed=3)
    proto, weights = build(tmp_path, "psp_inplace", text, {"conv": [kernel], "conv/bn": stats})
    x = uniform(1, 4, 6, 6, seed=4)
    conv = np.einsum("oi,nihw->nohw", kernel[:, :, 0, 0].astype(np.float64), x)
    close(run(proto, weights, {"data": x}).blobs["conv"].data, np.maximum(ref.bn_pspnet(conv, *stats), 0))


def test_segnet_bn_keeps_its_two_blobs(tmp_path):
    text = """
input: "data" input_shape { dim: 1 dim: 4 dim: 2 dim: 2 }
layer { name: "bn" type: "BN" bottom: "data" top: "out" bn_param { bn_mode: INFERENCE } }
"""
    scale, shift = uniform(1, 4, 1, 1, seed=1), uniform(1, 4, 1, 1, seed=2)
    proto, weights = build(tmp_path, "segnet_bn", text, {"bn": [scale, shift]})
    net = run(proto, weights, {"data": uniform(1, 4, 2, 2)})
    assert len(net.params["bn"]) == 2
    close(net.blobs["out"].data, scale * uniform(1, 4, 2, 2) + shift)


def test_bn_layouts_are_told_by_their_fields_and_a_mismatch_is_refused(tmp_path):
    """PSPNet weights under a SegNet-style BN (or the reverse) are refused by Caffe's blob count check, naming the
    layer; a bn_param that mixes both forks' fields is refused by the layer, naming the fields."""
    stats = psp_stats()
    psp_proto, psp_weights = build(tmp_path, "psp", PSP_BN.format(extra="frozen: true"), {"bn": stats})
    segnet_proto = tmp_path / "segnet.prototxt"
    segnet_proto.write_text('input: "data" input_shape { dim: 2 dim: 4 dim: 5 dim: 3 }\n'
                            'layer { name: "bn" type: "BN" bottom: "data" top: "out"\n'
                            '  bn_param { bn_mode: INFERENCE } }\n')
    r = load_in_child(segnet_proto, psp_weights)
    assert r.returncode != 0 and "Incompatible number of blobs for layer bn" in r.stderr, r.stderr[-2000:]
    mixed = tmp_path / "mixed.prototxt"
    mixed.write_text(PSP_BN.format(extra="bn_mode: INFERENCE"))
    r = load_in_child(mixed)
    assert r.returncode != 0 and "mixes PSPNet's fields" in r.stderr, r.stderr[-2000:]


def _with_raw_field(layer_bytes: bytes, number: int, payload: bytes) -> bytes:
    """A serialized LayerParameter with one more length-delimited field, as another fork's proto wrote it."""
    def varint(v: int) -> bytes:
        out = b""
        while True:
            byte, v = v & 0x7F, v >> 7
            out += bytes([byte | (0x80 if v else 0)])
            if not v:
                return out
    return layer_bytes + varint(number << 3 | 2) + varint(len(payload)) + payload


def test_weights_written_by_pspnets_caffe_load(tmp_path):
    """PSPNet's .caffemodel stores each layer's parameters under its own numbers: interp_param 143 (this Caffe's
    input_param) and bn_param 152 (unused here). Caffe takes only the blobs from the weights: such a file loads
    and gives the same answer."""
    text = """
input: "data" input_shape { dim: 1 dim: 4 dim: 3 dim: 3 }
layer { name: "conv/bn" type: "BN" bottom: "data" top: "bn"
  bn_param { slope_filler { type: "constant" value: 1 } bias_filler { type: "constant" value: 0 } frozen: true } }
layer { name: "interp" type: "Interp" bottom: "bn" top: "out" interp_param { zoom_factor: 2 } }
"""
    stats = psp_stats(seed=21)
    proto, weights = build(tmp_path, "psp_file", text, {"conv/bn": stats})
    saved = caffe_pb2.NetParameter.FromString(weights.read_bytes())
    forked = caffe_pb2.NetParameter(name=saved.name)
    raw = b""
    interp_param = b"\x08\x05\x10\x05\x18\x02"  # InterpParameter height 5, width 5, zoom_factor 2 (varints)
    bn_param = b"\x28\x01\x1d" + np.float32(0.95).tobytes()  # BNParameter frozen, momentum (PSPNet's numbers)
    for layer in saved.layer:
        data = layer.SerializeToString()
        if layer.type == "Interp":
            data = _with_raw_field(data, 143, interp_param)
        if layer.type == "BN":
            data = _with_raw_field(data, 152, bn_param)
        raw += _with_raw_field(b"", 100, data)  # NetParameter.layer = 100
    forked_path = tmp_path / "pspnet_written.caffemodel"
    forked_path.write_bytes(forked.SerializeToString() + raw)
    x = uniform(1, 4, 3, 3, seed=2)
    got = run(proto, forked_path, {"data": x}).blobs["out"].data
    close(got, ref.interp(ref.bn_pspnet(x, *stats), 5, 5))


# --- ROIPooling and PSROIPooling -------------------------------------------------------------------

ROIS = np.array([
    [0, 0, 0, 31, 31],        # the whole image
    [1, 4.5, 3.5, 20.5, 9.5],  # halves: C's round goes away from zero (numpy's to even)
    [0, 10, 12, 10, 12],      # one pixel
    [1, -8, -8, 6, 40],       # partly outside: clipped
    [0, 25, 2, 40, 30],
    [1, 30, 30, 30.4, 30.4],
], np.float32)


@pytest.mark.parametrize("pooled,scale", [((3, 3), 0.25), ((2, 4), 0.125), ((7, 7), 0.5)])
def test_roi_pooling_is_the_max_over_each_cell_of_each_region(tmp_path, pooled, scale):
    size = int(32 * scale)
    text = f"""
input: "data" input_shape {{ dim: 2 dim: 3 dim: {size} dim: {size} }}
input: "rois" input_shape {{ dim: {len(ROIS)} dim: 5 }}
layer {{ name: "roi_pool" type: "ROIPooling" bottom: "data" bottom: "rois" top: "pool"
  roi_pooling_param {{ pooled_h: {pooled[0]} pooled_w: {pooled[1]} spatial_scale: {scale} }} }}
"""
    proto, weights = build(tmp_path, "roi", text)
    x = uniform(2, 3, size, size)
    got = run(proto, weights, {"data": x, "rois": ROIS}).blobs["pool"].data
    assert got.shape == (len(ROIS), 3, *pooled)
    np.testing.assert_array_equal(got, ref.roi_pooling(x, ROIS, *pooled, scale))


def test_roi_pooling_reshapes_to_the_number_of_regions_and_a_bad_batch_index_fails_the_pass(tmp_path):
    text = """
input: "data" input_shape { dim: 1 dim: 2 dim: 8 dim: 8 }
input: "rois" input_shape { dim: 1 dim: 5 }
layer { name: "roi_pool" type: "ROIPooling" bottom: "data" bottom: "rois" top: "pool"
  roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 1 } }
"""
    proto, weights = build(tmp_path, "roi_bad", text)
    x = uniform(1, 2, 8, 8)
    rois = np.array([[0, 1, 1, 5, 5], [0, 0, 0, 7, 7], [0, 2, 3, 4, 6]], np.float32)
    np.testing.assert_array_equal(run(proto, weights, {"data": x, "rois": rois}).blobs["pool"].data,
                                  ref.roi_pooling(x, rois, 2, 2, 1.0))
    with pytest.raises(RuntimeError, match="region 0 names batch index 3, outside the 1 images"):
        run(proto, weights, {"data": x, "rois": np.array([[3, 0, 0, 4, 4]], np.float32)})
    # (this process is still alive to assert it)


@pytest.mark.parametrize("k,output_dim,scale", [(3, 2, 0.25), (2, 3, 0.5), (7, 1, 0.25)])
def test_psroi_pooling_averages_each_cells_own_channel(tmp_path, k, output_dim, scale):
    size = int(32 * scale)
    text = f"""
input: "data" input_shape {{ dim: 2 dim: {output_dim * k * k} dim: {size} dim: {size} }}
input: "rois" input_shape {{ dim: {len(ROIS)} dim: 5 }}
layer {{ name: "psroi" type: "PSROIPooling" bottom: "data" bottom: "rois" top: "pool"
  psroi_pooling_param {{ spatial_scale: {scale} output_dim: {output_dim} group_size: {k} }} }}
"""
    proto, weights = build(tmp_path, "psroi", text)
    x = uniform(2, output_dim * k * k, size, size)
    got = run(proto, weights, {"data": x, "rois": ROIS}).blobs["pool"].data
    assert got.shape == (len(ROIS), output_dim, k, k)
    close(got, ref.psroi_pooling(x, ROIS, output_dim, k, scale), 1e-6)


def test_psroi_pooling_refuses_score_maps_of_the_wrong_depth(tmp_path):
    proto = tmp_path / "psroi_bad.prototxt"
    proto.write_text("""
input: "data" input_shape { dim: 1 dim: 10 dim: 4 dim: 4 }
input: "rois" input_shape { dim: 1 dim: 5 }
layer { name: "psroi" type: "PSROIPooling" bottom: "data" bottom: "rois" top: "pool"
  psroi_pooling_param { spatial_scale: 1 output_dim: 2 group_size: 3 } }
""")
    r = load_in_child(proto)
    assert r.returncode != 0 and "the score maps have 10 channels, output_dim x group_size^2 is 18" in r.stderr


# --- Reorg ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,stride,reverse", [
    ((2, 8, 6, 4), 2, False), ((1, 4, 2, 2), 2, False), ((1, 18, 6, 9), 3, False),
    ((2, 8, 3, 5), 2, True), ((1, 9, 2, 2), 3, True),
])
def test_reorg_is_darknets_index_map(tmp_path, shape, stride, reverse):
    text = f"""
input: "data" input_shape {{ dim: {shape[0]} dim: {shape[1]} dim: {shape[2]} dim: {shape[3]} }}
layer {{ name: "reorg" type: "Reorg" bottom: "data" top: "out"
  reorg_param {{ stride: {stride} reverse: {str(reverse).lower()} }} }}
"""
    proto, weights = build(tmp_path, "reorg", text)
    x = uniform(*shape)
    got = run(proto, weights, {"data": x}).blobs["out"].data
    want = ref.reorg(x, stride, reverse)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert sorted(got.ravel().tolist()) == sorted(x.ravel().tolist())  # a permutation


def test_reorg_on_darknets_small_example(tmp_path):
    """1 x 4 x 2 x 2 with stride 2: darknet's forward reads the input as 1 x 1 x 4 x 4, so output element
    (k, j, i) is that plane's (2j + k // 2, 2i + k % 2)."""
    text = """
input: "data" input_shape { dim: 1 dim: 4 dim: 2 dim: 2 }
layer { name: "reorg" type: "Reorg" bottom: "data" top: "out" reorg_param { stride: 2 } }
"""
    proto, weights = build(tmp_path, "reorg_small", text)
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 2, 2)
    got = run(proto, weights, {"data": x}).blobs["out"].data
    plane = x.reshape(4, 4)
    want = np.array([[[plane[2 * j + k // 2, 2 * i + k % 2] for i in range(2)] for j in range(2)] for k in range(4)])
    np.testing.assert_array_equal(got.reshape(4, 2, 2), want)
    assert got.shape == (1, 16, 1, 1)


# --- the Python layer -------------------------------------------------------------------------------

def test_a_python_layer_runs_inside_the_forward_pass_and_its_errors_reach_the_caller(tmp_path, monkeypatch):
    """pycaffe's forward releases the GIL (patch_pycaffe_gil.py); the Python layer takes it back for each call
    (patch_python_layer.py): the layer runs, threads overlap, and an exception in it is pycaffe's exception."""
    import threading

    (tmp_path / "doubling.py").write_text('''
import caffe


class Double(caffe.Layer):
    def setup(self, bottom, top):
        self.fail = self.param_str == "fail"

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        if self.fail and bottom[0].data.max() > 100:
            raise ValueError("doubling refused a value over 100")
        top[0].data[...] = 2 * bottom[0].data
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    text = """
input: "data" input_shape { dim: 1 dim: 3 }
layer { name: "double" type: "Python" bottom: "data" top: "out"
  python_param { module: "doubling" layer: "Double" param_str: "fail" } }
layer { name: "relu" type: "ReLU" bottom: "out" top: "out" }
"""
    proto, weights = build(tmp_path, "py", text)
    nets = [caffe.Net(str(proto), caffe.TEST, weights=str(weights)) for _ in range(2)]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(200):
            nets[i].blobs["data"].data[...] = [[i, -1, 3]]
            nets[i].forward()
        results[i] = nets[i].blobs["out"].data.copy()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(results[0], [[0, 0, 6]])
    np.testing.assert_array_equal(results[1], [[2, 0, 6]])
    nets[0].blobs["data"].data[...] = [[101, 0, 0]]
    with pytest.raises(ValueError, match="doubling refused a value over 100"):
        nets[0].forward()
    nets[0].blobs["data"].data[...] = [[1, 2, 3]]
    nets[0].forward()  # the Net still works
    np.testing.assert_array_equal(nets[0].blobs["out"].data, [[2, 4, 6]])

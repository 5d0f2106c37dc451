"""The parity gate and index choices (a MAX Pooling's mask, ArgMax): a near-tie resolved the other way is
not an error, a different choice between clearly different values is.

ENet at 512x1024 failed the gate (max |Δ| 6 % of its largest output) because 1 or 2 of its 4 million
pooling-mask cells differed: two candidates in a window were within float rounding of each other and
ONNX Runtime's sums, rounded differently from OpenBLAS's, tipped the other way; the Upsample then wrote a
value into the neighbouring cell. No small net reproduces that rounding on demand, so these tests take the
converted graph and add a ramp far below the bound (1e-7) before the comparison: with integer-valued
inputs (exact ties everywhere) it picks the last candidate where Caffe picks the first: the near-tie
case, made certain. A ramp far above the bound (0.3, with continuous inputs) is a real error.
Real pycaffe and a real ONNX Runtime session; only the graph is edited, as the BatchNorm-bug test does.
"""

from __future__ import annotations

import caffe
import numpy as np
import onnx
from caffe import layers as L, params as P
from onnx import helper, numpy_helper

from caffe_testing.nets import save_net
from inference_server.backends.onnxruntime import make_session
from inference_server.loading import parity
from inference_server.loading.convert import convert_net, load_net, model_info
from inference_server.loading.selection import _parity_session_model

TOL = 1e-5


def unpool_net():
    """ENet's decoder path in small: MAX Pooling with its mask, a convolution, Upsample from the mask."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 6, 8]))
    n.pool, n.pool_mask = L.Pooling(n.data, pool=P.Pooling.MAX, kernel_size=2, stride=2, ntop=2)
    n.conv = L.Convolution(n.pool, num_output=2, kernel_size=1)
    n.up = L.Upsample(n.conv, n.pool_mask, upsample_param=dict(scale=2))
    n.out = L.Convolution(n.up, num_output=2, kernel_size=3, pad=1)
    return n


def class_map_net():
    """SegNet's last step: per-pixel scores → ArgMax over the classes."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4, 3, 5]))
    n.label = L.ArgMax(n.data, axis=1)
    return n


def with_ramp_before(model: onnx.ModelProto, op_type: str, ramp: np.ndarray) -> onnx.ModelProto:
    """A copy of `model` with `ramp` added to the first input of its (only) `op_type` node."""
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    node = next(n for n in edited.graph.node if n.op_type == op_type)
    edited.graph.initializer.append(numpy_helper.from_array(ramp.astype(np.float32), "ramp"))
    edited.graph.node.insert(list(edited.graph.node).index(node),
                             helper.make_node("Add", [node.input[0], "ramp"], ["ramped"], name="ramp#node"))
    node.input[0] = "ramped"
    return edited


def gate(net, model, info, inputs, selections=True):
    session = make_session(_parity_session_model(model, info["softmax_logits"] + info["selections"]), "cpu", 0, 1)
    return parity.check_parity(net, session, list(info and [o for o, _ in info["outputs"]]), info["softmax_logits"],
                               inputs, TOL, info["selections"] if selections else None)


def window_ramp(height: int, width: int, step: float) -> np.ndarray:
    """Larger towards each 2x2 window's last cell: there the ramped graph breaks Caffe's first-wins ties."""
    yy, xx = np.mgrid[0:height, 0:width]
    return (step * ((yy % 2) * 2 + (xx % 2))).reshape(1, 1, height, width)


def tied_inputs(shape, seed=0, n=3):
    rng = np.random.default_rng(seed)
    return [{"data": rng.integers(-1, 2, shape).astype(np.float32)} for _ in range(n)]


def test_the_converter_records_the_index_choices_it_makes(tmp_path):
    proto, weights = save_net(unpool_net(), tmp_path, "unpool")
    info = model_info(convert_net(load_net(proto, weights)))
    assert [(s["layer"], s["kind"], s["blob"], s["scores"]) for s in info["selections"]] == [
        ("pool", "mask", "pool_mask", "data")]
    assert (info["selections"][0]["kernel"], info["selections"][0]["stride"]) == ([2, 2], [2, 2])


def test_a_mask_that_breaks_exact_ties_the_other_way_passes_and_is_counted(tmp_path):
    proto, weights = save_net(unpool_net(), tmp_path, "unpool")
    net = load_net(proto, weights)
    model = convert_net(net)
    info = model_info(model)
    ramped = with_ramp_before(model, "MaxPool", window_ramp(6, 8, 1e-7))
    inputs = tied_inputs((1, 2, 6, 8))

    exact = gate(net, model, info, inputs)
    assert exact.passed and exact.near_ties == 0, exact.summary()
    blind = gate(net, ramped, info, inputs, selections=False)  # the gate before: the outputs moved
    assert not blind.passed and blind.worst.max_abs_diff > 0.1, blind.summary()
    report = gate(net, ramped, info, inputs)
    assert report.passed, report.summary()
    assert report.near_ties > 10  # every tied window, in the 3 inputs and their stacked batch
    assert f"{report.near_ties} near-tied index choices taken as onnxruntime made them" in report.summary()
    assert report.details()["parity_near_ties"] == report.near_ties


def test_a_mask_that_differs_where_values_are_not_tied_fails_with_the_reason(tmp_path):
    proto, weights = save_net(unpool_net(), tmp_path, "unpool")
    net = load_net(proto, weights)
    model = convert_net(net)
    info = model_info(model)
    ramped = with_ramp_before(model, "MaxPool", window_ramp(6, 8, 0.3))
    rng = np.random.default_rng(1)
    inputs = [{"data": rng.uniform(-1, 1, (1, 2, 6, 8)).astype(np.float32)} for _ in range(3)]
    report = gate(net, ramped, info, inputs)
    assert not report.passed
    assert report.problem.startswith("'pool_mask' (layer 'pool') chooses another index than pycaffe where the two "
                                     "candidates differ by "), report.problem
    assert report.problem.endswith(": not a near-tie")


def test_argmax_near_ties_pass_and_clear_differences_fail(tmp_path):
    proto, weights = save_net(class_map_net(), tmp_path, "classes")
    net = load_net(proto, weights)
    model = convert_net(net)
    info = model_info(model)
    assert [(s["kind"], s["axis"]) for s in info["selections"]] == [("argmax", 1)]
    lower_first = np.arange(4, 0, -1, dtype=np.float32).reshape(1, 4, 1, 1)  # lower classes win ties
    inputs = tied_inputs((1, 4, 3, 5), seed=2)
    assert not gate(net, with_ramp_before(model, "Slice", 1e-7 * lower_first), info, inputs, selections=False).passed
    report = gate(net, with_ramp_before(model, "Slice", 1e-7 * lower_first), info, inputs)
    assert report.passed and report.near_ties > 0, report.summary()
    wrong = gate(net, with_ramp_before(model, "Slice", 2.0 * lower_first), info, inputs)
    assert not wrong.passed and "not a near-tie" in wrong.problem

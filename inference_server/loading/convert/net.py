"""Caffe net → ONNX model: walk the layers in Caffe's order and let each type's converter emit nodes."""

from __future__ import annotations

import json

from onnx import ModelProto, TensorProto, helper

from ...errors import ModelLoadError
from .builder import GraphBuilder, LayerContext, canonical_axis
from .pooling import pool_geometry
from .registry import converter_for
from .source import CaffeModel

CONVERTER_VERSION = "2"  # bump on any change that alters the graph or what converts: it is part of the cache key
OPSET = 17
IR_VERSION = 8  # opset 17's IR version; loads in ONNX Runtime 1.11 and later
METADATA_KEY = "caffe_serving"
# protobuf serializes one message of at most 2 GiB, the graph itself included: weights beyond this
# cannot be one ONNX file (Caffe's own cap is the same, so only nets at its very limit are refused)
MAX_WEIGHT_BYTES = 2**31 - (16 << 20)


def convert_model(model: CaffeModel, name: str = "caffe") -> ModelProto:
    """Returns the ONNX model; raises UnsupportedLayer for the first layer it cannot convert, and
    ModelLoadError for weights too large for one ONNX file."""
    g = GraphBuilder(reserved=set(model.shapes) | set(model.inputs))
    for blob in model.inputs:
        g.values[blob] = blob
    logits, selections = [], []
    final_softmax = {i for i, layer in enumerate(model.layers)
                     if layer.type == "Softmax" and any(t in model.outputs for t in layer.top)}
    for i, layer in enumerate(model.layers):
        convert_layer = converter_for(layer.name, layer.type)
        bottoms = [g.value(b) for b in layer.bottom]
        if i in final_softmax:
            blob = layer.bottom[0]
            rewritten = any(blob in later.top for later in model.layers[i:])
            logits.append({"layer": layer.name, "blob": blob, "value": bottoms[0],
                           "rewritten_later": rewritten, "previous_layer": model.layers[i - 1].name if i else None})
        ctx = LayerContext(g, layer, bottoms, model.params[i],
                           [model.shapes[b] for b in layer.bottom], [model.shapes[t] for t in layer.top])
        outs = convert_layer(ctx)
        if len(outs) != len(layer.top):
            raise AssertionError(f"converter for {layer.type} returned {len(outs)} values for {len(layer.top)} tops")
        for top, value in zip(layer.top, outs, strict=True):
            g.values[top] = value
        selections += index_choices(layer, outs, model.shapes)

    if g.const_bytes > MAX_WEIGHT_BYTES:
        raise ModelLoadError(f"the converted graph would hold {g.const_bytes / 2**20:.1f} MiB of weights, over the "
                             f"{MAX_WEIGHT_BYTES / 2**20:.1f} MiB one ONNX file can hold (protobuf's 2 GiB limit)")
    for blob in model.outputs:
        if g.values[blob] != blob:
            g.op("Identity", [g.values[blob]], f"{blob}/output", output=blob)

    def io(blob: str):
        shape = model.shapes[blob]
        return helper.make_tensor_value_info(blob, TensorProto.FLOAT, ["N", *shape[1:]] if shape else [])

    graph = helper.make_graph(g.nodes, name, [io(b) for b in model.inputs], [io(b) for b in model.outputs],
                              initializer=g.initializers)
    onnx_model = helper.make_model(graph, producer_name="caffe-serving", producer_version=CONVERTER_VERSION,
                                   opset_imports=[helper.make_opsetid("", OPSET)])
    onnx_model.ir_version = IR_VERSION
    info = {
        "converter_version": CONVERTER_VERSION,
        "inputs": [[b, list(model.shapes[b])] for b in model.inputs],
        "outputs": [[b, list(model.shapes[b])] for b in model.outputs],
        "layer_types": [layer.type for layer in model.layers],
        "softmax_logits": logits,
        "selections": selections,
    }
    helper.set_model_props(onnx_model, {METADATA_KEY: json.dumps(info)})
    return onnx_model


def index_choices(layer, outs: list[str], shapes: dict) -> list[dict]:
    """The tops holding an index chosen by comparing values: a MAX Pooling's mask, ArgMax's indices.

    Where two candidates are within float rounding of each other, ONNX Runtime (whose sums round
    differently) may pick the other one, and everything downstream of that index moves (ENet's
    Upsample puts a value in another cell). The parity gate reads these values to tell such near-ties
    from errors (parity.py).
    """
    if layer.type == "Pooling" and len(layer.top) > 1:
        kernel, stride, pad = pool_geometry(layer.pooling_param)
        return [{"layer": layer.name, "kind": "mask", "blob": layer.top[1], "value": outs[1], "scores": layer.bottom[0],
                 "kernel": list(kernel), "stride": list(stride), "pad": list(pad)}]
    if layer.type == "ArgMax" and not layer.argmax_param.out_max_val:
        p = layer.argmax_param
        axis = canonical_axis(p.axis, len(shapes[layer.bottom[0]])) if p.HasField("axis") else None
        return [{"layer": layer.name, "kind": "argmax", "blob": layer.top[0], "value": outs[0],
                 "scores": layer.bottom[0], "axis": axis}]
    return []


def model_info(onnx_model: ModelProto) -> dict:
    """What the converter recorded about the Caffe net (I/O shapes, layer types, logits values)."""
    for prop in onnx_model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise ValueError("not an ONNX model written by the caffe-serving converter")

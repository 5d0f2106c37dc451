"""Caffe → ONNX, our own converter (see docs/onnx.md for why not the PyPI one, and the layer table).

    net = load_net(prototxt, weights, {"data": (1, 3, 224, 224)})
    onnx_model = convert_net(net)          # raises UnsupportedLayer with the reason

One small function per Caffe layer type (registry.py), reading the net as Caffe itself loaded it.
"""

from __future__ import annotations

from .net import CONVERTER_VERSION, OPSET, convert_model, model_info
from .registry import NOTES, UnsupportedLayer, supported_types
from .source import load_net, read_net


def convert_net(net, name: str = "caffe", outputs: list[str] | None = None):
    """A loaded caffe.Net (reshaped to the serving input shapes) → onnx.ModelProto returning `outputs`
    (any blobs of the net; default: Caffe's net outputs)."""
    return convert_model(read_net(net, outputs), name)


__all__ = ["CONVERTER_VERSION", "OPSET", "NOTES", "UnsupportedLayer", "convert_net", "convert_model",
           "load_net", "model_info", "read_net", "supported_types"]

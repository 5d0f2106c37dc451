"""Building an ONNX graph from Caffe layers: unique value names, constants, and one context per layer.

Caffe blobs may be rewritten in place (`top: "conv1"` on `bottom: "conv1"`), while an ONNX value is
written once. So each Caffe blob maps to its *current* ONNX value, and every value a layer makes
gets a fresh name; only the graph's inputs and outputs carry the bare Caffe blob names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from .registry import UnsupportedLayer


class GraphBuilder:
    def __init__(self, reserved: set[str]):
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.used: set[str] = set(reserved)  # never hand these out (Caffe blob names, graph I/O)
        self.values: dict[str, str] = {}  # Caffe blob name -> current ONNX value name
        self.const_bytes = 0  # the weights' size: one ONNX file holds under 2 GiB

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def const(self, base: str, array, dtype=np.float32) -> str:
        name = self.fresh(base)
        value = np.ascontiguousarray(np.asarray(array, dtype=dtype))
        self.const_bytes += value.nbytes
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, n_out: int = 1, output: str | None = None, **attrs):
        """Append one node; returns its output name (or a list when n_out > 1)."""
        if output is not None:
            outs = [output]
        else:
            outs = [self.fresh(base if n_out == 1 else f"{base}_{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(f"{base}#node"), **attrs))
        return outs[0] if n_out == 1 else outs

    def value(self, blob: str) -> str:
        try:
            return self.values[blob]
        except KeyError:
            raise ValueError(f"blob '{blob}' is used before any layer produces it") from None


@dataclass
class LayerContext:
    """What one layer's converter sees."""

    g: GraphBuilder
    layer: Any  # caffe_pb2.LayerParameter (upgraded by Caffe): protobuf's generated class, untyped
    bottoms: list[str]  # ONNX values of the bottoms, in order
    params: list[np.ndarray]  # the layer's weight blobs from the loaded net (float32)
    bottom_shapes: list[tuple[int, ...]]  # at the batch size the net was reshaped to
    top_shapes: list[tuple[int, ...]]

    @property
    def name(self) -> str:
        return self.layer.name

    def unsupported(self, detail: str) -> UnsupportedLayer:
        return UnsupportedLayer(self.layer.name, self.layer.type, detail)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs):
        return self.g.op(op_type, inputs, f"{self.layer.name}/{op_type}", n_out, **attrs)

    def const(self, suffix: str, array, dtype=np.float32) -> str:
        return self.g.const(f"{self.layer.name}/{suffix}", array, dtype)

    def ints(self, suffix: str, values) -> str:
        return self.const(suffix, np.asarray(values, dtype=np.int64), np.int64)

    def rank(self, i: int = 0) -> int:
        return len(self.bottom_shapes[i])


def canonical_axis(axis: int, rank: int) -> int:
    """Caffe's CanonicalAxisIndex: negative axes count from the end."""
    return axis + rank if axis < 0 else axis


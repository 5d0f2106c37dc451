"""`caffeserve export`'s work: the served net as one ONNX file, with the proof that it gives pycaffe's answers.

The graph is the converter's (loading/convert), at the served input shapes and outputs, batch dynamic.
Before anything is written, every layer is converted on its own, so that a net that cannot be converted
exactly is refused naming *each* layer and why (the converter itself stops at the first). Then the
parity gate the server runs at load (loading/parity.py) judges the graph: several seeded inputs (and one
image through the preprocessing, where configured), every output and the logits before a final Softmax,
within `tolerance` × max(1, max |pycaffe|) and the top-5 classes. A graph that fails is not written either.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from . import served


class ExportRefused(Exception):
    """The net cannot be exported exactly; `problems` lists each reason (one per layer, or the parity failure)."""

    def __init__(self, headline: str, problems: list[str]):
        self.headline, self.problems = headline, problems
        super().__init__(headline + "".join(f"\n  {p}" for p in problems))


@dataclass
class LayerConversion:
    """One Caffe layer and what it became: the ONNX operators it was converted to, or why it could not be."""

    name: str
    type: str
    onnx_ops: list[str]
    note: str  # the converter's own note on what the type maps to (docs/onnx.md's table)
    refused: str | None = None


@dataclass
class OutputParity:
    blob: str
    kind: str  # "output", or "logits" (the value feeding a final Softmax; not in the file's outputs)
    max_abs_diff: float
    max_abs_ref: float
    limit: float
    top5_agree: bool | None
    passed: bool


@dataclass
class Export:
    """What was exported and the parity found: the JSON report is `report()`, the summary `summary()`."""

    model: str
    prototxt: str
    weights: str
    opset: int
    converter_version: str
    onnxruntime_version: str
    tolerance: float
    n_inputs: int
    inputs: dict[str, list[int]]  # at the served shape; the graph's batch axis is dynamic ("N")
    outputs: dict[str, list[int]]
    layers: list[LayerConversion]
    parity: list[OutputParity]
    onnx_bytes: bytes = field(repr=False)
    rule: str = "max |onnx - pycaffe| <= tolerance * max(1, max |pycaffe|) per blob, and the top-5 classes agree"

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.parity)

    def report(self, onnx_path: str) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "onnx_bytes"}
        out.update(onnx=onnx_path, onnx_sha256=hashlib.sha256(self.onnx_bytes).hexdigest(), passed=self.passed)
        return out

    def summary(self, onnx_path: str) -> str:
        lines = [f"{onnx_path}: model {self.model} from {self.prototxt}",
                 f"  ONNX opset {self.opset}, converter {self.converter_version}, checked with onnxruntime "
                 f"{self.onnxruntime_version}",
                 "  inputs:  " + ", ".join(f"{n} {s} (batch dynamic)" for n, s in self.inputs.items()),
                 "  outputs: " + ", ".join(f"{n} {s}" for n, s in self.outputs.items()),
                 f"parity with pycaffe over {self.n_inputs} inputs and their stacked batch "
                 f"(tolerance {self.tolerance:g} x max(1, max |pycaffe|)): {'PASSED' if self.passed else 'FAILED'}"]
        for p in self.parity:
            top5 = {True: ", top-5 agree", False: ", top-5 differ", None: ""}[p.top5_agree]
            lines.append(f"  {p.blob:<20} {p.kind:<7} max |Δ| {p.max_abs_diff:.3g} <= {p.limit:.3g}"
                         f" (max |pycaffe| {p.max_abs_ref:.3g}){top5}" if p.passed else
                         f"  {p.blob:<20} {p.kind:<7} max |Δ| {p.max_abs_diff:.3g} > {p.limit:.3g}  FAILED")
        lines.append(f"layers ({len(self.layers)}):")
        for layer in self.layers:
            lines.append(f"  {layer.name:<24} {layer.type:<14} -> {' '.join(layer.onnx_ops) or '(nothing: identity)'}")
        return "\n".join(lines) + "\n"


def layer_conversions(model) -> list[LayerConversion]:
    """Convert each layer of `model` (convert.source.CaffeModel) on its own: its ONNX operators or its refusal."""
    from .convert.builder import GraphBuilder, LayerContext
    from .convert.registry import NOTES, UnsupportedLayer, converter_for

    found = []
    for i, layer in enumerate(model.layers):
        entry = LayerConversion(layer.name, layer.type, [], NOTES.get(layer.type, ""))
        try:
            convert_layer = converter_for(layer.name, layer.type)
            g = GraphBuilder(reserved=set(model.shapes))
            bottoms = [g.fresh(f"{b}/in") for b in layer.bottom]
            convert_layer(LayerContext(g, layer, bottoms, model.params[i], [model.shapes[b] for b in layer.bottom],
                                       [model.shapes[t] for t in layer.top]))
            entry.onnx_ops = [n.op_type for n in g.nodes]
        except UnsupportedLayer as e:
            entry.refused = e.detail or f"no converter for type '{layer.type}'"
        found.append(entry)
    return found


def _parity_rows(report, outputs: list[str]) -> list[OutputParity]:
    return [OutputParity(c.blob, "output" if c.blob in outputs else "logits", c.max_abs_diff, c.max_abs_ref,
                         c.limit, c.top5_agree, c.passed) for c in report.comparisons]


def export_model(cfg, tolerance: float | None = None, n_random: int = 3) -> Export:
    """Convert the net `cfg` serves and judge it; ExportRefused when it cannot be exported exactly,
    ModelLoadError when pycaffe cannot load it."""
    import onnxruntime

    from . import parity
    from .convert import CONVERTER_VERSION, OPSET, convert_model, load_net, model_info, read_net
    from .selection import with_logits_outputs

    tolerance = cfg.parity_tolerance if tolerance is None else tolerance
    prototxt, weights = str(cfg.path(cfg.model.prototxt)), str(cfg.path(cfg.model.weights))
    net = load_net(prototxt, weights)
    shapes = served.input_shapes(cfg, net)
    served.reshape(net, shapes)
    outputs = served.output_blobs(cfg, net)
    output_shapes = {b: list(net.blobs[b].data.shape) for b in outputs}  # before the parity check reshapes the net
    caffe_model = read_net(net, outputs)
    layers = layer_conversions(caffe_model)
    refused = [f"layer '{c.name}' ({c.type}): {c.refused}" for c in layers if c.refused]
    if refused:
        raise ExportRefused(f"cannot convert {len(refused)} of {len(layers)} layers of {prototxt} to ONNX exactly:",
                            refused)
    onnx_model = convert_model(caffe_model, name=cfg.name)
    del caffe_model
    onnx_bytes = onnx_model.SerializeToString()
    logits = [e for e in model_info(onnx_model)["softmax_logits"] if e["blob"] not in outputs]
    # the gate's session: the same graph with the logits as extra outputs (nothing else differs)
    gated = with_logits_outputs(onnx_model, logits).SerializeToString()
    del onnx_model
    session = onnxruntime.InferenceSession(gated, providers=["CPUExecutionProvider"])
    pre = cfg.preprocessing
    mean_path = str(cfg.path(pre.mean_file)) if pre is not None and pre.mean_file else None
    inputs = parity.parity_inputs(shapes, pre, mean_path, cfg.limits.max_image_pixels, n_random=n_random)
    report = parity.check_parity(net, session, outputs, logits, inputs, tolerance)
    if report.problem:
        raise ExportRefused("the converted graph does not give pycaffe's answers:", [report.problem])
    done = Export(
        model=cfg.name, prototxt=prototxt, weights=weights, opset=OPSET, converter_version=CONVERTER_VERSION,
        onnxruntime_version=onnxruntime.__version__, tolerance=tolerance, n_inputs=len(inputs),
        inputs={n: list(s) for n, s in shapes.items()},
        outputs=output_shapes,
        layers=layers, parity=_parity_rows(report, outputs), onnx_bytes=onnx_bytes)
    if not done.passed:
        raise ExportRefused("the converted graph does not give pycaffe's answers within the tolerance:",
                            [f"'{p.blob}' ({p.kind}): max |Δ| {p.max_abs_diff:.3g} > {p.limit:.3g}"
                             + (", top-5 classes differ" if p.top5_agree is False else "")
                             for p in done.parity if not p.passed])
    return done


class _Session:
    """An ONNX Runtime session with the backends' `infer` (the batching probe runs any backend)."""

    def __init__(self, onnx_bytes: bytes):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, self.session.run(outputs, inputs), strict=True))


def batching_probe(done: Export, tolerance: float, value_range: tuple[float, float]):
    """The server's load-time probe (forward_probe.py) on the exported graph: can it be batched, and which
    output dimensions does the data decide?"""
    from .forward_probe import probe

    declared = {n: tuple(s) for n, s in done.outputs.items()}
    items = {n: tuple(s[1:]) for n, s in done.inputs.items()}
    return probe(_Session(done.onnx_bytes), declared, items, list(done.outputs), tolerance, value_range)


def check_loadable(onnx_bytes: bytes) -> None:
    """ModelLoadError unless ONNX's checker accepts the graph."""
    import onnx

    try:
        onnx.checker.check_model(onnx.load_from_string(onnx_bytes))
    except Exception as e:  # onnx raises ValidationError and friends
        raise ModelLoadError(f"the converted graph fails ONNX's checker: {e}") from None

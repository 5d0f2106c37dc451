"""A Triton model repository for an exported graph: `NAME/1/model.onnx` and `NAME/config.pbtxt`.

The config is written as text in Triton's `ModelConfig` protobuf text format (the tests parse it with
Triton's own `model_config.proto`), with what the server's load-time probe found on the exported graph:

- `max_batch_size`: the largest batch one request may carry here (`limits.maxBatch`) when the probe finds
  the net batch-separable (every output keeps the batch on axis 0, a stacked forward equals the items');
  else 0, and the dims then carry the batch axis themselves (-1): Triton must never split such outputs.
- dims: -1 where the data decides a dimension;
- `dynamic_batching` only where the config turns batching on (`batching.enabled: true` or `auto`), with its
  queue delay, as the server would batch;
- the labels file, where the config names one, on the first output (Triton's classification extension).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TritonTensor:
    name: str
    dims: list[int]


@dataclass
class TritonConfig:
    name: str
    max_batch_size: int
    inputs: list[TritonTensor]
    outputs: list[TritonTensor]
    dynamic_batching_delay_us: int | None = None  # None: no dynamic_batching block
    label_filename: str | None = None

    def text(self) -> str:
        """config.pbtxt: Triton's ModelConfig in protobuf text format."""

        def tensors(kind: str, items: list[TritonTensor], labels: str | None = None) -> list[str]:
            lines = [f"{kind} ["]
            for i, t in enumerate(items):
                lines += ["  {", f"    name: {json.dumps(t.name, ensure_ascii=False)}", "    data_type: TYPE_FP32",
                          f"    dims: [ {', '.join(str(d) for d in t.dims)} ]"]
                if labels is not None and i == 0:
                    lines.append(f"    label_filename: {json.dumps(labels, ensure_ascii=False)}")
                lines.append("  }," if i < len(items) - 1 else "  }")
            return [*lines, "]"]

        lines = [f"name: {json.dumps(self.name, ensure_ascii=False)}", 'backend: "onnxruntime"',
                 'platform: "onnxruntime_onnx"', f"max_batch_size: {self.max_batch_size}",
                 *tensors("input", self.inputs), *tensors("output", self.outputs, self.label_filename)]
        if self.dynamic_batching_delay_us is not None:
            lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {self.dynamic_batching_delay_us} }}")
        return "\n".join(lines) + "\n"


def triton_config(cfg, inputs: dict[str, list[int]], output_shapes: dict[str, tuple[int, ...]],
                  separable: bool | None) -> TritonConfig:
    """`inputs` at the served shape; `output_shapes` as the probe reports them (-1 on axis 0 and where the data
    decides)."""
    batched = bool(separable)
    max_batch = cfg.limits.max_batch if batched else 0

    def dims(shape) -> list[int]:
        shape = list(shape)
        return shape[1:] if batched else [-1, *shape[1:]]

    delay = None
    if batched and cfg.batching.enabled is not False:
        delay = int(round(cfg.batching.max_queue_delay_ms * 1000))
    return TritonConfig(
        name=cfg.name, max_batch_size=max_batch,
        inputs=[TritonTensor(n, dims(s)) for n, s in inputs.items()],
        outputs=[TritonTensor(n, dims(s)) for n, s in output_shapes.items()],
        dynamic_batching_delay_us=delay,
        label_filename=Path(cfg.model.labels).name if cfg.model.labels else None)


def write_repository(root: Path, config: TritonConfig, onnx_bytes: bytes, labels: Path | None = None) -> Path:
    """Write `root/NAME/1/model.onnx` and `root/NAME/config.pbtxt` (and the labels file); returns the model folder."""
    folder = root / config.name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "1" / "model.onnx").write_bytes(onnx_bytes)
    (folder / "config.pbtxt").write_text(config.text())
    if labels is not None and config.label_filename:
        shutil.copyfile(labels, folder / config.label_filename)
    return folder

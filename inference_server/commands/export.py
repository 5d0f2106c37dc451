"""`caffeserve export MODEL_DIR_OR_CONFIG --onnx OUT.onnx [--triton-repo DIR]`: take the model out, with the proof.

Writes the converted graph (ONNX, batch dynamic) and beside it the parity report: OUT.parity.json and a
readable OUT.parity.txt (per output max |Δ| against pycaffe on several inputs, each layer's conversion,
the opset, the tolerance passed). A net that cannot be converted exactly is refused, naming each layer,
and nothing is written. `--triton-repo DIR` also writes DIR/NAME/1/model.onnx and DIR/NAME/config.pbtxt.
Exit status 0 when exported, 1 when refused (or pycaffe cannot load the model), 2 for a usage or config error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from caffe_http.access_log import add_logging_arguments, configure_logging

from ..config import ConfigError
from ..errors import ModelLoadError
from ..model_dir import config_from


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="caffeserve export", description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL_DIR_OR_CONFIG",
                   help="a server config YAML, or a model folder (its server.yaml, else its prototxt and caffemodel "
                        "with the net's own inputs and outputs)")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--triton-repo", metavar="DIR", help="also write a Triton model repository here: NAME/1/model.onnx "
                   "and NAME/config.pbtxt")
    p.add_argument("--tolerance", type=float, default=None,
                   help="parity bound: max |Δ| <= this × max(1, max |pycaffe|) (default: the config's "
                        "parityTolerance, 1e-5 unless it says otherwise)")
    p.add_argument("--inputs", type=int, default=3, metavar="N",
                   help="seeded random inputs in the parity check, plus one image where the config has "
                        "preprocessing (default %(default)s)")
    p.add_argument("--name", default=None,
                   help="the model name (Triton's folder and config name; default: the config's name, or the "
                        "folder's)")
    add_logging_arguments(p, default_level="WARNING", access_log=False)
    return p.parse_args(argv)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def report_paths(onnx_path: Path) -> tuple[Path, Path]:
    """OUT.onnx → OUT.parity.json, OUT.parity.txt."""
    stem = onnx_path.with_suffix("") if onnx_path.suffix == ".onnx" else onnx_path
    return stem.with_name(stem.name + ".parity.json"), stem.with_name(stem.name + ".parity.txt")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    if args.inputs < 1:
        print("caffeserve export: --inputs must be at least 1", file=sys.stderr)
        return 2
    if args.tolerance is not None and not 0 < args.tolerance <= 1e-2:
        print("caffeserve export: --tolerance must be in (0, 0.01]", file=sys.stderr)
        return 2
    try:
        cfg, source = config_from(args.model, args.name)
    except ConfigError as e:
        print(f"caffeserve export: {e}", file=sys.stderr)
        return 2
    from ..loading.child_load import probe_load
    from ..loading.export import ExportRefused, batching_probe, check_loadable, export_model
    from ..loading.parity import value_range
    from ..loading.triton_repo import triton_config, write_repository
    from ..serving.dataplane import check_model_files

    try:
        check_model_files(cfg)
        probe_load(cfg)  # a Caffe abort (CHECK, FATAL) is a ModelLoadError here, not the end of this process
        done = export_model(cfg, args.tolerance, args.inputs)
        check_loadable(done.onnx_bytes)
    except ExportRefused as e:
        print(f"caffeserve export: refused: {e}", file=sys.stderr)
        return 1
    except ModelLoadError as e:
        print(f"caffeserve export: model {cfg.name}: {e}", file=sys.stderr)
        return 1

    onnx_path = Path(args.onnx)
    json_path, text_path = report_paths(onnx_path)
    report = done.report(str(onnx_path))
    report["config"] = source
    summary = done.summary(str(onnx_path))
    if args.triton_repo:
        found = batching_probe(done, done.tolerance, value_range(cfg.preprocessing))
        tc = triton_config(cfg, done.inputs, found.shapes, found.separable)
        folder = write_repository(Path(args.triton_repo), tc, done.onnx_bytes, cfg.path(cfg.model.labels))
        report["triton"] = {"repository": str(folder), "max_batch_size": tc.max_batch_size,
                            "batch_separable": found.separable, "batch_separable_reason": found.reason}
        summary += (f"Triton repository: {folder}/1/model.onnx and {folder}/config.pbtxt, max_batch_size "
                    f"{tc.max_batch_size} ({'' if found.separable else 'not batched: '}{found.reason})\n")
    _write_atomically(onnx_path, done.onnx_bytes)
    _write_atomically(json_path, (json.dumps(report, indent=1) + "\n").encode())
    _write_atomically(text_path, summary.encode())
    print(summary, end="")
    print(f"wrote {onnx_path}, {json_path}, {text_path}")
    return 0

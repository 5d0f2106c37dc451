"""`caffeserve check --config FILE`: what a user runs before deploying a model.

Loads the model as the server would, then prints its inputs and outputs, its layer types (and any
the ONNX Runtime backend cannot convert), which backend `auto` would choose and why, the parity
figures, and the forward time of each backend on this machine. Exit status 0 when the configured
backend would start, 1 when it would not, 2 for an invalid config.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter

import numpy as np

from .config import ConfigError, load_config
from .errors import ModelLoadError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="caffeserve check", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="server config YAML, as for `caffeserve serve`")
    p.add_argument("--runs", type=int, default=20, help="forward passes timed per backend (p50 is printed)")
    return p.parse_args(argv)


def forward_p50_ms(backend, inputs: dict[str, np.ndarray], outputs: list[str], runs: int) -> float:
    backend.infer(inputs, outputs)  # warm-up (allocations, ORT's first-run planning)
    times = []
    for _ in range(max(1, runs)):
        t = time.perf_counter()
        backend.infer(inputs, outputs)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"caffeserve check: {e}", file=sys.stderr)
        return 2
    from .backends import BackendChoice, create_backend
    from .backends.selection import evaluate, serving_input_shapes
    from .convert import load_net, supported_types
    from .dataplane import check_model_files

    out = print
    try:
        check_model_files(cfg)
        net = load_net(cfg.path(cfg.model.prototxt), cfg.path(cfg.model.weights))
    except ModelLoadError as e:
        out(f"model {cfg.name}: cannot load: {e}")
        return 1
    shapes = serving_input_shapes(cfg, net)
    out(f"model {cfg.name} version {cfg.version}")
    out(f"  prototxt  {cfg.path(cfg.model.prototxt)}")
    out(f"  weights   {cfg.path(cfg.model.weights)}")
    out("inputs:")
    for name, shape in shapes.items():
        out(f"  {name:<20} {list(shape)}")
    out("outputs:")
    for name in net.outputs:
        out(f"  {name:<20} {list(net.blobs[name].data.shape)}")
    types = Counter(layer.type for layer in net.layers)
    unsupported = sorted(t for t in types if t not in set(supported_types()))
    out(f"layers: {sum(types.values())} ({', '.join(f'{t} ×{c}' for t, c in types.items())})")
    out("  every layer type has an ONNX converter" if not unsupported
        else f"  without an ONNX converter: {', '.join(unsupported)}")
    del net

    ev = evaluate(cfg)
    d = ev.details
    out("onnxruntime backend:")
    if "parity_passed" in d:
        out(f"  converted graph  {ev.artifact} (converter {d['converter_version']}, "
            f"{'from the cache' if d.get('onnx_cache_hit') else 'converted now'})")
        out(f"  parity           {'PASS' if d['parity_passed'] else 'FAIL'}: {ev.summary}")
        out(f"                   tolerance {d['parity_tolerance']:g} × max(1, max |pycaffe|); "
            f"compared {d['parity_compared']}")
    else:
        out(f"  not available: {ev.problem}")
    auto = "onnxruntime" if ev.problem is None else "pycaffe"
    out(f"backend auto would choose: {auto}" + ("" if ev.problem is None else f" (because {ev.problem})"))

    configured_ok = not (cfg.backend == "onnxruntime" and ev.problem is not None)
    out(f"configured backend: {cfg.backend}" + ("" if configured_ok else " — it would refuse to start"))

    out(f"forward time (batch {next(iter(shapes.values()))[0]}, p50 of {args.runs}):")
    rng = np.random.default_rng(0)
    inputs = {n: rng.uniform(-1, 1, s).astype(np.float32) for n, s in shapes.items()}
    timings = {}
    choices = [BackendChoice("pycaffe", "check")]
    if ev.artifact is not None:
        choices.append(BackendChoice("onnxruntime", "check", d, ev.artifact))
    for choice in choices:
        try:
            backend = create_backend(cfg, choice)
            outputs = [b.name for b in backend.describe().outputs]
            timings[choice.name] = forward_p50_ms(backend, inputs, outputs, args.runs)
            note = "" if choice.name == "pycaffe" or ev.problem is None else " (not served: parity failed)"
            out(f"  {choice.name:<12} {_fmt_ms(timings[choice.name])}{note}")
        except ModelLoadError as e:
            out(f"  {choice.name:<12} cannot run here: {e}")
    if len(timings) == 2:
        out(f"  onnxruntime is {timings['pycaffe'] / timings['onnxruntime']:.2f}× the speed of pycaffe")
    return 0 if configured_ok else 1

"""`caffeserve check --config FILE`: what a user runs before deploying a model.

Loads the model as the server would (the configured input shapes and outputs), then prints its inputs
and outputs (-1 where the data decides a dimension), its layer types (and any the ONNX Runtime backend
cannot convert), whether the net can be batched, which backend `auto` would choose and why, the parity
figures, and the forward time of each backend on this machine. Exit status 0 when the configured
server would start, 1 when it would not (backend, batching, or nothing to serve), 2 for an invalid config.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter

import numpy as np

from caffe_http.access_log import add_logging_arguments, configure_logging

from ..config import ConfigError, load_config
from ..errors import ModelLoadError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="caffeserve check", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="server config YAML, as for `caffeserve serve`")
    p.add_argument("--runs", type=int, default=20,
                   help="forward passes timed per backend (p50 is printed; default %(default)s)")
    add_logging_arguments(p, default_level="WARNING", access_log=False)
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
    configure_logging(args.log_level, args.log_format)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"caffeserve check: {e}", file=sys.stderr)
        return 2
    try:
        return run_checks(cfg, args.runs, print)
    except ModelLoadError as e:
        print(f"model {cfg.name}: cannot serve: {e}")
        return 1
    except Exception as e:  # a check explains what it found; it never ends in a traceback
        print(f"model {cfg.name}: the check failed: {type(e).__name__}: {e}")
        return 1


def _shown_shape(declared: tuple[int, ...], probed: tuple[int, ...]) -> list[int]:
    """The shape at the served batch, with -1 on the axes the data decides (the probe's -1 past axis 0)."""
    return [declared[0], *(p if p == -1 else d for d, p in zip(declared[1:], probed[1:]))] if declared else []


def _batching_line(label: str, found) -> str:
    if found.separable is None:
        return f"batching ({label}): {found.reason}"
    verdict = "can be batched" if found.separable else "cannot be batched"
    return f"batching ({label}): the net {verdict}: {found.reason}"


def _probe(backend, cfg):
    """The backend's description and what the server's load-time probe would find with it."""
    from ..loading.parity import value_range
    from ..loading.forward_probe import probe, runs_batches

    desc = backend.describe()
    return desc, probe(backend, {b.name: b.shape for b in desc.outputs}, {b.name: b.shape[1:] for b in desc.inputs},
                       [b.name for b in desc.outputs], cfg.parity_tolerance, value_range(cfg.preprocessing),
                       runs_batches(cfg))


def run_checks(cfg, runs: int, out) -> int:
    """Print what serving `cfg` would do; 0 when the configured server would start, else 1."""
    from ..backends import BackendChoice, create_backend
    from ..backends.pycaffe import PycaffeBackend
    from ..loading.selection import decide, evaluate
    from ..loading.convert import supported_types
    from ..serving.dataplane import check_model_files
    from ..loading.child_load import probe_load

    check_model_files(cfg)
    prototxt, weights = str(cfg.path(cfg.model.prototxt)), str(cfg.path(cfg.model.weights))
    probed = probe_load(cfg)  # a Caffe abort (CHECK, FATAL) is a ModelLoadError here, printed with exit 1
    caffe_backend = PycaffeBackend(prototxt, weights, "cpu", 0, cfg)  # served shapes and outputs, as the server
    desc, caffe_probe = _probe(caffe_backend, cfg)
    out(f"model {cfg.name} version {cfg.version}")
    out(f"  prototxt  {prototxt}")
    out(f"  weights   {weights}")
    out("inputs:")
    for b in desc.inputs:
        out(f"  {b.name:<20} {list(b.shape)}")
    out("outputs:" + ("" if cfg.outputs else " (Caffe's net outputs)"))
    shown = {b.name: _shown_shape(b.shape, caffe_probe.shapes[b.name]) for b in desc.outputs}
    for name, shape in shown.items():
        out(f"  {name:<20} {shape}" + ("  (-1: decided by the data)" if -1 in shape[1:] else ""))
    types = Counter(desc.layer_types)
    unsupported = sorted(t for t in types if t not in set(supported_types()))
    out(f"layers: {sum(types.values())} ({', '.join(f'{t} ×{c}' for t, c in types.items())})")
    out("  every layer type has an ONNX converter" if not unsupported
        else f"  without an ONNX converter: {', '.join(unsupported)}")
    out(_batching_line("pycaffe", caffe_probe))
    del caffe_backend

    ev = evaluate(cfg, probed=probed, speed=True)
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
    if ev.speed:
        sp = ev.speed
        out(f"  timing at load   onnxruntime {_fmt_ms(sp['onnxruntime_ms'])}, pycaffe {_fmt_ms(sp['pycaffe_ms'])} "
            f"({sp['speedup']:.2f}× over {sp['pairs']} interleaved pairs"
            f"{', recorded with the verdict' if d.get('verdict_cached') else ''})")
    auto_cfg = cfg.model_copy(update={"backend": "auto"})
    auto_choice = decide(auto_cfg, ev)
    auto = auto_choice.name
    why = auto_choice.reason.removeprefix("auto: serving with pycaffe ").removeprefix("auto: onnxruntime, ")
    out(f"backend auto would choose: {auto} ({why})")
    serving = {"pycaffe": "pycaffe", "onnxruntime": "onnxruntime", "auto": auto}[cfg.backend]
    backend_ok = not (cfg.backend == "onnxruntime" and ev.problem is not None)
    out(f"configured backend: {cfg.backend}" + ("" if backend_ok else " — it would refuse to start"))

    shapes = {b.name: b.shape for b in desc.inputs}
    outputs = [b.name for b in desc.outputs]
    out(f"forward time (batch {next(iter(shapes.values()))[0]}, p50 of {runs}):")
    rng = np.random.default_rng(0)
    inputs = {n: rng.uniform(-1, 1, s).astype(np.float32) for n, s in shapes.items()}
    timings, probes = {}, {"pycaffe": caffe_probe}
    choices = [BackendChoice("pycaffe", "check")]
    if ev.artifact is not None:
        choices.append(BackendChoice("onnxruntime", "check", d, ev.artifact))
    for choice in choices:
        try:
            backend = create_backend(cfg, choice)
            if choice.name == "onnxruntime":
                probes["onnxruntime"] = _probe(backend, cfg)[1]
            timings[choice.name] = forward_p50_ms(backend, inputs, outputs, runs)
            note = "" if choice.name == "pycaffe" or ev.problem is None else " (not served: parity failed)"
            out(f"  {choice.name:<12} {_fmt_ms(timings[choice.name])}{note}")
        except ModelLoadError as e:
            out(f"  {choice.name:<12} cannot run here: {e}")
    if len(timings) == 2:
        out(f"  onnxruntime is {timings['pycaffe'] / timings['onnxruntime']:.2f}× the speed of pycaffe")
    if "onnxruntime" in probes:
        out(_batching_line("onnxruntime", probes["onnxruntime"]))

    found = probes.get(serving, caffe_probe)
    batching_ok = cfg.batching.enabled is not True or found.separable
    if not batching_ok:
        out(f"batching: enabled — the server would refuse to start: the net cannot be batched: {found.reason}")
    return 0 if backend_ok and batching_ok else 1

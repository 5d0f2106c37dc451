"""Choosing the accelerated backend: convert (or reuse the cached graph), prove parity, time, decide.

`backend: onnxruntime` refuses to start (ModelLoadError) unless the converted graph passes the
parity gate. `backend: auto` serves with ONNX Runtime only where the graph passes the gate AND a short
timing at load finds it at least `CAFFESERVE_AUTO_MIN_SPEEDUP` (default 1.1) times as fast as pycaffe
at the served shapes on this machine, saving at least `CAFFESERVE_AUTO_MIN_SAVING_MS` (default 0.1) per
forward; otherwise with pycaffe. Either way the BackendChoice says why,
with the parity and speed figures in `details`.

With `auto`, the server serves with pycaffe as soon as the Net loads and runs this check in a child
process beside it (loading/background.py, serving/switch.py), unless a verdict is already cached
(`cached_evaluation`).

Converted graphs are cached on disk under CAFFESERVE_CACHE_DIR (default ~/.cache/caffe-serving/onnx) and
published to a shared cache the next pod finds (loading/onnx_cache.py), named by the sha256 of the
prototxt, the weights, the served input shapes, the served output blobs and the converter version. The
graph carries the logits feeding a final Softmax as extra outputs, so the file the gate judges is byte
for byte the file that serves. Beside it, a verdict file records what the gate and the timing found
together with the sha256 of the graph's bytes they judged, keyed further by the ONNX Runtime version,
the device, the tolerance, the parity inputs (preprocessing, mean file) and this machine's CPUs. A
restart whose graph hashes to the recorded bytes is served from the verdict without loading the Net,
converting or rerunning the gate; any change to a keyed input, or to the graph's bytes, reruns them (a
cached graph that then fails the gate is converted again once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends import BackendChoice
from ..errors import ModelLoadError
from ..hashing import file_sha256
from . import onnx_cache, served

if TYPE_CHECKING:
    from .parity import ParityReport

log = logging.getLogger("caffeserve.backends")

MIN_SPEEDUP_ENV = "CAFFESERVE_AUTO_MIN_SPEEDUP"
DEFAULT_MIN_SPEEDUP = 1.1  # a margin over the timing's noise on a busy machine: within it, pycaffe stays
MIN_SAVING_ENV = "CAFFESERVE_AUTO_MIN_SAVING_MS"
# A forward of a few hundredths of a ms (the digits net) is dwarfed by the server's own per-request cost
# (~0.5 ms), and at that size ONNX Runtime's figure swings between 0.6× and 1.3× pycaffe's run to run:
# below this saving per forward, pycaffe (the reference) stays.
DEFAULT_MIN_SAVING_MS = 0.1
SPEED_BUDGET_S = 1.0  # the timing at load: pairs of runs until this is spent (at least 5, at most 200)
SPEED_MIN_PAIRS = 5
SPEED_MAX_PAIRS = 200


@dataclass
class Evaluation:
    """What conversion + parity found: `problem` is None when ONNX Runtime may serve."""

    problem: str | None
    details: dict = field(default_factory=dict)
    artifact: str | None = None
    summary: str = ""
    timings: dict = field(default_factory=dict)
    speed: dict | None = None  # measure_speed's figures, where timed
    verdict_file: str | None = None  # the local verdict file written (not published: evaluate(publish=False))


def _save_atomically(onnx_model, path: Path) -> None:
    import onnx

    if not onnx_cache.write_atomically(path, lambda tmp: onnx.save(onnx_model, str(tmp))):
        raise ModelLoadError(f"could not write the converted graph {path}")


def with_logits_outputs(onnx_model, logits: list[dict]):
    """Add the values feeding the final Softmax layers (and the index choices) as graph outputs (in place),
    for the parity gate."""
    from onnx import TensorProto, helper

    present = {o.name for o in onnx_model.graph.output}
    for entry in logits:
        if entry["value"] not in present:
            onnx_model.graph.output.append(helper.make_tensor_value_info(entry["value"], TensorProto.FLOAT, None))
            present.add(entry["value"])
    return onnx_model


def _parity_session_model(onnx_model, logits: list[dict]) -> bytes:
    """A copy of `onnx_model` with the logits outputs, serialized (for tests that gate a graph held in memory)."""
    m = type(onnx_model)()
    m.CopyFrom(onnx_model)
    return with_logits_outputs(m, logits).SerializeToString()


def _gated_logits(info: dict, outputs: list[str]) -> list[dict]:
    return [e for e in info["softmax_logits"] if e["blob"] not in outputs]


def _convert(net, path: Path, cfg, outputs: list[str]) -> tuple[str | None, bool]:
    """Convert (serving `outputs`, plus the logits) into `path`; (problem or None, whether the problem is final).

    The in-memory graph is dropped once written: the gate and the server read the file.
    """
    from .convert import UnsupportedLayer, convert_net, model_info

    try:
        onnx_model = convert_net(net, name=cfg.name, outputs=outputs)
    except UnsupportedLayer as e:
        return str(e), True  # a fact of this converter version: recorded in the verdict
    except ModelLoadError as e:
        return f"the conversion failed: {e}", False
    except Exception as e:  # a converter bug must not take the server down: report it, let auto fall back
        log.exception("converting %s failed", cfg.model.prototxt)
        return f"the conversion failed ({type(e).__name__}: {e})", False
    info = model_info(onnx_model)
    with_logits_outputs(onnx_model, _gated_logits(info, outputs) + info.get("selections", []))
    _save_atomically(onnx_model, path)
    return None, False


# --- the verdict file

def verdict_key(cfg, graph_key: str, n_random: int) -> tuple[dict, str]:
    """What the gate's and the timing's findings depend on beyond the graph: (fields, their sha256)."""
    import onnxruntime

    from ..cpus import available_cpus

    pre = cfg.preprocessing
    fields = {
        "format": onnx_cache.CACHE_FORMAT,
        "graph": graph_key,
        "onnxruntime": onnxruntime.__version__,
        "device": [str(getattr(cfg.device.kind, "value", cfg.device.kind)), cfg.device.id],
        "instances": cfg.instances,
        "parity_tolerance": cfg.parity_tolerance,
        "parity_random_inputs": n_random,
        "preprocessing": pre.model_dump(mode="json") if pre is not None else None,
        "mean_file_sha256": file_sha256(cfg.path(pre.mean_file)) if pre is not None and pre.mean_file else None,
        "cpus": available_cpus(),
        "cpu_model": onnx_cache.cpu_model(),
        "machine": platform.machine(),
    }
    return fields, hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


# --- the gate and the timing

def _gate(net, path: Path, cfg, shapes: dict, outputs: list[str], n_random: int, details: dict):
    """Run the parity gate on the graph file with the serving session options; (report, problem, session).

    On a GPU with TensorRT installed, TensorRT is tried first (its default TF32 kernels may miss the
    bound); where it fails, the CUDA provider alone is judged. `details["onnx_tensorrt"]` says which.
    """
    from ..backends.onnxruntime import make_session, recorded_info, tensorrt_available
    from . import parity

    pre = cfg.preprocessing
    mean_path = str(cfg.path(pre.mean_file)) if pre is not None and pre.mean_file else None
    inputs = parity.parity_inputs(shapes, pre, mean_path, cfg.limits.max_image_pixels, n_random=n_random)
    report, problem, session = None, None, None
    for tensorrt in ((True, False) if cfg.device.kind == "gpu" and tensorrt_available() else (False,)):
        try:
            session = make_session(str(path), cfg.device.kind, cfg.device.id, cfg.instances, tensorrt=tensorrt)
            info = recorded_info(session)
        except ModelLoadError as e:
            report, problem, session = None, str(e), None
            continue
        recorded = [name for name, _ in info["outputs"]]
        if recorded != outputs:
            return None, f"the graph serves {recorded}, not the served outputs {outputs}", None
        logits = _gated_logits(info, outputs)
        report = parity.check_parity(net, session, outputs, logits, inputs, cfg.parity_tolerance,
                                     info.get("selections", []))
        problem = None if report.passed else f"the parity check failed: {report.summary()}"
        details["onnx_tensorrt"] = tensorrt
        if problem is None:
            break
        if tensorrt:
            log.warning("with TensorRT, %s; trying the CUDA provider alone", problem)
    return report, problem, session


def measure_speed(net, session, shapes: dict, outputs: list[str], value_range: tuple[float, float] = (-1.0, 1.0),
                  budget_s: float = SPEED_BUDGET_S, min_pairs: int = SPEED_MIN_PAIRS,
                  max_pairs: int = SPEED_MAX_PAIRS) -> dict:
    """Forward time of pycaffe and of ONNX Runtime at the served shapes, as each backend serves a request
    (copy in, forward, copy out). Robust on a busy machine: runs alternate (each pair in turn order), the
    figures are medians, and the speed-up is the median of the pairs' ratios (both runs of a pair see
    about the same load)."""
    import numpy as np

    rng = np.random.default_rng(0)
    lo, hi = value_range
    feed = {n: rng.uniform(lo, hi, s).astype(np.float32) for n, s in shapes.items()}

    def caffe_run():
        for name, arr in feed.items():
            net.blobs[name].data[...] = arr
        net.forward()
        return [net.blobs[b].data.copy() for b in outputs]

    def ort_run():
        return session.run(outputs, feed)

    served.reshape(net, shapes)
    caffe_run()  # warm-up: allocations, ORT's first-run planning
    ort_run()
    pairs: list[tuple[float, float]] = []
    spent, t_end = 0.0, time.perf_counter() + budget_s
    while len(pairs) < min_pairs or (time.perf_counter() < t_end and len(pairs) < max_pairs):
        runs = (caffe_run, ort_run) if len(pairs) % 2 == 0 else (ort_run, caffe_run)
        took = {}
        for run in runs:
            t = time.perf_counter()
            run()
            took[run] = time.perf_counter() - t
        pairs.append((took[caffe_run], took[ort_run]))
        spent += sum(took.values())
    caffe_ms = statistics.median(p[0] for p in pairs) * 1000
    ort_ms = statistics.median(p[1] for p in pairs) * 1000
    speedup = statistics.median(p[0] / max(p[1], 1e-9) for p in pairs)
    return {"pycaffe_ms": round(caffe_ms, 4), "onnxruntime_ms": round(ort_ms, 4), "speedup": round(speedup, 3),
            "pairs": len(pairs)}


def evaluate(cfg, n_random: int | None = None, probed=None, speed: bool | None = None,
             publish: bool = True) -> Evaluation:
    """Convert (or reuse the cache), run the parity gate and (with `speed`, default for `auto`) the timing;
    never raises for a model ONNX cannot serve.

    `probed` (child_load.ProbedLoad) gives the served shapes and outputs without loading the Net here: a
    verdict cached for the graph's exact bytes is then all it reads. A cached graph that fails the gate is
    converted again once (a stale or altered file must not demote the model for good); a fresh
    conversion that fails it is the verdict. `publish` False: the verdict is written to the local cache
    only (`verdict_file`), and the caller publishes it (serving/switch.py decides whether it should).
    """
    ev = _evaluate(cfg, n_random, probed, speed, cached_only=False, publish=publish)
    assert ev is not None
    return ev


def cached_evaluation(cfg, probed) -> Evaluation | None:
    """What is known without loading the Net, converting or gating (a verdict in the local or the shared
    cache, or onnxruntime missing), else None: the check must run (`auto` runs it beside serving)."""
    return _evaluate(cfg, None, probed, None, cached_only=True)


def _evaluate(cfg, n_random: int | None, probed, speed: bool | None, cached_only: bool,
              publish: bool = True) -> Evaluation | None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return Evaluation(f"onnxruntime is not installed ({e.name} is missing)")
    from ..backends.onnxruntime import providers
    from . import parity
    from .convert import CONVERTER_VERSION

    n_random = parity.N_RANDOM_INPUTS if n_random is None else n_random
    want_speed = cfg.backend == "auto" if speed is None else speed
    details: dict = {"converter_version": CONVERTER_VERSION}
    timings: dict = {}
    try:
        providers(cfg.device.kind, cfg.device.id)
    except ModelLoadError as e:
        return Evaluation(str(e), details)

    if probed is None:
        net = _load_net(cfg, timings)
        shapes, outputs = served.input_shapes(cfg, net), served.output_blobs(cfg, net)
    else:
        net, shapes, outputs = None, dict(probed.input_shapes), list(probed.outputs)
    t0 = time.perf_counter()
    key = onnx_cache.cache_key(cfg.path(cfg.model.prototxt), cfg.path(cfg.model.weights), shapes,
                               CONVERTER_VERSION, outputs)
    cache = onnx_cache.CachedGraph.find(cfg, key, *verdict_key(cfg, key, n_random))
    details["onnx_cache_key"] = cache.key[:16]
    timings["hash_s"] = _since(t0)
    known = known_evaluation(cache, want_speed, details, timings)
    if known is not None or cached_only:
        return known

    if net is None:
        net = _load_net(cfg, timings)
    gated = _gate_cached_or_fresh(net, cache, cfg, shapes, outputs, n_random, details, timings)
    if gated.report is None:  # no gate ran (no conversion, or the graph would not load): nothing to record
        return Evaluation(gated.problem, details, gated.artifact, "", timings)
    details.update(gated.report.details())
    found_speed = None
    if gated.problem is None and want_speed:
        t0 = time.perf_counter()
        with _pycaffe_on(cfg.device):
            found_speed = measure_speed(net, gated.session, shapes, outputs, parity.value_range(cfg.preprocessing))
        timings["speed_s"] = _since(t0)
    verdict_file = cache.record(publish, onnx_sha256=gated.sha, onnx_tensorrt=details.get("onnx_tensorrt", False),
                                speed=found_speed, parity={"passed": gated.problem is None, "problem": gated.problem,
                                                           "summary": gated.report.summary(),
                                                           "details": gated.report.details()})
    return Evaluation(gated.problem, details, str(cache.path), gated.report.summary(), timings, found_speed,
                      str(verdict_file))


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


def _load_net(cfg, timings: dict):
    """The Net reshaped to the served shapes: pycaffe must load it anyway; its errors are the model's errors."""
    from .convert import load_net

    t0 = time.perf_counter()
    net = load_net(cfg.path(cfg.model.prototxt), cfg.path(cfg.model.weights))
    served.reshape(net, served.input_shapes(cfg, net))
    timings["load_s"] = _since(t0)
    return net


def known_evaluation(cache: onnx_cache.CachedGraph, want_speed: bool, details: dict,
                     timings: dict) -> Evaluation | None:
    """What the verdict already says, or None where the gate (or the timing) must run."""
    verdict = cache.verdict
    if cache.found_in != "none":
        details["onnx_cache_found_in"] = cache.found_in
    if verdict is None:
        return None
    if verdict.get("conversion_problem"):
        details.update(onnx_cache_hit=False, verdict_cached=True)
        return Evaluation(verdict["conversion_problem"], details, None, "", timings)
    if cache.graph_sha is None:
        return None
    if cache.graph_sha != verdict.get("onnx_sha256"):
        details["onnx_cache_rejected"] = "the cached graph's bytes are not the ones that passed the gate"
        return None
    gate = verdict["parity"]
    if want_speed and gate["passed"] and not verdict.get("speed"):
        return None  # passed, but never timed
    details.update(gate["details"])
    details.update(onnx_cache_hit=True, verdict_cached=True, onnx_tensorrt=verdict.get("onnx_tensorrt", False))
    return Evaluation(gate["problem"], details, str(cache.path), gate["summary"], timings, verdict.get("speed"))


@dataclass
class Gated:
    """What the gate found about one graph file: `report` is None where no gate ran."""

    problem: str | None
    artifact: str | None = None  # the graph file judged; None where the conversion failed
    report: ParityReport | None = None
    session: Any = None  # the ONNX Runtime session the gate judged (the timing reuses it)
    sha: str | None = None  # the sha256 of the bytes judged


def _gate_cached_or_fresh(net, cache: onnx_cache.CachedGraph, cfg, shapes: dict, outputs: list[str], n_random: int,
                          details: dict, timings: dict) -> Gated:
    """Gate the cached graph where there is one; where it fails, or there is none, convert and gate once."""
    gated = Gated(None)
    for attempt in ("cached", "fresh") if cache.graph_sha is not None else ("fresh",):
        t0 = time.perf_counter()
        if attempt == "fresh":
            problem, final = _convert(net, cache.converting(), cfg, outputs)
            timings["convert_s"] = _since(t0)
            if problem is not None:
                if final:
                    cache.record(conversion_problem=problem)
                details["onnx_cache_hit"] = False
                return Gated(problem)
            t0 = time.perf_counter()
        sha = cache.graph_sha if attempt == "cached" else file_sha256(cache.path)
        report, problem, session = _gate(net, cache.path, cfg, shapes, outputs, n_random, details)
        timings["parity_s"] = _since(t0)
        details["onnx_cache_hit"] = attempt == "cached"
        gated = Gated(problem, str(cache.path), report, session, sha)
        if problem is None or attempt == "fresh":
            break
        log.warning("cached ONNX graph %s failed the parity gate (%s); converting again", cache.path, problem)
        details["onnx_cache_rejected"] = problem
    return gated


@contextmanager
def _pycaffe_on(device):
    """pycaffe on the configured GPU for the timing, and back in CPU mode after (workers set their own)."""
    if device.kind != "gpu":
        yield
        return
    from ..backends.pycaffe import set_device

    set_device(device.kind, device.id)
    try:
        yield
    finally:
        import caffe

        caffe.set_mode_cpu()


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        log.warning("%s=%r is not a number; using %g", name, raw, default)
        return default


def min_speedup() -> float:
    """How much faster ONNX Runtime must measure for `auto` to choose it (CAFFESERVE_AUTO_MIN_SPEEDUP)."""
    return _env_float(MIN_SPEEDUP_ENV, DEFAULT_MIN_SPEEDUP)


def min_saving_ms() -> float:
    """How many ms per forward ONNX Runtime must save for `auto` to choose it (CAFFESERVE_AUTO_MIN_SAVING_MS)."""
    return _env_float(MIN_SAVING_ENV, DEFAULT_MIN_SAVING_MS)


def _ms(ms: float) -> str:
    return f"{ms:.3g} ms"


def decide(cfg, ev: Evaluation) -> BackendChoice:
    """The backend `cfg` gets from what `evaluate` found, with the reason in words."""
    details = ev.details
    if ev.speed:
        details.update(speed_pycaffe_ms=ev.speed["pycaffe_ms"], speed_onnxruntime_ms=ev.speed["onnxruntime_ms"],
                       speedup=ev.speed["speedup"], speed_pairs=ev.speed["pairs"])
    if ev.problem is not None:
        if cfg.backend == "onnxruntime":
            raise ModelLoadError(f"backend onnxruntime cannot serve this model: {ev.problem}")
        return BackendChoice("pycaffe", f"auto: serving with pycaffe because {ev.problem}", details)
    if cfg.backend == "onnxruntime":
        reason = f"backend: onnxruntime: parity check passed, the converted graph matches pycaffe ({ev.summary})"
        return BackendChoice("onnxruntime", reason, details, ev.artifact)
    need, floor = min_speedup(), min_saving_ms()
    details.update(speed_min_speedup=need, speed_min_saving_ms=floor)
    sp = ev.speed or {}
    nan = float("nan")
    saving = sp.get("pycaffe_ms", nan) - sp.get("onnxruntime_ms", nan)
    figures = (f"forward {_ms(sp.get('onnxruntime_ms', nan))} vs pycaffe {_ms(sp.get('pycaffe_ms', nan))} "
               f"({sp.get('speedup', nan):.2f}×, {need:g}× and {floor:g} ms saved needed)")
    if sp.get("speedup", 0.0) >= need and saving >= floor:
        return BackendChoice("onnxruntime", f"auto: onnxruntime, parity check passed ({ev.summary}), {figures}",
                             details, ev.artifact)
    return BackendChoice("pycaffe", f"auto: serving with pycaffe because onnxruntime is not faster here: {figures}; "
                         f"its parity check passed ({ev.summary})", details)


def choose_accelerated(cfg, probed=None) -> BackendChoice:
    t0 = time.perf_counter()
    try:
        ev = evaluate(cfg, probed=probed)
    except ModelLoadError:
        raise  # pycaffe itself cannot load the model: no backend could serve it
    except Exception as e:  # anything unforeseen in the ONNX path must not cost `auto` its model
        if cfg.backend == "onnxruntime":
            raise
        log.exception("the onnxruntime check failed")
        ev = Evaluation(f"the onnxruntime check failed unexpectedly ({type(e).__name__}: {e})")
    return finish(cfg, ev, time.perf_counter() - t0)


def finish(cfg, ev: Evaluation, seconds: float) -> BackendChoice:
    """The choice from what the check found, its timings in the details."""
    ev.details["backend_decision_s"] = round(seconds, 3)
    ev.details.update({f"backend_{k}": v for k, v in ev.timings.items()})
    return decide(cfg, ev)


CHECK_RUNNING = ("auto: serving with pycaffe while the onnxruntime check (conversion, parity gate, timing) "
                 "runs beside it")


def choose_known_or_pending(cfg, probed) -> BackendChoice:
    """`auto` at load: the cached verdict's choice (local or shared cache), else pycaffe with `pending` set:
    the caller serves at once and runs the check beside serving (serving/switch.py)."""
    t0 = time.perf_counter()
    try:
        ev = cached_evaluation(cfg, probed)
    except ModelLoadError:
        raise
    except Exception:  # reading the cache must not cost `auto` its model: the check will say more
        log.exception("reading the onnxruntime verdict failed")
        ev = None
    if ev is None:
        return BackendChoice("pycaffe", CHECK_RUNNING, {"backend_check": "running"}, pending=True)
    return finish(cfg, ev, time.perf_counter() - t0)

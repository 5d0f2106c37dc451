"""Choosing the accelerated backend: convert (or reuse the cached graph), prove parity, decide.

`backend: onnxruntime` refuses to start (ModelLoadError) unless the converted graph passes the
parity gate; `backend: auto` serves with ONNX Runtime where it passes and with pycaffe otherwise.
Either way the BackendChoice says why, with the parity figures in `details`.

Converted graphs are cached on disk under CAFFESERVE_CACHE_DIR (default ~/.cache/caffe-serving/onnx),
keyed by the sha256 of the prototxt, the weights, the serving input shapes, the served output blobs and
the converter version, so a restart does not convert again. The parity gate runs at every load, cache
hit or not: it is what proves the file on disk (which anyone could have changed) gives pycaffe's
answers; a cached file that fails it is replaced by a fresh conversion, which is then the one judged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import served
from ..errors import ModelLoadError
from ..hashing import file_sha256
from . import BackendChoice

log = logging.getLogger("caffeserve.backends")

DEFAULT_CACHE_DIR = "~/.cache/caffe-serving/onnx"


@dataclass
class Evaluation:
    """What conversion + parity found: `problem` is None when ONNX Runtime may serve."""

    problem: str | None
    details: dict = field(default_factory=dict)
    artifact: str | None = None
    summary: str = ""
    timings: dict = field(default_factory=dict)


def cache_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("CAFFESERVE_CACHE_DIR") or DEFAULT_CACHE_DIR))


def cache_key(prototxt: Path, weights: Path, input_shapes: dict, converter_version: str,
              outputs: list[str] | None = None) -> str:
    h = hashlib.sha256()
    parts = [file_sha256(prototxt), file_sha256(weights), json.dumps(sorted(input_shapes.items())), converter_version]
    if outputs is not None:  # the served blobs are the graph's outputs
        parts.append(json.dumps(outputs))
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def _writable_cache_dir() -> Path:
    """The configured cache folder, or a temporary one where it cannot be written (read-only root filesystem)."""
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return d
    except OSError as e:
        fallback = Path(tempfile.gettempdir()) / "caffe-serving-onnx"
        log.warning("ONNX cache %s is not writable (%s); using %s", d, e.strerror, fallback)
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _save_atomically(onnx_model, path: Path) -> None:
    import onnx

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        onnx.save(onnx_model, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _parity_session_model(onnx_model, logits: list[dict]) -> bytes:
    """The served graph plus the softmax logits as extra outputs, serialized for a session."""
    from onnx import TensorProto, helper

    m = type(onnx_model)()
    m.CopyFrom(onnx_model)
    present = {o.name for o in m.graph.output}
    for entry in logits:
        if entry["value"] not in present:
            m.graph.output.append(helper.make_tensor_value_info(entry["value"], TensorProto.FLOAT, None))
    return m.SerializeToString()


def _convert(net, path: Path, cfg, outputs: list[str]):
    """Convert (returning the served `outputs`) and cache; returns (onnx model, None) or (None, the problem)."""
    from ..convert import UnsupportedLayer, convert_net

    try:
        onnx_model = convert_net(net, name=cfg.name, outputs=outputs)
    except UnsupportedLayer as e:
        return None, str(e)
    except ModelLoadError as e:
        return None, f"the conversion failed: {e}"
    except Exception as e:  # a converter bug must not take the server down: report it, let auto fall back
        log.exception("converting %s failed", cfg.model.prototxt)
        return None, f"the conversion failed ({type(e).__name__}: {e})"
    _save_atomically(onnx_model, path)
    return onnx_model, None


def _load_cached(path: Path):
    import onnx

    from ..convert import model_info

    try:
        onnx_model = onnx.load(str(path))
        model_info(onnx_model)
        return onnx_model
    except Exception as e:  # truncated, foreign or unreadable: convert again
        log.warning("cached ONNX graph %s is unusable (%s); converting again", path, e)
        return None


def _gate(net, onnx_model, cfg, shapes: dict, n_random: int | None, details: dict):
    """Run the parity gate on `onnx_model` with the serving session options; (report, problem).

    On a GPU with TensorRT installed, TensorRT is tried first (its default TF32 kernels may miss the
    bound); where it fails, the CUDA provider alone is judged. `details["onnx_tensorrt"]` says which.
    """
    from .. import parity
    from ..convert import model_info
    from .onnxruntime import make_session, tensorrt_available

    info = model_info(onnx_model)
    outputs = [name for name, _ in info["outputs"]]
    logits = [e for e in info["softmax_logits"] if e["blob"] not in outputs]
    pre = cfg.preprocessing
    mean_path = str(cfg.path(pre.mean_file)) if pre is not None and pre.mean_file else None
    inputs = parity.parity_inputs(shapes, pre, mean_path, cfg.limits.max_image_pixels,
                                  n_random=parity.N_RANDOM_INPUTS if n_random is None else n_random)
    serialized = _parity_session_model(onnx_model, logits)
    report, problem = None, None
    for tensorrt in ((True, False) if cfg.device.kind == "gpu" and tensorrt_available() else (False,)):
        try:
            session = make_session(serialized, cfg.device.kind, cfg.device.id, cfg.instances, tensorrt=tensorrt)
        except ModelLoadError as e:
            report, problem = None, str(e)
            continue
        report = parity.check_parity(net, session, outputs, logits, inputs, cfg.parity_tolerance)
        problem = None if report.passed else f"the parity check failed: {report.summary()}"
        details["onnx_tensorrt"] = tensorrt
        if problem is None:
            break
        if tensorrt:
            log.warning("with TensorRT, %s; trying the CUDA provider alone", problem)
    return report, problem


def evaluate(cfg, n_random: int | None = None) -> Evaluation:
    """Convert (or load from the cache) and run the parity gate; never raises for a model ONNX cannot serve.

    A cached graph that fails the gate is converted again once (a stale or altered file must not
    demote the model for good); a fresh conversion that fails it is the verdict.
    """
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return Evaluation(f"onnxruntime is not installed ({e.name} is missing)")
    from ..convert import CONVERTER_VERSION, load_net
    from .onnxruntime import providers

    details: dict = {"converter_version": CONVERTER_VERSION}
    timings: dict = {}
    try:
        providers(cfg.device.kind, cfg.device.id)
    except ModelLoadError as e:
        return Evaluation(str(e), details)

    prototxt, weights = cfg.path(cfg.model.prototxt), cfg.path(cfg.model.weights)
    t0 = time.perf_counter()
    net = load_net(prototxt, weights)  # pycaffe must load it anyway; its errors are the model's errors
    shapes = served.input_shapes(cfg, net)
    served.reshape(net, shapes)
    outputs = served.output_blobs(cfg, net)
    timings["load_s"] = time.perf_counter() - t0

    key = cache_key(prototxt, weights, shapes, CONVERTER_VERSION, outputs)
    path = _writable_cache_dir() / f"{key}.onnx"
    details["onnx_cache_key"] = key[:16]
    onnx_model = _load_cached(path) if path.exists() else None
    details["onnx_cache_hit"] = onnx_model is not None
    for attempt in ("cached", "fresh") if onnx_model is not None else ("fresh",):
        t0 = time.perf_counter()
        if attempt == "fresh":
            onnx_model, problem = _convert(net, path, cfg, outputs)
            timings["convert_s"] = time.perf_counter() - t0
            if onnx_model is None:
                return Evaluation(problem, details, None, "", timings)
            t0 = time.perf_counter()
        report, problem = _gate(net, onnx_model, cfg, shapes, n_random, details)
        timings["parity_s"] = time.perf_counter() - t0
        if problem is None or attempt == "fresh":
            break
        log.warning("cached ONNX graph %s failed the parity gate (%s); converting again", path, problem)
        details["onnx_cache_hit"] = False
        details["onnx_cache_rejected"] = problem
    if report is not None:
        details.update(report.details())
    return Evaluation(problem, details, str(path), report.summary() if report else "", timings)


def choose_accelerated(cfg) -> BackendChoice:
    t0 = time.perf_counter()
    try:
        ev = evaluate(cfg)
    except ModelLoadError:
        raise  # pycaffe itself cannot load the model: no backend could serve it
    except Exception as e:  # anything unforeseen in the ONNX path must not cost `auto` its model
        if cfg.backend == "onnxruntime":
            raise
        log.exception("the onnxruntime check failed")
        ev = Evaluation(f"the onnxruntime check failed unexpectedly ({type(e).__name__}: {e})")
    ev.details["backend_decision_s"] = round(time.perf_counter() - t0, 3)
    if ev.problem is None:
        prefix = "auto" if cfg.backend == "auto" else "backend: onnxruntime"
        reason = f"{prefix}: parity check passed, the converted graph matches pycaffe ({ev.summary})"
        return BackendChoice("onnxruntime", reason, ev.details, ev.artifact)
    if cfg.backend == "onnxruntime":
        raise ModelLoadError(f"backend onnxruntime cannot serve this model: {ev.problem}")
    return BackendChoice("pycaffe", f"auto: serving with pycaffe because {ev.problem}", ev.details)

"""Backends: one small interface (load, describe, infer on numpy arrays); pycaffe first.

`choose_backend` runs once at startup (it may convert and check parity, or with `auto` leave that to a
check beside serving); `create_backend` runs in
each worker thread, because a backend instance belongs to the thread that made it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ServerConfig
from ..errors import ModelLoadError
from .base import Backend


@dataclass
class BackendChoice:
    name: str  # the backend that serves: "pycaffe" or "onnxruntime"
    reason: str  # why, in words (shown in metadata, logs, metrics, CR status)
    details: dict[str, object] = field(default_factory=dict)  # e.g. parity figures
    artifact: str | None = None  # e.g. the converted ONNX file
    pending: bool = False  # `auto` serving with pycaffe while the onnxruntime check runs beside it


def choose_backend(cfg: ServerConfig, probed=None, defer: bool = False) -> BackendChoice:
    """`probed`: the child load's findings (child_load.ProbedLoad), which let a cached verdict skip loading the Net.
    `defer` (with `auto`): where no verdict is cached, pycaffe at once, `pending` (the check runs beside serving)."""
    if cfg.backend == "pycaffe":
        return BackendChoice("pycaffe", "backend: pycaffe in the config")
    try:
        from ..loading.selection import choose_accelerated, choose_known_or_pending
    except ImportError:
        raise ModelLoadError(f"backend {cfg.backend!r} is not available in this build") from None
    if defer and cfg.backend == "auto":
        return choose_known_or_pending(cfg, probed)
    return choose_accelerated(cfg, probed)


def create_backend(cfg: ServerConfig, choice: BackendChoice) -> Backend:
    if choice.name == "pycaffe":
        from .pycaffe import PycaffeBackend

        return PycaffeBackend(
            str(cfg.path(cfg.model.prototxt)), str(cfg.path(cfg.model.weights)), cfg.device.kind, cfg.device.id, cfg
        )
    from .onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(cfg, choice)

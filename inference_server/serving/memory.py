"""What each model costs in memory, and the budget a server loads models within.

A model's memory is measured, not guessed: the process's resident set (RSS, from /proc) before and after
its load, and on a GPU the device's free memory before and after (cudaMemGetInfo, through the CUDA build).
Loads run one at a time (the repository's lock), so the difference is that model's own.

Before a load only an estimate exists, from the caffemodel's size and the instances (`estimate_bytes`;
bench/pool.py prints the ratio of real growth to weights size it is based on). A load whose estimate would
pass the budget is refused before anything is read (507 / RESOURCE_EXHAUSTED); one whose real growth passes
it is unloaded again and refused the same way. The kernel's out-of-memory killer never gets to choose.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from ..errors import InferenceError

# Host RSS growth of a loaded model over its caffemodel's size, per instance: bench/pool.py measures 2.7-3.4x
# for dense nets of 1-5 MB on pycaffe (the weights, plus what OpenBLAS's per-thread buffers hold of them after
# the load's probe forwards; 4.7x for 60 kB nets) and 1.03x for 64 MiB of weights: the extra is bounded. So the
# estimate is min(size x ESTIMATE_FACTOR, size + ESTIMATE_EXTRA_MAX), at least ESTIMATE_FLOOR.
ESTIMATE_FACTOR = 3.5
ESTIMATE_EXTRA_MAX = 64 * 2**20
# and a floor: a tiny net still costs Caffe's per-Net bookkeeping and the layers' buffers
ESTIMATE_FLOOR = 4 * 2**20
# GPU budget when none is given: the device's free memory at start less this (cuBLAS/cuDNN workspaces,
# CUDA context growth, the forward passes' own buffers)
DEFAULT_GPU_RESERVE = 1024 * 2**20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class InsufficientMemory(InferenceError):
    """A load that does not fit in the server's memory budget: 507 Insufficient Storage (gRPC
    RESOURCE_EXHAUSTED); nothing was loaded, the models already loaded keep serving."""

    status_code = 507


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def release_freed_memory() -> None:
    """Hand memory glibc keeps after a free back to the kernel (malloc_trim), so an unload shows in RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _gpu_info(device_id: int) -> tuple[int, int] | None:
    """(free, total) bytes of GPU `device_id`, or None without a CUDA runtime or GPU (ctypes only: no Caffe
    call, so it is safe in a CPU-only build)."""
    from ..backends.pycaffe import _cudart

    cudart = _cudart()
    if cudart is None or cudart.cudaSetDevice(ctypes.c_int(device_id)) != 0:
        return None
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    if cudart.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
        return None
    return free.value, total.value


def gpu_used_bytes(device_id: int) -> int | None:
    """Memory in use on GPU `device_id` (by every process), or None where it cannot be read."""
    info = _gpu_info(device_id)
    return None if info is None else info[1] - info[0]


def gpu_free_bytes(device_id: int) -> int | None:
    info = _gpu_info(device_id)
    return None if info is None else info[0]


_warmed: set[str] = set()


def warm_imports(backend: str) -> None:
    """Import the libraries a load of `backend` uses (pycaffe; ONNX Runtime unless the backend is pycaffe)
    before the model's memory is measured: their code and data count as the server's, not as that model's."""
    wanted = ["caffe"] + ([] if backend == "pycaffe" else ["onnxruntime"])
    for module in wanted:
        if module in _warmed:
            continue
        _warmed.add(module)
        try:
            __import__(module)
        except ImportError:  # ONNX Runtime is an extra: `auto` serves with pycaffe without it
            pass


def estimate_bytes(weights_path: str, instances: int) -> int:
    """A model's host memory before it is loaded, from its weights file's size (per instance; see ESTIMATE_*)."""
    try:
        size = os.path.getsize(weights_path)
    except OSError:
        size = 0
    return max(ESTIMATE_FLOOR, min(int(size * ESTIMATE_FACTOR), size + ESTIMATE_EXTRA_MAX)) * instances


@dataclass
class ModelMemory:
    """What one loaded model holds: host bytes (RSS growth at its load) and GPU bytes (None off the GPU)."""

    host_bytes: int = 0
    gpu_bytes: int | None = None
    estimate_bytes: int = 0

    def parameters(self) -> dict[str, int]:
        """For the model metadata's `parameters`."""
        out = {"memory_bytes": self.host_bytes, "memory_estimate_bytes": self.estimate_bytes}
        if self.gpu_bytes is not None:
            out["gpu_memory_bytes"] = self.gpu_bytes
        return out

    def usage(self, device_id: int) -> list[dict]:
        """Triton's ModelStatistics `memory_usage` entries."""
        out = [{"type": "CPU", "id": 0, "byte_size": self.host_bytes}]
        if self.gpu_bytes is not None:
            out.append({"type": "GPU", "id": device_id, "byte_size": self.gpu_bytes})
        return out


class MemoryBudget:
    """The bytes models may hold in this server, host and GPU; None: no limit of that kind.

    `host` comes from `--memory-bytes`; `gpu` from `--gpu-memory-bytes`,
    else the GPU's free memory at start less a reserve, once a GPU model is loaded.
    """

    def __init__(self, host: int | None = None, gpu: int | None = None, gpu_reserve: int = DEFAULT_GPU_RESERVE):
        self.host, self.gpu, self.gpu_reserve = host, gpu, gpu_reserve

    def gpu_limit(self, device_id: int) -> int | None:
        if self.gpu is None:
            free = gpu_free_bytes(device_id)
            if free is not None:
                self.gpu = max(0, free - self.gpu_reserve)
        return self.gpu

    def check(self, name: str, host_used: int, host_more: int, gpu_used: int = 0, gpu_more: int = 0,
              device_id: int | None = None, measured: bool = False) -> None:
        """Raise InsufficientMemory when `more` on top of `used` passes the budget (host or GPU)."""
        what = "measured" if measured else "estimated"
        if self.host is not None and host_used + host_more > self.host:
            raise InsufficientMemory(
                f"model '{name}' does not fit in this server's memory budget: it needs {_mib(host_more)} ({what}), "
                f"loaded models hold {_mib(host_used)} of {_mib(self.host)} (--memory-bytes); unload a model or "
                "load it on another server")
        limit = self.gpu_limit(device_id) if device_id is not None else None
        if limit is not None and gpu_used + gpu_more > limit:
            raise InsufficientMemory(
                f"model '{name}' does not fit in GPU {device_id}'s memory budget: it needs {_mib(gpu_more)} ({what}), "
                f"loaded models hold {_mib(gpu_used)} of {_mib(limit)}; unload a model or load it on another server")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"

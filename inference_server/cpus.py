"""How many CPUs the server may use, and how the BLAS threads are shared among Net instances."""

from __future__ import annotations

import math
import os

BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a pod's limit)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def share_blas_threads(instances: int, environ=os.environ) -> int:
    """Give each Net instance an equal share of the CPUs for OpenBLAS, unless the user set it.

    Must run before pycaffe loads OpenBLAS (it reads the variable once). Without it, every forward
    fans out over all cores and `instances: 2` makes two Nets fight over them: measured here,
    two threads each owning a Net ran at 0.3x the speed of one.
    """
    threads = max(1, available_cpus() // max(1, instances))
    for var in BLAS_THREAD_VARS:
        environ.setdefault(var, str(threads))
    return int(environ["OPENBLAS_NUM_THREADS"])

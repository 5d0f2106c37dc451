"""The GPU bundle's rehearsal: scripts/gpu_check.sh on this machine (no GPU), as `make gpu-rehearsal`.

The bundle (`make gpu-bundle`) unpacks into a scratch folder and runs in a Python 3.12 venv like the
lent GPU machine's, with only the bundle's libraries and wheels: pycaffe for 3.12 loads, its CPU mode
gives the CPU build's answers on digits, the server answers digits on the CPU and refuses
`device: gpu` with its message, and every GPU step says SKIP. Skipped where there is no bundle.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from caffe_testing import REPO

BUNDLE = REPO / ".gpu-bundle" / "caffe-gpu-bundle.tar.xz"
PY312 = REPO / ".caffe-cuda" / "py312-venv" / "bin" / "python"

pytestmark = pytest.mark.skipif(not (BUNDLE.exists() and PY312.exists()), reason="no GPU bundle: run `make gpu-bundle`")


def test_rehearsal_runs_the_cpu_parts_and_skips_the_gpu_steps(tmp_path):
    env = {**os.environ, "PYTHON": str(PY312), "OUT": str(tmp_path / "out"), "SCRATCH": str(tmp_path / "scratch"),
           "CUDA_LIB_DIRS": str((REPO / ".caffe-cuda" / "cuda" / "lib").resolve()), "GPU_CHECK_KEEP_LIBS": "1"}
    for var in ("PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV"):
        env.pop(var, None)
    (tmp_path / "scratch").mkdir()
    run = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(BUNDLE.parent)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert results["gpu"] is False and results["python"].startswith("3.12")
    assert results["caffe"].startswith(str(tmp_path / "scratch")), results["caffe"]  # the bundle's pycaffe
    steps = results["steps"]
    assert steps["parity.digits"]["cpu_mode_vs_cpu_build_rel"] <= 1e-5
    for net in ("inception", "residual"):
        assert steps[f"parity.{net}"]["largest_logit"] > 0
    assert steps["serve.cpu"]["status"] == 200
    assert steps["serve.gpu"]["ready_status"] == 503 and steps["serve.gpu"]["live_status"] == 200
    assert "no CUDA GPU is visible" in steps["serve.gpu"]["message"]
    for step in ("throughput", "instances", "oom"):
        assert steps[step]["skipped"] is True
    assert "SKIP (no GPU visible" in run.stdout
    assert results["failed"] == []

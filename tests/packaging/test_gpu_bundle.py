"""The GPU check's rehearsals: scripts/gpu/gpu_check.sh on this machine (no GPU), as on the lent one.

The bundle (`make gpu-bundle`) unpacks into a scratch folder and runs in a Python 3.12 venv like the lent
GPU machine's, with only the bundle's wheels and, as there, the machine's own copies of the libraries it
has (GPU_CHECK_KEEP_LIBS=0). Then: the plain rehearsal passes (the CPU parts, the GPU parts SKIP or
rehearsed on the CPU); faults (a server whose model fails to load, a step that aborts as Caffe does,
SIGTERM mid-run, a GPU that nvidia-smi lists and CUDA cannot use) each end as a failure with the JSON and
logs kept, the summary printed last, and no process left behind. Skipped where there is no bundle (CI
builds none: `make cuda-build gpu-bundle` takes 10-40 minutes); scripts/gpu/gpu-rehearsal.json and
tests/packaging/test_gpu_wheels.py keep that rehearsal from going stale.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from caffe_testing import REPO

BUNDLE = REPO / ".gpu-bundle" / "caffe-gpu-bundle.tar.xz"
PY312 = REPO / ".caffe-cuda" / "py312-venv" / "bin" / "python"

pytestmark = [pytest.mark.skipif(not (BUNDLE.exists() and PY312.exists()),
                                 reason="no GPU bundle here: run `make cuda-build gpu-bundle` (10-40 minutes)"),
              pytest.mark.slow, pytest.mark.timeout(900)]


def environment(tmp_path: Path, **more) -> dict:
    env = {**os.environ, "PYTHON": str(PY312), "OUT": str(tmp_path / "out"), "SCRATCH": str(tmp_path / "scratch"),
           "CUDA_LIB_DIRS": str((REPO / ".caffe-cuda" / "cuda" / "lib").resolve()), "GPU_CHECK_KEEP_LIBS": "0",
           "GPU_CHECK_BUDGET_S": "600", **more}
    for var in ("PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV"):
        env.pop(var, None)
    (tmp_path / "scratch").mkdir(exist_ok=True)
    return env


def rehearse(tmp_path: Path, **more) -> tuple[subprocess.CompletedProcess, dict]:
    run = subprocess.run(["bash", str(REPO / "scripts" / "gpu" / "gpu_check.sh"), str(BUNDLE.parent)],
                         env=environment(tmp_path, **more), cwd=REPO, capture_output=True, text=True, timeout=800)
    return run, json.loads((tmp_path / "out" / "gpu_check.json").read_text())


def leftovers(tmp_path: Path) -> list[str]:
    """Processes still running whose command line names this test's folders (steps, servers)."""
    left = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(str(tmp_path) in a for a in p.info["cmdline"] or []):
            left.append(f"{p.info['pid']}: {' '.join(p.info['cmdline'])[:200]}")
    return left


def summary_is_last(stdout: str) -> list[str]:
    lines = [line for line in stdout.splitlines() if line.startswith("[gpu_check]")]
    start = max(i for i, line in enumerate(lines) if "===== summary" in line)
    assert lines[-2].startswith("[gpu_check] failed:"), lines[-3:]
    assert lines[-1].startswith("[gpu_check] finished in"), lines[-1]
    return lines[start:]


def test_rehearsal_passes_with_the_machines_own_libraries(tmp_path):
    run, results = rehearse(tmp_path)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert "carried libraries in use: libboost" in run.stdout  # pruned: only Caffe's own dependencies stay
    assert results["gpu"] is False and results["probe"]["python"].startswith("3.12")
    assert results["probe"]["caffe"].startswith(str(tmp_path / "scratch")), results["probe"]  # the bundle's pycaffe
    steps = results["steps"]
    assert steps["parity.digits"]["cpu_mode_vs_cpu_build_rel"] <= 1e-5
    assert steps["serve.cpu"]["status"] == "cpu" and steps["serve.cpu"]["grpc_vs_rest"] <= 1e-6
    assert steps["serve.gpu"]["ready_status"] == 503 and "no CUDA GPU is visible" in steps["serve.gpu"]["message"]
    for step in ("throughput.pycaffe", "throughput.server"):
        assert steps[step]["rehearsed"] and [c["batch"] for c in steps[step]["curve"]] == [1, 2, 4, 8]
    for n in (1, 2):
        run_n = steps["instances"][f"instances_{n}"]
        assert run_n["sent"] > 0 and run_n["ok"] == run_n["sent"] and not run_n["errors"], run_n
    assert steps["oom"]["status"] == "skip"
    assert results["failed"] == [] and results["stopped"] is None
    summary = summary_is_last(run.stdout)
    assert any("SKIP" in line and "oom" in line for line in summary)
    assert (tmp_path / "out" / "steps.log").stat().st_size > 0 and (tmp_path / "out" / "servers.log").stat().st_size > 0
    assert leftovers(tmp_path) == []


def test_a_model_that_fails_to_load_and_a_step_that_aborts_cost_their_steps_only(tmp_path):
    # every server's model fails its sha256 check while loading: the process is live, never ready
    run, results = rehearse(tmp_path, CAFFESERVE__MODEL__WEIGHTS_SHA256="ab" * 32, GPU_CHECK_FAULT="parity:abort")
    assert run.returncode == 1, run.stdout[-5000:]
    steps = results["steps"]
    assert "SIGABRT" in steps["parity"]["summary"]  # Caffe's way of failing, in a child: the check goes on
    for step in ("serve", "throughput.server", "instances"):
        assert steps[step]["status"] == "failed" and "failed to load" in steps[step]["summary"], steps[step]
    assert steps["throughput.pycaffe"]["status"] == "cpu"  # no server in it: unharmed
    assert set(results["failed"]) == {"parity", "serve", "throughput.server", "instances"}
    assert "ababab" in (tmp_path / "out" / "servers.log").read_text()  # the servers' own words are kept
    summary_is_last(run.stdout)
    assert leftovers(tmp_path) == []


def test_sigterm_mid_run_stops_the_step_keeps_the_figures_and_leaves_no_process(tmp_path):
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "gpu" / "gpu_check.sh"), str(BUNDLE.parent)],
                            env=environment(tmp_path), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not list((tmp_path / "scratch").glob("gpu-check-*/digits-*.log")):  # the serve step's first server
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)  # as `timeout` or a stopped device call sends it
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, out[-3000:]
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert results["stopped"] == "SIGTERM during serve"
    assert results["steps"]["parity.digits"]["status"] == "cpu"  # what was measured before is kept
    assert "stopped by SIGTERM" in results["steps"]["serve"]["summary"]
    summary_is_last(out)
    assert leftovers(tmp_path) == []


def test_a_gpu_that_nvidia_smi_lists_and_cuda_cannot_use_is_a_failure(tmp_path):
    # A stand-in nvidia-smi (no GPU here, so no real one can answer) listing the lent H100 as the real one
    # prints it: the build then finds no CUDA device, which must fail the check, not pass it with SKIPs.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\ncase \"$*\" in\n  -L) echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)' ;;\n"
                   "  *query-gpu=index*) echo '0, NVIDIA H100 80GB HBM3, 81559, 580.159.04' ;;\n"
                   "  *query-gpu=memory.used*) echo '0, 81559' ;;\n  *) ;;\nesac\n")
    smi.chmod(0o755)
    run, results = rehearse(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert run.returncode == 1, run.stdout[-4000:]
    assert results["steps"]["gpu"]["status"] == "failed"
    assert "nvidia-smi lists NVIDIA H100 80GB HBM3 but this build cannot use it" in results["steps"]["gpu"]["summary"]
    for step in ("throughput.pycaffe", "instances", "oom"):
        assert results["steps"][step]["status"] == "skip"
    assert results["steps"]["serve.cpu"]["status"] == "cpu"  # the CPU parts still say what works
    assert results["failed"] == ["gpu"]
    summary_is_last(run.stdout)
    assert leftovers(tmp_path) == []

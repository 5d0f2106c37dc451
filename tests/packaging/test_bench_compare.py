"""bench/compare.py: a server is measured only after it answers like a direct forward; the run writes its report.

The peers' tests need the venvs bench/setup_peers.sh makes (KServe and MLServer from PyPI); they are
skipped where those venvs are missing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from caffe_testing import REPO

sys.path.insert(0, str(REPO / "bench"))

import compare  # noqa: E402
from peers.servers import BENCH_VENVS, SERVERS  # noqa: E402

ENV = {"OPENBLAS_NUM_THREADS": "1", "GLOG_minloglevel": "2"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    model = next(m for m in compare.prepare_models(tmp_path_factory.mktemp("models")) if m.name == "digits")
    name, x = compare.input_of(model)
    reference, _ = compare.reference_forward(model, name, x, seconds=0.05)
    return model, name, x, reference


def peers_installed(label: str) -> bool:
    return label == compare.OURS or (BENCH_VENVS / label / "bin" / "python").exists()


@pytest.mark.parametrize("label", list(SERVERS))
def test_each_server_answers_like_a_direct_forward_and_a_wrong_reference_is_caught(label, digits):
    if not peers_installed(label):
        pytest.skip(f"no {label} venv: run bench/setup_peers.sh")
    model, name, x, reference = digits
    with SERVERS[label](model, ENV) as server:
        assert compare.check_answer(server, compare.json_body(name, x), compare.JSON_HEADERS, reference) is None
        off = {k: v + 1e-3 for k, v in reference.items()}
        wrong = compare.check_answer(server, compare.json_body(name, x), compare.JSON_HEADERS, off)
        assert wrong is not None and "output 'prob' differs from a direct forward" in wrong


def test_our_binary_request_gets_the_same_answer(digits):
    model, name, x, reference = digits
    body, headers = compare.binary_body(name, x)
    with SERVERS[compare.OURS](model, ENV) as server:
        assert compare.check_answer(server, body, headers, reference) is None


def test_best_of_rounds_keeps_each_points_fastest_round_and_any_error():
    rows = [
        {"server": "kserve", "model": "digits", "concurrency": 1, "rps": 100.0, "p50_ms": 9.0, "round": 1},
        {"server": "kserve", "model": "digits", "concurrency": 1, "rps": 150.0, "p50_ms": 6.0, "round": 2},
        {"server": "mlserver", "model": "digits", "concurrency": 1, "rps": 120.0, "p50_ms": 7.0, "round": 1},
        {"server": "mlserver", "model": "digits", "error": "wrong answer: ...", "round": 2},
    ]
    best = compare.best_of_rounds(rows)
    assert [(r["server"], r.get("rps"), r.get("round")) for r in best] == [("kserve", 150.0, 2), ("mlserver", None, 2)]


def test_a_run_prints_the_table_and_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "compare.json", tmp_path / "compare.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench/compare.py"), "--servers", "caffe-serving", "--models", "digits",
         "--seconds", "1", "--rounds", "1", "--concurrency", "1", "--auto-backend-models",
         "--out", str(out), "--plot", str(png)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "answer matches a direct forward" in proc.stdout
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["server"] == "caffe-serving" and row["concurrency"] == 1 and row["rps"] > 0
    assert row["backend"] == "pycaffe"  # like for like: the same pycaffe Net the peers run
    assert row["non2xx"] == 0 and row["socket_errors"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

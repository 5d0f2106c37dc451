"""Triton's statistics and the Prometheus histograms take a request's figures as one appended record and add
them up when read: what is read must be every record, whatever threads append while another reads."""

from __future__ import annotations

import threading

from inference_server.serving import metrics as metrics_module, stats as stats_module
from inference_server.serving.metrics import LATENCY_BUCKETS, FastHistogram
from inference_server.serving.stats import ModelStats

THREADS, EACH = 4, 5000


def hammer(target, read) -> list[object]:
    """`target(i)` EACH times in each of THREADS threads while this thread keeps reading."""
    seen: list[object] = []
    go = threading.Barrier(THREADS + 1)

    def work() -> None:
        go.wait()
        for i in range(EACH):
            target(i)

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    go.wait()
    while any(t.is_alive() for t in threads):
        seen.append(read())
    for t in threads:
        t.join()
    return seen


def test_statistics_read_while_threads_count_lose_nothing(monkeypatch):
    monkeypatch.setattr(stats_module, "FOLD_AT", 100)  # folds on the request's path too, not only when read
    s = ModelStats()

    def one(i: int) -> None:
        s.execution(1 + i % 2, 10)
        s.success(100, 1, 2, 10, 3, 1 + i % 2, 1 + i % 2)

    seen = hammer(one, lambda: s.as_json("m", "1")["execution_count"])
    assert seen == sorted(seen), "a read went back"
    got = s.as_json("m", "1")
    n = THREADS * EACH
    assert got["execution_count"] == n and got["inference_count"] == n * 3 // 2
    assert got["inference_stats"]["success"] == {"count": n, "ns": 100 * n}
    assert got["inference_stats"]["compute_output"] == {"count": n, "ns": 3 * n}
    by_size = {b["batch_size"]: b for b in got["batch_stats"]}
    assert by_size[1]["compute_infer"] == {"count": n // 2, "ns": 10 * n // 2}
    assert by_size[2]["compute_input"] == {"count": n // 2, "ns": 2 * n // 2}
    assert s.inference_count == n * 3 // 2 and got["last_inference"] > 0


def test_a_histogram_read_while_threads_observe_puts_every_value_in_its_bucket(monkeypatch):
    monkeypatch.setattr(metrics_module, "FOLD_AT", 100)
    h = FastHistogram(LATENCY_BUCKETS)
    hammer(lambda i: h.observe(0.0004 if i % 2 else 0.003), lambda: sum(h.counts))
    n = THREADS * EACH
    assert h.counts[0] == n // 2 and h.counts[LATENCY_BUCKETS.index(0.005)] == n // 2 and sum(h.counts) == n
    assert abs(h.sum - (0.0004 + 0.003) * n / 2) < 1e-9
    assert h.cumulative()[-1] == ("+Inf", n)

"""`batching: auto`: decide by measurement whether stacking requests raises throughput.

At load, the first worker times forward passes at batch sizes 1, 2, 4, … up to `max_batch_size`
on its own Net, and batching is turned on only where items per second grow by at least `min_gain`
while the forward time plus the queue delay stays within `latency_budget_ms`. The curve and the
decision are reported in the model's metadata and metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..config import Batching
from ..errors import GpuOutOfMemory


@dataclass
class BatchingDecision:
    enabled: bool
    max_batch_size: int
    reason: str
    curve: list[dict] = field(default_factory=list)  # [{batch, forward_ms, items_per_s}]


def batch_sizes(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def measure_curve(backend, inputs: dict[str, tuple[int, ...]], outputs: list[str], max_batch: int,
                  budget_s: float = 0.5) -> list[dict]:
    """Median forward time per batch size; each size gets about `budget_s` of timing (at least 3 runs)."""
    rng = np.random.default_rng(0)
    curve = []
    for b in batch_sizes(max_batch):
        feed = {n: rng.random((b, *shape), dtype=np.float32) for n, shape in inputs.items()}
        try:
            backend.infer(feed, outputs)  # warm-up (allocations, reshape)
        except GpuOutOfMemory:  # this batch does not fit on the GPU: neither will larger ones
            break
        times: list[float] = []
        spent = 0.0
        while len(times) < 3 or (spent < budget_s and len(times) < 50):
            t = time.perf_counter()
            backend.infer(feed, outputs)
            dt = time.perf_counter() - t
            times.append(dt)
            spent += dt
        ms = float(np.median(times)) * 1000
        curve.append({"batch": b, "forward_ms": round(ms, 4), "items_per_s": round(b / (ms / 1000), 1)})
    return curve


def decide(curve: list[dict], spec: Batching) -> BatchingDecision:
    base = curve[0]["items_per_s"]
    allowed = [p for p in curve if p["forward_ms"] + spec.max_queue_delay_ms <= spec.latency_budget_ms]
    best = max(allowed, key=lambda p: p["items_per_s"]) if allowed else curve[0]
    gain = best["items_per_s"] / base
    if best["batch"] > 1 and gain >= spec.min_gain:
        return BatchingDecision(True, best["batch"], f"batch {best['batch']} gives {gain:.2f}x the items/s of batch 1 "
                                f"at {best['forward_ms']:.2f} ms per forward", curve)
    return BatchingDecision(
        False,
        1,
        f"no batch size within the {spec.latency_budget_ms:g} ms budget raises items/s by "
        f"{spec.min_gain:g}x (best: batch {best['batch']}, {gain:.2f}x)",
        curve,
    )

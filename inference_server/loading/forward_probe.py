"""What a net's forward pass really does with its shapes, found out at load by running it.

Two facts the prototxt does not tell, and both decide what clients may rely on:

- Output dimensions the data decides (SSD's DetectionOutput returns [1, 1, detections, 7]; Caffe's
  reshape-time guess is [1, 1, 1, 7]). A dimension is fixed only where the reshape-time shape and every
  probe forward agree on it; elsewhere it is reported as -1, as Triton reports variable dimensions.
- Batch separability: dynamic batching stacks requests on axis 0 and splits every output back along
  axis 0, which is right only when each output's axis 0 follows the input batch and item i of a
  stacked forward equals item i's own forward. DetectionOutput (all images' boxes in one [1, 1, N, 7]
  blob), a Reshape that folds the batch, or BatchNorm on batch statistics break it; serving such a net
  batched would hand one client another's result.

The probe runs two single-item forwards and their batch of two on the backend that serves (pycaffe
or ONNX Runtime), and compares item by item with the parity gate's bound. Where the server would
never run a batch (batching off and requests limited to one item) the batch of two is skipped: a net
with a batch size baked into a Reshape aborts the process in Caffe rather than raise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEED = 20240619


@dataclass
class NetProbe:
    shapes: dict[str, tuple[int, ...]]  # per served output: axis 0 and every data-dependent axis are -1
    separable: bool | None  # None: not checked
    reason: str  # why the net can or cannot be batched, naming the output that decides


def metadata_shape(declared: tuple[int, ...], *seen: tuple[int, ...]) -> tuple[int, ...]:
    """The shape to report: -1 on axis 0 and wherever the shapes seen disagree with the declared one."""
    dims = [-1]
    for axis in range(1, len(declared)):
        sizes = {declared[axis]} | {s[axis] if len(s) == len(declared) else -1 for s in seen}
        dims.append(declared[axis] if len(sizes) == 1 else -1)
    return tuple(dims) if declared else ()


def _max_diff(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max |got − ref|, max |ref|) over finite values; inf when NaN/inf positions differ."""
    if not np.array_equal(np.isnan(ref), np.isnan(got)) or not np.array_equal(np.isinf(ref), np.isinf(got)):
        return float("inf"), 0.0
    finite = np.isfinite(ref)
    if not finite.any():
        return (0.0 if np.array_equal(ref, got) else float("inf")), 0.0
    return (float(np.abs(ref[finite].astype(np.float64) - got[finite]).max()), float(np.abs(ref[finite]).max()))


def separability(outputs: list[str], singles: list[dict[str, np.ndarray]], stacked: dict[str, np.ndarray],
                 tolerance: float) -> tuple[bool, str]:
    """Whether `stacked` (the forward of the items of `singles` stacked on axis 0) splits into `singles`."""
    n = len(singles)
    for name in outputs:
        got = stacked[name]
        rows = [s[name].shape[0] if s[name].ndim else None for s in singles]
        if got.ndim == 0 or rows != [1] * n or got.shape[0] != n:
            return False, (f"output '{name}' does not keep the batch on axis 0: one item gives shape "
                           f"{list(singles[0][name].shape)}, a batch of {n} gives {list(got.shape)}")
        for i, single in enumerate(singles):
            ref = single[name]
            part = got[i:i + 1]
            if part.shape != ref.shape:
                return False, (f"output '{name}': item {i} of a batch of {n} has shape {list(part.shape)}, "
                               f"its own forward {list(ref.shape)}")
            diff, ref_max = _max_diff(ref, part)
            limit = tolerance * max(1.0, ref_max)
            if diff > limit:
                return False, (f"output '{name}': item {i} of a batch of {n} differs from its own forward "
                               f"(max |Δ| {diff:.3g} > {limit:.3g}): the net mixes the items of a batch")
    return True, f"every output keeps the batch on axis 0 and a batch of {n} equals its items' own forwards"


def probe_inputs(item_shapes: dict[str, tuple[int, ...]], value_range: tuple[float, float] = (-1.0, 1.0),
                 n: int = 2, seed: int = SEED) -> list[dict[str, np.ndarray]]:
    """`n` seeded single-item inputs (batch 1) in the range the preprocessing produces."""
    rng = np.random.default_rng(seed)
    lo, hi = value_range
    return [{name: rng.uniform(lo, hi, (1, *shape)).astype(np.float32) for name, shape in item_shapes.items()}
            for _ in range(n)]


def runs_batches(cfg) -> bool:
    """Whether the server configured by `cfg` would ever run a forward of more than one item."""
    return cfg.batching.enabled is not False or cfg.limits.max_batch > 1


def probe(backend, declared: dict[str, tuple[int, ...]], item_shapes: dict[str, tuple[int, ...]],
          outputs: list[str], tolerance: float, value_range: tuple[float, float] = (-1.0, 1.0),
          batches: bool = True) -> NetProbe:
    """Run `backend` on two items alone and (with `batches`) stacked; `declared` are the outputs'
    reshape-time shapes."""
    singles_in = probe_inputs(item_shapes, value_range)
    stacked_in = {k: np.concatenate([x[k] for x in singles_in]) for k in item_shapes}
    try:
        singles = [backend.infer(x, outputs) for x in singles_in]
        stacked = backend.infer(stacked_in, outputs) if batches else None
    except Exception as e:  # a net that cannot run the probe cannot be proved separable either
        shapes = {n: metadata_shape(declared[n]) for n in outputs}
        return NetProbe(shapes, False, f"the probe forward failed ({type(e).__name__}: {e})")
    shapes = {}
    for name in outputs:
        seen = [s[name].shape for s in singles] + ([stacked[name].shape] if stacked is not None else [])
        shapes[name] = metadata_shape(declared[name], *seen)
    if stacked is None:  # not batches
        return NetProbe(shapes, None, "not checked: batching is off and requests are limited to one item")
    separable, reason = separability(outputs, singles, stacked, tolerance)
    return NetProbe(shapes, separable, reason)

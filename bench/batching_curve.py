"""`batching: auto` by measurement: the forward-time curve per batch size and the decision the server makes.

Runs the server's own calibration (inference_server/loading/calibration.py) on each backend for the digits
net and the GoogLeNet-size net, and prints batch size, forward ms, items/s and the decision.

    .venv/bin/python bench/batching_curve.py [--max-batch 16] [--budget-ms 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")  # what the server gives one instance on 2 cores
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import inception_net  # noqa: E402
from inference_server.backends import choose_backend, create_backend  # noqa: E402
from inference_server.config import Batching, load_config, parse_config  # noqa: E402
from inference_server.loading.calibration import decide, measure_curve  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--budget-ms", type=float, default=1000.0)
    args = ap.parse_args()
    spec = Batching(enabled="auto", max_batch_size=args.max_batch, latency_budget_ms=args.budget_ms)
    with tempfile.TemporaryDirectory() as d:
        proto, weights = inception_net.write(Path(d))
        models = {
            "digits": load_config(ROOT / "examples/digits/server.yaml"),
            "inception": parse_config(
                {"name": "inception", "model": {"prototxt": str(proto), "weights": str(weights)}}
            ),
        }
        for name, cfg in models.items():
            for backend in ("pycaffe", "onnxruntime"):
                cfg.backend = backend
                b = create_backend(cfg, choose_backend(cfg))
                desc = b.describe()
                curve = measure_curve(b, {i.name: i.shape[1:] for i in desc.inputs}, [o.name for o in desc.outputs],
                                      args.max_batch, budget_s=0.3 if name == "digits" else 1.0)
                decision = decide(curve, spec)
                print(f"\n{name} / {backend}: batching {'ON' if decision.enabled else 'off'}: {decision.reason}")
                print(f"{'batch':>6} {'forward ms':>11} {'items/s':>9} {'vs batch 1':>10}")
                for p in curve:
                    print(f"{p['batch']:>6} {p['forward_ms']:>11.3f} {p['items_per_s']:>9.1f} "
                          f"{p['items_per_s'] / curve[0]['items_per_s']:>9.2f}x")


if __name__ == "__main__":
    main()

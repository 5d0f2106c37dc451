"""How much the HTTP server adds to a forward pass, for one model, in one run.

Prints: the direct pycaffe forward p50, HTTP infer p50/p99 and requests/s at concurrency 1 and 8
(JSON FP32 input, load from wrk), and the overhead = HTTP p50 − forward p50 at concurrency 1.

    .venv/bin/python bench/server_overhead.py [--config examples/digits/server.yaml] [--seconds 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from caffe_testing.servers import ServerProcess  # noqa: E402
from inference_server.config import load_config  # noqa: E402
from wrk import run_wrk  # noqa: E402


def direct_forward_p50(cfg, x: np.ndarray, iterations: int = 2000) -> float:
    import caffe

    caffe.set_mode_cpu()
    net = caffe.Net(str(cfg.path(cfg.model.prototxt)), caffe.TEST, weights=str(cfg.path(cfg.model.weights)))
    name = net.inputs[0]
    net.blobs[name].reshape(*x.shape)
    net.reshape()
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        net.blobs[name].data[...] = x
        net.forward()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples/digits/server.yaml"))
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    cfg = load_config(args.config)
    import caffe

    net = caffe.Net(str(cfg.path(cfg.model.prototxt)), caffe.TEST)
    name = net.inputs[0]
    shape = [1, *net.blobs[name].data.shape[1:]]
    del net
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    body = orjson.dumps({"inputs": [{"name": name, "shape": shape, "datatype": "FP32", "data": x.ravel().tolist()}]})

    fwd = direct_forward_p50(cfg, x)
    print(f"model {cfg.name}: input {name} {shape}, JSON body {len(body)} bytes")
    print(f"direct pycaffe forward p50: {fwd:.4f} ms")
    with ServerProcess(Path(args.config), env={"OPENBLAS_NUM_THREADS": "1"}) as server:
        url = f"{server.url}/v2/models/{cfg.name}/infer"
        run_wrk(url, body, {"Content-Type": "application/json"}, 1, 2)  # warm-up
        rows = []
        for conc in (1, 8):
            r = run_wrk(url, body, {"Content-Type": "application/json"}, conc, args.seconds)
            rows.append((conc, r))
    print(f"{'concurrency':>11} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for conc, r in rows:
        errors = r["non2xx"] + r["socket_errors"]
        print(f"{conc:>11} {r['rps']:>9.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {errors:>6}")
    print(f"overhead at concurrency 1 (HTTP p50 − forward p50): {rows[0][1]['p50_ms'] - fwd:.3f} ms")


if __name__ == "__main__":
    main()

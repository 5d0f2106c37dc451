"""How much the HTTP server adds to a forward pass, for one model, in one run.

Prints: the direct pycaffe forward p50, HTTP infer p50/p99 and requests/s at concurrency 1 and 8
(JSON FP32 input, load from wrk), and the overhead = HTTP p50 − forward p50 at concurrency 1.

    .venv/bin/python bench/server_overhead.py [--config examples/digits/server.yaml] [--seconds 10]

`--tracing` measures what OpenTelemetry tracing costs instead (docs/tracing.md): the same server with
tracing off, on (every request sampled: 5 spans each, exported over OTLP/HTTP to a receiver on
loopback that only counts them, as a collector elsewhere would cost nothing here) and on with
sampleRatio 0.1 (a tenth of the requests recorded), and with `--baseline DIR` a server run from another
checkout (e.g. one without the tracing code). Rounds are interleaved (off, on, ..., then the reverse
order), each figure the median over `--rounds`, the ratios against "off" from the same run.

    .venv/bin/python bench/server_overhead.py --tracing [--baseline ../main] [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
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


def tracing_cost(args, url_path: str, body: bytes) -> None:
    """--tracing: the same server with tracing off and on, interleaved rounds, medians and ratios."""
    from contextlib import ExitStack

    from caffe_testing.otlp import OTLPReceiver

    env = {"OPENBLAS_NUM_THREADS": "1", **{k: "" for k in os.environ if k.startswith("OTEL_")}}
    with ExitStack() as stack:
        receiver = stack.enter_context(OTLPReceiver(decode=False))
        on = {"CAFFESERVE__TRACING__ENDPOINT": receiver.endpoint}
        variants = {
            "off": ServerProcess(Path(args.config), env=env),
            "on, every request": ServerProcess(Path(args.config), env={**env, **on}),
            "on, sampleRatio 0.1": ServerProcess(Path(args.config),
                                                 env={**env, **on, "CAFFESERVE__TRACING__SAMPLE_RATIO": "0.1"}),
        }
        if args.baseline:
            variants["baseline"] = ServerProcess(Path(args.config), env=env, root=args.baseline.resolve())
        for server in variants.values():
            stack.enter_context(server)
            run_wrk(server.url + url_path, body, {"Content-Type": "application/json"}, 1, 2)  # warm-up
        results: dict[tuple[str, int], list[dict]] = {}
        names = list(variants)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                for conc in (1, 8):
                    results.setdefault((name, conc), []).append(
                        run_wrk(variants[name].url + url_path, body, {"Content-Type": "application/json"}, conc,
                                args.seconds))
        time.sleep(6)  # the exporter's last batch (its schedule delay is 5 s)
    print(f"tracing cost, median of {args.rounds} interleaved rounds of {args.seconds:g} s "
          f"(spans received: {receiver.posts} exports, {receiver.bytes / 1e6:.1f} MB)")
    print(f"{'server':>20} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s vs off':>12} "
          f"{'p50 vs off':>10} {'errors':>6}")
    for conc in (1, 8):
        off = results["off", conc]
        off_rps = statistics.median(x["rps"] for x in off)
        off_p50 = statistics.median(x["p50_ms"] for x in off)
        for name in names:
            rows = results[name, conc]
            rps, p50 = statistics.median(x["rps"] for x in rows), statistics.median(x["p50_ms"] for x in rows)
            p99 = statistics.median(x["p99_ms"] for x in rows)
            errors = sum(x["non2xx"] + x["socket_errors"] for x in rows)
            print(f"{name:>20} {conc:>4} {rps:>8.0f} {p50:>8.3f} {p99:>8.3f} {rps / off_rps:>12.3f} "
                  f"{p50 / off_p50:>10.3f} {errors:>6}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples/digits/server.yaml"))
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--tracing", action="store_true", help="measure tracing off against on (module docstring)")
    ap.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                    help="with --tracing: also a server run from the checkout DIR")
    ap.add_argument("--rounds", type=int, default=3, help="with --tracing: interleaved rounds (default 3)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    import caffe

    net = caffe.Net(str(cfg.path(cfg.model.prototxt)), caffe.TEST)
    name = net.inputs[0]
    shape = [1, *net.blobs[name].data.shape[1:]]
    del net
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    body = orjson.dumps({"inputs": [{"name": name, "shape": shape, "datatype": "FP32", "data": x.ravel().tolist()}]})

    if args.tracing:
        tracing_cost(args, f"/v2/models/{cfg.name}/infer", body)
        return
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

"""What the gateway adds, in one run: latency through it vs direct, and throughput with 1 vs 2 replicas.

Starts two real `caffeserve serve` processes with the digits model and two `caffeserve gateway`
processes (one in front of one server, one in front of both), then drives each with wrk (JSON FP32
input, keep-alive connections) and prints:
- p50/p99 at concurrency 1, direct and through the gateway, and the difference (added latency);
- requests/s at concurrency C: direct to one server, through the gateway to 1 replica, to 2 replicas.

    .venv/bin/python bench/gateway.py [--seconds 5] [--concurrency 16]

On a 2-core machine wrk, the gateway and the servers share the cores, so the 2-replica figure
shows how the gateway spreads load more than how a cluster would scale (there each replica has
its own node or GPU).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from caffe_testing.servers import CAFFESERVE, ServerProcess, free_port, http  # noqa: E402
from wrk import run_wrk  # noqa: E402

CONFIG = ROOT / "examples/digits/server.yaml"
ENV = {"OPENBLAS_NUM_THREADS": "1"}


def served(server: ServerProcess) -> float:
    """Inference requests a server has answered, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = http("GET", server.url + "/metrics")[2].decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "caffeserve_inference_requests_total")


class Gateway:
    def __init__(self, *servers: ServerProcess):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            CAFFESERVE + ["gateway", "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "WARNING",
                          "--static", "digits=" + ",".join(s.url for s in servers)],
            cwd=ROOT, env={**os.environ, **ENV},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if http("GET", self.url + "/v2/health/ready", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("gateway did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    body = orjson.dumps({"inputs": [{"name": "data", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                     "data": [((i * 7) % 17) / 4.0 for i in range(64)]}]})
    headers = {"Content-Type": "application/json"}
    path = "/v2/models/digits/infer"
    with ServerProcess(CONFIG, env=ENV) as a, ServerProcess(CONFIG, env=ENV) as b:
        one, two = Gateway(a), Gateway(a, b)
        try:
            for url in (a.url, b.url, one.url, two.url):  # warm-up: connections, caches
                run_wrk(url + path, body, headers, 2, 1)
            rows = {
                "direct, 1 server": run_wrk(a.url + path, body, headers, 1, args.seconds),
                "gateway, 1 replica": run_wrk(one.url + path, body, headers, 1, args.seconds),
            }
            load = {
                "direct, 1 server": run_wrk(a.url + path, body, headers, args.concurrency, args.seconds),
                "gateway, 1 replica": run_wrk(one.url + path, body, headers, args.concurrency, args.seconds),
            }
            before = [served(s) for s in (a, b)]
            load["gateway, 2 replicas"] = run_wrk(two.url + path, body, headers, args.concurrency, args.seconds)
            spread = [served(s) - n for s, n in zip((a, b), before)]
        finally:
            one.stop()
            two.stop()

    print(f"digits model, JSON FP32 body {len(body)} bytes, wrk {args.seconds:g} s per run, {os.cpu_count()} cores")
    print("\nlatency at concurrency 1")
    print(f"{'':<22} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    for name, r in rows.items():
        print(f"{name:<22} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['rps']:>8.0f}")
    d, g = rows["direct, 1 server"], rows["gateway, 1 replica"]
    print(f"{'added by the gateway':<22} {g['p50_ms'] - d['p50_ms']:>8.3f} {g['p99_ms'] - d['p99_ms']:>8.3f}")
    print(f"\nthroughput at concurrency {args.concurrency}")
    print(f"{'':<22} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, r in load.items():
        errors = r["non2xx"] + r["socket_errors"]
        print(f"{name:<22} {r['rps']:>8.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {errors:>7}")
    ratio = load["gateway, 2 replicas"]["rps"] / load["gateway, 1 replica"]["rps"]
    print(f"2 replicas / 1 replica through the gateway: {ratio:.2f}x; "
          f"requests per replica in the 2-replica run: {spread[0]:.0f} / {spread[1]:.0f}")


if __name__ == "__main__":
    main()

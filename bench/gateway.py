"""What the gateway adds, in one run: latency through it vs direct, and throughput with 1 vs 2 replicas.

Starts two real `caffeserve serve` processes with the digits model and two `caffeserve gateway`
processes (one in front of one server, one in front of both), then drives each with wrk (JSON FP32
input, keep-alive connections) and prints:
- p50/p99 at concurrency 1, direct and through the gateway, and the difference (added latency);
- requests/s at concurrency C: direct to one server, through the gateway to 1 replica, to 2 replicas.

    .venv/bin/python bench/gateway.py [--seconds 5] [--concurrency 16] [--baseline DIR] [--rounds 3]
        [--protocol-concurrency 1,8] [--no-grpcio] [--only-protocols]

Then, for REST JSON and gRPC alike (h2load, one request in flight per connection, 1 and 8
connections, as bench/protocols.py drives them): p50 direct and through the gateway, the
difference, and the gateway process's CPU time per request (user + system, from /proc). Beside
this checkout's gateway (gRPC on our HTTP/2 transport, both sides) runs the same gateway with
CAFFESERVE_GRPC_TRANSPORT=grpcio (gRPC on grpc.aio, as before issue 29), in the same rounds;
`--no-grpcio` leaves it out. `--baseline DIR` runs a further gateway from another checkout
(e.g. `git archive main | tar -x -C DIR`) in front of the same server, measured in the same run,
rounds interleaved (direct, this, baseline, then the reverse order, ...), each figure the median over `--rounds`:
a change's before and after on the same machine state.

On a 2-core machine wrk, the gateway and the servers share the cores, so the 2-replica figure
shows how the gateway spreads load more than how a cluster would scale (there each replica has
its own node or GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from caffe_testing.grpc import grpc_server  # noqa: E402
from caffe_testing.servers import CAFFESERVE, ServerProcess, free_port, http  # noqa: E402
from inference_server.grpc import messages as pb  # noqa: E402
from protocols import bodies, cpu_s, h2load  # noqa: E402
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
    """`caffeserve gateway` in front of `servers`, REST and gRPC; from the checkout at `root`."""

    def __init__(self, *servers: ServerProcess, root: Path = ROOT, env: dict[str, str] | None = None):
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        static = ",".join(f"{s.url}?grpc={s.grpc_port}" for s in servers)
        self.proc = subprocess.Popen(  # `python -m` imports the packages of its working directory first
            CAFFESERVE + ["gateway", "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "WARNING",
                          "--grpc-port", str(self.grpc_port), "--static", "digits=" + static],
            cwd=root, env={**os.environ, **ENV, **(env or {})},
        )
        self.ps = psutil.Process(self.proc.pid)
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


def grpc_ok(url: str) -> float:
    """The gateway's gRPC calls answered OK (h2load reads HTTP status only, not grpc-status)."""
    text = http("GET", url + "/metrics")[2].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("caffeserve_gateway_grpc_requests_total{") and 'grpc_code="OK"' in line)


def one_run(url: str, case: tuple[bytes, dict], seconds: float, grpc: bool, gateway: Gateway | None,
            conc: int = 1) -> dict:
    body, headers = case
    ok_before = grpc_ok(gateway.url) if grpc and gateway else 0.0
    cpu_before = cpu_s(gateway.ps) if gateway else 0.0
    r = h2load(url, body, headers, conc, seconds, h1=not grpc)
    cpu = cpu_s(gateway.ps) - cpu_before if gateway else 0.0
    assert r["ok"] == r["n"], f"{r['n'] - r['ok']} of {r['n']} requests failed\n{r['raw']}"
    if grpc and gateway:
        assert grpc_ok(gateway.url) - ok_before >= r["n"], "gRPC calls through the gateway did not all answer OK"
    return {"p50_ms": r["p50_ms"], "cpu_ms": 1000 * cpu / max(r["n"], 1), "rps": r["rps"]}


def digits_input() -> np.ndarray:
    """The digits input every protocol row sends (fixed, so that runs and checkouts send the same bytes)."""
    return np.array([((i * 7) % 17) / 4.0 for i in range(64)], np.float32).reshape(1, 1, 8, 8)


def per_protocol(server: ServerProcess, gateways: dict[str, Gateway], seconds: float, rounds: int,
                 concurrency: list[int]) -> list[dict]:
    """Added p50 and the gateway's CPU per request, REST JSON and gRPC, each gateway build in turn."""
    cases = bodies("digits", "data", digits_input())
    path = "/v2/models/digits/infer"
    grpc_path = f"/{pb.SERVICE}/ModelInfer"
    results: dict[tuple[str, int, str], list[dict]] = {}
    for proto, grpc in (("REST JSON", False), ("gRPC", True)):
        case = cases[proto]
        direct = f"http://127.0.0.1:{server.grpc_port}{grpc_path}" if grpc else server.url + path
        targets = {"direct": (direct, None)}
        for name, gw in gateways.items():
            targets[name] = (f"http://127.0.0.1:{gw.grpc_port}{grpc_path}" if grpc else gw.url + path, gw)
        for url, _gw in targets.values():  # warm-up: connections, caches
            h2load(url, case[0], case[1], 1, None, requests=200, h1=not grpc)
        for conc in concurrency:
            order = list(targets)
            for _ in range(rounds):
                for name in order:
                    url, gw = targets[name]
                    results.setdefault((proto, conc, name), []).append(one_run(url, case, seconds, grpc, gw, conc))
                order.reverse()  # no build always runs right after another
    med = {k: {f: statistics.median(r[f] for r in runs) for f in runs[0]} for k, runs in results.items()}
    print(f"\nadded by the gateway (h2load, one request in flight per connection; median of {rounds} interleaved "
          f"rounds of {seconds:g} s; load average {os.getloadavg()[0]:.1f})")
    print(f"{'protocol':<10} {'conc':>4} {'gateway':<10} {'direct p50':>10} {'via p50':>9} {'added p50':>10} "
          f"{'gw CPU ms/req':>13} {'req/s':>8}")
    rows = []
    for proto in ("REST JSON", "gRPC"):
        for conc in concurrency:
            d = med[(proto, conc, "direct")]
            for name in gateways:
                g = med[(proto, conc, name)]
                rows.append({"protocol": proto, "concurrency": conc, "gateway": name, "direct_p50_ms": d["p50_ms"],
                             "via_p50_ms": g["p50_ms"], "added_p50_ms": g["p50_ms"] - d["p50_ms"],
                             "cpu_ms": g["cpu_ms"], "rps": g["rps"]})
                print(f"{proto:<10} {conc:>4} {name:<10} {d['p50_ms']:>10.3f} {g['p50_ms']:>9.3f} "
                      f"{g['p50_ms'] - d['p50_ms']:>10.3f} {g['cpu_ms']:>13.3f} {g['rps']:>8.0f}")
    print("(gateway: this = gRPC on our HTTP/2 transport, grpc.aio = the same with CAFFESERVE_GRPC_TRANSPORT=grpcio; "
          "REST is the same code in both)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout whose gateway is measured beside this one's, in the same run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the per-protocol figures")
    ap.add_argument("--only-protocols", action="store_true", help="skip the wrk latency and throughput tables")
    ap.add_argument("--protocol-concurrency", default="1,8", help="connections for the per-protocol figures")
    ap.add_argument("--no-grpcio", action="store_true", help="leave out the gateway on grpc.aio")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH",
                    help="also write the per-protocol rows here (bench/targets.py)")
    args = ap.parse_args()
    body = orjson.dumps({"inputs": [{"name": "data", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                     "data": digits_input().ravel().tolist()}]})
    headers = {"Content-Type": "application/json"}
    path = "/v2/models/digits/infer"
    serve = {"env": ENV, "args": ["--log-level", "WARNING"]}
    with grpc_server(CONFIG, None, **serve) as a, grpc_server(CONFIG, None, **serve) as b:
        one, two = Gateway(a), Gateway(a, b)
        base = Gateway(a, root=args.baseline.resolve()) if args.baseline else None
        aio = None if args.no_grpcio else Gateway(a, env={"CAFFESERVE_GRPC_TRANSPORT": "grpcio"})
        try:
            builds = {"this": one, **({"grpc.aio": aio} if aio else {}), **({"baseline": base} if base else {})}
            print(f"digits model, {os.cpu_count()} cores; gateways: {', '.join(builds)}; load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
            added = per_protocol(a, builds, args.seconds, args.rounds,
                                 [int(c) for c in args.protocol_concurrency.split(",")])
            if args.json:
                args.json.write_bytes(orjson.dumps({"loadavg": os.getloadavg()[0], "rows": added},
                                                   option=orjson.OPT_INDENT_2))
            if args.only_protocols:
                return
            for url in (a.url, b.url, one.url, two.url, *([base.url] if base else [])):  # warm-up
                run_wrk(url + path, body, headers, 2, 1)
            rows = {
                "direct, 1 server": run_wrk(a.url + path, body, headers, 1, args.seconds),
                "gateway, 1 replica": run_wrk(one.url + path, body, headers, 1, args.seconds),
            }
            load = {
                "direct, 1 server": run_wrk(a.url + path, body, headers, args.concurrency, args.seconds),
                "gateway, 1 replica": run_wrk(one.url + path, body, headers, args.concurrency, args.seconds),
            }
            if base:
                rows["baseline, 1 replica"] = run_wrk(base.url + path, body, headers, 1, args.seconds)
                load["baseline, 1 replica"] = run_wrk(base.url + path, body, headers, args.concurrency, args.seconds)
            before = [served(s) for s in (a, b)]
            load["gateway, 2 replicas"] = run_wrk(two.url + path, body, headers, args.concurrency, args.seconds)
            spread = [served(s) - n for s, n in zip((a, b), before, strict=True)]
        finally:
            one.stop()
            two.stop()
            for extra in (base, aio):
                if extra:
                    extra.stop()

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

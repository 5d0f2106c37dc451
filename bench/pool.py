"""20 small Caffe models in one many-model server against 20 single-model servers.

Writes 20 models (the digits example, then dense nets whose weights grow from 60 kB to SqueezeNet's 4.8 MB)
into a repository folder and measures, on this machine:
- memory: the RSS of one `serve --model-repository` holding all 20, against the summed RSS of 20 `serve
  --config` processes; and each model's own figure (metadata `memory_bytes`) over its weights' size (the
  ratio the budget's estimate uses, inference_server/serving/memory.py);
- time to the first answer after a load: a load call to the pool server then the first request, against
  starting a new single-model server and its first answer (median over 5 models);
- requests/s over a mixed load: wrk through a gateway, each request to one of the 20 models in turn, the
  same gateway settings in front of the pool server and in front of the 20 servers;
- the p99 of a small model while a big one (a dense net with 64 MiB of weights) loads into the same
  server: one client in a loop on the small model, before and during the load; and the RSS the big
  model's unload gives back.

    .venv/bin/python bench/pool.py [--seconds 8] [--concurrency 8] [--models 20]

On a 2-core machine wrk, the gateway and the servers share the cores; every server is pinned to one Net
(`instances: 1`, pycaffe, OPENBLAS_NUM_THREADS=1) so the two setups run the same work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from caffe_testing.gateway import GatewayProcess, digits_config  # noqa: E402
from caffe_testing.repository import dense_model, write_model  # noqa: E402
from caffe_testing.servers import ServerProcess, http, http_json  # noqa: E402

ENV = {"OPENBLAS_NUM_THREADS": "1", "GLOG_minloglevel": "2"}
SQUEEZENET_PARAMS = 1_235_496  # SqueezeNet 1.1's weights: 4.8 MB as float32


def write_repository(root: Path, n: int) -> dict[str, dict]:
    """`n` models: digits, then dense nets from ~15 k to SqueezeNet's 1.2 M parameters (geometric)."""
    models = {"digits": {"inputs": None, "body": json.dumps(_digits_body()).encode()}}
    write_model(root, "digits", {**digits_config(name="digits"), "backend": "pycaffe"})
    for i in range(1, n):
        params = int(15_000 * (SQUEEZENET_PARAMS / 15_000) ** ((i - 1) / max(1, n - 2)))
        inputs = 256
        outputs = max(4, params // inputs)
        name = f"m{i:02d}"
        net = dense_model(root, name, inputs, outputs, seed=i)
        x = np.random.default_rng(i).random((1, inputs), dtype=np.float32)
        net["body"] = json.dumps({"inputs": [{"name": "data", "shape": [1, inputs], "datatype": "FP32",
                                              "data": x.ravel().round(4).tolist()}]}).encode()
        models[name] = net
    return models


def _digits_body() -> dict:
    from caffe_testing.gateway import infer_payload

    return infer_payload(0)


def single_config(root: Path, name: str) -> Path:
    """The model's server.yaml as a `serve --config` file (which names its model), beside it."""
    cfg = yaml.safe_load((root / name / "server.yaml").read_text())
    path = root / name / "single.yaml"
    path.write_text(yaml.safe_dump({**cfg, "name": name}))
    return path


def rss_tree(pid: int) -> int:
    p = psutil.Process(pid)
    return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))


def first_answer(url: str, model: str, body: bytes, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if http("POST", f"{url}/v2/models/{model}/infer", body, timeout=10)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise TimeoutError(f"{model}: no answer in {timeout_s} s")


def mixed_load(gateway_url: str, models: dict[str, dict], seconds: float, connections: int) -> dict:
    """wrk through the gateway, request i to model i mod n (a Lua script cycles over the bodies)."""
    with tempfile.TemporaryDirectory() as d:
        lines = ["local reqs = {}"]
        for i, (name, m) in enumerate(models.items()):
            f = Path(d) / f"{name}.json"
            f.write_bytes(m["body"])
            lines.append(f'do local h = io.open("{f}", "rb"); reqs[{i + 1}] = wrk.format("POST", '
                         f'"/v2/models/{name}/infer", {{["Content-Type"] = "application/json"}}, h:read("*all")); '
                         'h:close() end')
        lines += ["local i = 0", "request = function() i = i % #reqs + 1; return reqs[i] end",
                  "local bad = 0", "response = function(status) if status ~= 200 then bad = bad + 1 end end"]
        script = Path(d) / "mix.lua"
        script.write_text("\n".join(lines) + "\n")
        out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
                              "-s", str(script), gateway_url], capture_output=True, text=True, check=True).stdout
    import re

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    return {"rps": rps, "non2xx": int(non2xx.group(1)) if non2xx else 0, "p99": p99.group(1) if p99 else ""}


def static_args(models: dict[str, dict], urls: dict[str, str]) -> list[str]:
    args: list[str] = []
    for name in models:
        args += ["--static", f"{name}={urls[name]}"]
    return args


def stall(url: str, small: str, body: bytes, load: Callable[[], None], before_s: float = 2.0) -> dict:
    """One client in a loop on `small`; `load()` runs after `before_s`: latencies (ms) before and during it."""
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            t0 = time.monotonic()
            status = http("POST", f"{url}/v2/models/{small}/infer", body)[0]
            assert status == 200, status
            samples.append((t0, (time.monotonic() - t0) * 1000))

    t = threading.Thread(target=client, daemon=True)
    t.start()
    time.sleep(before_s)
    start = time.monotonic()
    load()
    end = time.monotonic()
    time.sleep(0.5)
    stop.set()
    t.join()
    before = [ms for t0, ms in samples if t0 < start]
    during = [ms for t0, ms in samples if start <= t0 <= end]
    return {"load_s": end - start, "before": summary(before), "during": summary(during)}


def summary(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    a = np.array(ms)
    return {"n": len(ms), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


def memory_and_mix(root: Path, models: dict[str, dict], weights: dict[str, int], out: dict, mix: bool,
                   seconds: float, connections: int) -> None:
    """The pool server's memory (and each model's), then, with `mix`, the mixed load through a gateway in
    front of it and in front of 20 single servers (whose summed memory is read too)."""
    pool = ServerProcess(None, repository=root, env=ENV).start(timeout=300)
    try:
        assert pool.proc is not None
        out["pool_rss"] = rss_tree(pool.proc.pid)
        per = {n: http_json("GET", f"{pool.url}/v2/models/{n}")[1]["parameters"]["memory_bytes"] for n in models}
        out["model_memory"] = per
        out["factor"] = {n: per[n] / weights[n] for n in weights}
        if mix:
            with GatewayProcess(*static_args(models, {n: pool.url for n in models}), "--no-grpc") as gw:
                for n, m in models.items():  # every model answers through the gateway before the load
                    assert http("POST", f"{gw.url}/v2/models/{n}/infer", m["body"])[0] == 200, n
                out["pool_mix"] = mixed_load(gw.url, models, seconds, connections)
    finally:
        pool.stop()
    if not mix:
        return
    singles = [ServerProcess(single_config(root, n), env=ENV) for n in models]
    try:
        for s in singles:
            s.start(timeout=300)
        out["singles_rss"] = sum(rss_tree(s.proc.pid) for s in singles if s.proc is not None)
        urls = {n: s.url for n, s in zip(models, singles, strict=True)}
        with GatewayProcess(*static_args(models, urls), "--no-grpc") as gw:
            out["singles_mix"] = mixed_load(gw.url, models, seconds, connections)
    finally:
        for s in singles:
            s.stop()


def first_answers(root: Path, models: dict[str, dict], out: dict) -> None:
    """Time to the first answer after a load (5 models, median): a load call, or a new single server."""
    picks = list(models)[1::4][:5]
    pool_times, single_times = [], []
    with ServerProcess(None, repository=root, env=ENV, args=["--model-control-mode", "explicit"]) as pool:
        for n in picks:
            t0 = time.monotonic()
            assert http_json("POST", f"{pool.url}/v2/repository/models/{n}/load", {}, timeout=120)[0] == 200
            first_answer(pool.url, n, models[n]["body"])
            pool_times.append(time.monotonic() - t0)
    for n in picks:
        s = ServerProcess(single_config(root, n), env=ENV, wait_ready=False)
        t0 = time.monotonic()
        s.start(timeout=120)
        try:
            first_answer(s.url, n, models[n]["body"])
            single_times.append(time.monotonic() - t0)
        finally:
            s.stop()
    out["first_answer_s"] = {"pool": statistics.median(pool_times), "single": statistics.median(single_times)}


def big_load(root: Path, models: dict[str, dict], out: dict) -> None:
    """The p99 of a small model while a big one loads, and the memory the big one's unload returns."""
    dense_model(root, "big", 4096, 4096, seed=99)  # 64 MiB of weights
    with ServerProcess(None, repository=root, env=ENV, args=[
            "--model-control-mode", "explicit", "--load-model", "digits"]) as pool:
        assert pool.proc is not None

        def load_big():
            assert http_json("POST", f"{pool.url}/v2/repository/models/big/load", {}, timeout=300)[0] == 200

        out["stall"] = stall(pool.url, "digits", models["digits"]["body"], load_big)
        out["big_memory_bytes"] = http_json("GET", f"{pool.url}/v2/models/big")[1]["parameters"]["memory_bytes"]
        before = psutil.Process(pool.proc.pid).memory_info().rss
        assert http_json("POST", f"{pool.url}/v2/repository/models/big/unload", {})[0] == 200
        time.sleep(0.5)
        out["big_unload_returned_bytes"] = before - psutil.Process(pool.proc.pid).memory_info().rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--parts", default="memory,mix,first,stall",
                    help="the figures to measure, comma-separated (default %(default)s)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repository"
        models = write_repository(root, args.models)
        weights = {n: (root / n / "net.caffemodel").stat().st_size for n in models if n != "digits"}
        print(f"{len(models)} models, weights {min(weights.values()) / 1e3:.0f} kB .. "
              f"{max(weights.values()) / 1e6:.1f} MB")
        memory_and_mix(root, models, weights, out, "mix" in parts, args.seconds, args.concurrency)
        if "first" in parts:
            first_answers(root, models, out)
        if "stall" in parts:
            big_load(root, models, out)
    report(out, weights)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "pool.json").write_text(json.dumps(out, indent=1))
    return 0


def report(out: dict, weights: dict[str, int]) -> None:
    mib = 2**20
    n = len(out["model_memory"])
    if "singles_rss" in out:
        print(f"\nmemory, {n} models: one pool server {out['pool_rss'] / mib:.0f} MiB, "
              f"{n} single servers {out['singles_rss'] / mib:.0f} MiB ({out['singles_rss'] / out['pool_rss']:.1f}x)")
    else:
        print(f"\nmemory, {n} models: one pool server {out['pool_rss'] / mib:.0f} MiB")
    f = out["factor"]
    big = [f[k] for k in weights if weights[k] > 1e6]
    print(f"model memory / weights size: median {statistics.median(f.values()):.2f}, weights over 1 MB "
          f"{min(big):.2f}..{max(big):.2f}, all {min(f.values()):.2f}..{max(f.values()):.2f}")
    if "first_answer_s" in out:
        fa = out["first_answer_s"]
        print(f"first answer after a load (median of 5): pool load call {fa['pool'] * 1000:.0f} ms, "
              f"new single server {fa['single'] * 1000:.0f} ms")
    if "pool_mix" in out:
        pm, sm = out["pool_mix"], out["singles_mix"]
        print(f"mixed load through the gateway: pool {pm['rps']:.0f} req/s (p99 {pm['p99']}, non-2xx "
              f"{pm['non2xx']}), {n} singles {sm['rps']:.0f} req/s (p99 {sm['p99']}, non-2xx {sm['non2xx']})")
    if "stall" in out:
        st = out["stall"]
        print(f"small model while a 64 MiB model loads ({st['load_s']:.2f} s): before p50 {st['before']['p50']:.2f} "
              f"ms p99 {st['before']['p99']:.2f} ms; during p50 {st['during'].get('p50', 0):.2f} ms "
              f"p99 {st['during'].get('p99', 0):.2f} ms max {st['during'].get('max', 0):.0f} ms "
              f"({st['during']['n']} requests)")
        print(f"big model: {out['big_memory_bytes'] / mib:.0f} MiB at load, its unload returned "
              f"{out['big_unload_returned_bytes'] / mib:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())

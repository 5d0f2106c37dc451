"""Side by side, in one run: our server, KServe's ModelServer and MLServer serving the same pycaffe nets.

Models: the digits net (examples/digits) and a GoogLeNet-size net with random weights
(bench/inception_net.py). Servers start one at a time, each in its own process and venv; each must
answer the request with the same tensor as a direct pycaffe forward before it is measured. Load
comes from wrk at each concurrency, with the same V2 JSON FP32 body for every server, plus one extra
row for ours on the big net with the binary tensor extension (our zero-copy path). Prints a table
and the ratios ours/peer; writes bench/results/compare.json and bench/results/compare.png.

    bash bench/setup_peers.sh          # once: the peers' venvs (idempotent)
    .venv/bin/python bench/compare.py [--seconds 5] [--concurrency 1 4 16]

`--baseline DIR` adds a row for ours run from another checkout (the "before" of a change, e.g. a
worktree at main), started and measured in the same rounds as the others.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from peers.servers import (  # noqa: E402
    SERVERS,
    Ours,
    ServedModel,
    ServerUnderTest,
    http,
    peer_python,
    pycaffe_dir,
    write_our_config,
)
from wrk import run_wrk  # noqa: E402

OURS = "caffe-serving"
OURS_BINARY = "caffe-serving (binary)"
OURS_AUTO = "caffe-serving (auto, binary)"
OURS_BASELINE = "caffe-serving (baseline)"
OURS_ROWS = (OURS, OURS_BINARY, OURS_AUTO, OURS_BASELINE)
PEERS = ("kserve", "mlserver")
RESULTS = BENCH / "results"


# --- models and requests

def prepare_models(tmp: Path) -> list[ServedModel]:
    """The digits example as shipped, and the inception net written into `tmp`."""
    import inception_net
    from inference_server.config import load_config

    digits_cfg_path = REPO / "examples/digits/server.yaml"
    cfg = load_config(digits_cfg_path)
    digits = ServedModel(cfg.name, cfg.path(cfg.model.prototxt).resolve(), cfg.path(cfg.model.weights).resolve(),
                         digits_cfg_path)
    proto, weights = inception_net.write(tmp)
    inception = ServedModel("inception", proto, weights, write_our_config(tmp, "inception", proto, weights))
    return [digits, inception]


def input_of(model: ServedModel) -> tuple[str, np.ndarray]:
    """The net's input blob name and one seeded random input of its shape (batch 1)."""
    import caffe

    net = caffe.Net(str(model.prototxt), caffe.TEST)
    name = net.inputs[0]
    shape = (1, *net.blobs[name].data.shape[1:])
    return name, np.random.default_rng(0).random(shape, dtype=np.float32)


def reference_forward(model: ServedModel, name: str, x: np.ndarray, seconds: float = 1.0):
    """Outputs of a direct pycaffe forward on `x`, and the median forward time (ms) over ~`seconds`."""
    import caffe

    caffe.set_mode_cpu()
    net = caffe.Net(str(model.prototxt), caffe.TEST, weights=str(model.weights))
    net.blobs[name].data[...] = x
    outputs = {k: v.copy() for k, v in net.forward().items()}
    times, end = [], time.monotonic() + seconds
    while time.monotonic() < end or len(times) < 5:
        t = time.perf_counter()
        net.blobs[name].data[...] = x
        net.forward()
        times.append(time.perf_counter() - t)
    return outputs, statistics.median(times) * 1000


def json_body(name: str, x: np.ndarray) -> bytes:
    """The V2 JSON request every server gets: FP32 data as a flat list."""
    return orjson.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                     "data": x.ravel().tolist()}]})


def binary_body(name: str, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The same input with the binary tensor data extension: a JSON header, then the raw FP32 bytes."""
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    head = orjson.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}]})
    return head + raw, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}


JSON_HEADERS = {"Content-Type": "application/json"}
# wrk's default answer timeout (2 s) is shorter than a slow server's p99 at concurrency 16 on the
# big net: a late answer would count as a socket error, drop out of the latencies, and the server
# would still spend the work on it. Every point runs with a 10 s timeout instead.
WRK_TIMEOUT_S = 10


def wrk(url: str, body: bytes, headers: dict, connections: int, seconds: float) -> dict:
    return run_wrk(url, body, headers, connections, seconds, timeout_s=WRK_TIMEOUT_S)


# --- one server

def check_answer(server: ServerUnderTest, body: bytes, headers: dict, reference: dict[str, np.ndarray]) -> str | None:
    """None when the server answers `body` with the reference outputs; otherwise what is wrong."""
    status, _, data = http("POST", server.infer_url, body, headers, timeout=60)
    if status != 200:
        return f"HTTP {status}: {data[:300]!r}"
    try:
        got = {o["name"]: o for o in json.loads(data)["outputs"]}
    except (ValueError, KeyError, TypeError) as e:
        return f"not an inference response ({e!r}): {data[:300]!r}"
    for name, want in reference.items():
        if name not in got:
            return f"output '{name}' missing (got {sorted(got)})"
        arr = np.asarray(got[name]["data"], dtype=np.float32).reshape(got[name]["shape"])
        if arr.shape != want.shape:
            return f"output '{name}' has shape {list(arr.shape)}, a direct forward gives {list(want.shape)}"
        err = float(np.max(np.abs(arr - want)))
        if err > 1e-5 * float(np.max(np.abs(want))) + 1e-7:
            return f"output '{name}' differs from a direct forward by up to {err:.3g}"
    return None


def drain(server: ServerUnderTest, body: bytes, headers: dict) -> None:
    """Wait until the requests wrk left queued are answered: one more request returns after them."""
    http("POST", server.infer_url, body, headers, timeout=120)


def measure(server: ServerUnderTest, body: bytes, headers: dict, concurrencies: list[int],
            seconds: float) -> list[dict]:
    """wrk at each concurrency, plus the server's CPU time per request (less noisy than req/s on a busy machine)."""
    wrk(server.infer_url, body, headers, max(concurrencies), 1)  # warm-up: connections, caches, lazy imports
    drain(server, body, headers)
    points = []
    for c in concurrencies:
        cpu0 = server.cpu_seconds()
        r = wrk(server.infer_url, body, headers, c, seconds)
        drain(server, body, headers)
        # the answered requests, the `c` still in flight when wrk stopped (served all the same), and the drain
        served = r["rps"] * max(1, round(seconds)) + c + 1
        cpu_ms = (server.cpu_seconds() - cpu0) * 1000 / served
        points.append({"concurrency": c, **r, "server_cpu_ms_per_request": cpu_ms})
    return points


class OursFrom(Ours):
    """Ours, its code from another checkout (`--baseline`)."""

    root: Path = REPO

    def start(self, timeout: float = 120.0):
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.root), self.env.get("PYTHONPATH")]))
        return ServerUnderTest.start(self, timeout)


@dataclass(frozen=True)
class Setup:
    """One server start: which server, its options, and the rows (label, request body kind) it is measured for."""

    server: str
    options: tuple[tuple[str, object], ...]
    rows: tuple[tuple[str, str], ...]


def setups_for(model: str, args) -> list[Setup]:
    """Ours runs the same pycaffe Net as the peers (backend: pycaffe) for the like-for-like rows; extra rows
    show its binary tensor path and its default backend (auto: ONNX Runtime where parity with pycaffe holds)."""
    plan = []
    for server in args.servers:
        if server == OURS:
            rows = [(OURS, "json")] + ([(OURS_BINARY, "binary")] if model in args.binary_models else [])
            plan.append(Setup(OURS, (("backend", "pycaffe"),), tuple(rows)))
            if model in args.auto_backend_models:
                plan.append(Setup(OURS, (("backend", None),), ((OURS_AUTO, "binary"),)))
            if args.baseline is not None:
                plan.append(Setup(OURS_BASELINE, (("backend", "pycaffe"),), ((OURS_BASELINE, "json"),)))
        elif server == "mlserver":
            plan.append(Setup(server, (("parallel_workers", args.mlserver_parallel_workers),), ((server, "json"),)))
        else:
            plan.append(Setup(server, (), ((server, "json"),)))
    return plan


def run_server(setup: Setup, model: ServedModel, bodies: dict, reference: dict, args, env: dict) -> list[dict]:
    """Start one server for one model, check each row's answer, measure it; rows for the results table."""
    if setup.server == OURS_BASELINE:
        server: ServerUnderTest = OursFrom(model, env, **dict(setup.options))
        server.root = args.baseline.resolve()  # type: ignore[attr-defined]
    else:
        server = SERVERS[setup.server](model, env, **dict(setup.options))
    try:
        server.start()
    except (RuntimeError, TimeoutError) as e:
        print(f"  {setup.server}: did not start: {str(e).splitlines()[0]}", flush=True)
        return [{"server": label, "model": model.name, "error": f"did not start: {e}"} for label, _ in setup.rows]
    rows = []
    try:
        backend = server.backend()
        for label, kind in setup.rows:
            body, headers = bodies[kind]
            wrong = check_answer(server, body, headers, reference)
            if wrong:
                print(f"  {label}: wrong answer, not measured: {wrong}", flush=True)
                rows.append({"server": label, "model": model.name, "error": f"wrong answer: {wrong}"})
                continue
            print(f"  {label} ({backend}): answer matches a direct forward; measuring", flush=True)
            try:
                points = measure(server, body, headers, args.concurrency, args.seconds)
            except Exception as e:  # a failed point must not lose the rest of the run
                print(f"  {label}: measuring failed: {e!r}", flush=True)
                rows.append({"server": label, "model": model.name, "error": f"measuring failed: {e!r}"})
                continue
            rows.extend({"server": label, "model": model.name, "body": kind, "backend": backend, **p} for p in points)
    finally:
        server.stop()
    return rows


# --- report

def best_of_rounds(rows: list[dict]) -> list[dict]:
    """Per server, model and concurrency, the round with the most req/s (its latencies with it).

    Other processes on a shared machine only ever slow a server down, so the best of a few rounds,
    taken in turn, is the fairest estimate of each. A server that failed in any round keeps its error.
    """
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["server"], r["model"], r.get("concurrency"))
        if "error" in r:
            best[key] = r
        elif key not in best or ("error" not in best[key] and r["rps"] > best[key]["rps"]):
            best[key] = r
    errored = {(s, m) for (s, m, c), r in best.items() if "error" in r}
    return [r for (s, m, c), r in best.items() if c is None or (s, m) not in errored]


def ratio_rows(rows: list[dict]) -> list[dict]:
    """For each model and concurrency: ours (JSON, and binary where measured) over each peer."""
    by_key = {(r["server"], r["model"], r["concurrency"]): r for r in rows if "rps" in r}
    out = []
    for (server, model, c), r in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        if server not in OURS_ROWS:
            continue
        for peer in PEERS:
            p = by_key.get((peer, model, c))
            if p and p["rps"] > 0 and p["p50_ms"] > 0:
                out.append({"ours": server, "peer": peer, "model": model, "concurrency": c,
                            "rps_ratio": r["rps"] / p["rps"], "p50_ratio": r["p50_ms"] / p["p50_ms"],
                            "cpu_ratio": r["server_cpu_ms_per_request"] / p["server_cpu_ms_per_request"]})
    return out


def print_table(rows: list[dict], ratios: list[dict], forward_ms: dict[str, float]) -> None:
    print()
    print(f"{'server':<30} {'model':<10} {'conc':>4} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} "
          f"{'CPU ms/req':>10} {'errors':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['server']:<30} {r['model']:<10} {'':>4} {r['error'][:60]}")
            continue
        errs = r["non2xx"] + r["socket_errors"]
        print(f"{r['server']:<30} {r['model']:<10} {r['concurrency']:>4} {r['rps']:>9.1f} {r['p50_ms']:>9.3f} "
              f"{r['p99_ms']:>9.3f} {r['server_cpu_ms_per_request']:>10.3f} {errs:>6}")
    print("\ndirect pycaffe forward p50: " + ", ".join(f"{m} {ms:.3f} ms" for m, ms in forward_ms.items()))
    print("\nratios ours/peer (req/s: above 1 = ours ahead; p50 and CPU per request: below 1 = ours ahead)")
    print(f"{'ours':<30} {'peer':<9} {'model':<10} {'conc':>4} {'req/s':>7} {'p50':>7} {'CPU/req':>7}")
    for q in ratios:
        print(f"{q['ours']:<30} {q['peer']:<9} {q['model']:<10} {q['concurrency']:>4} "
              f"{q['rps_ratio']:>6.2f}x {q['p50_ratio']:>6.2f}x {q['cpu_ratio']:>6.2f}x")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Two rows of bar groups (req/s, p50 ms), one column per model, one bar per server per concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "rps" in r]
    models = list(dict.fromkeys(r["model"] for r in measured))
    order = [*OURS_ROWS, *PEERS]
    servers = sorted(dict.fromkeys(r["server"] for r in measured), key=lambda s: order.index(s) if s in order else 99)
    colors = {OURS: "#1f77b4", OURS_BINARY: "#6baed6", OURS_AUTO: "#9ecae1", OURS_BASELINE: "#aaaaaa",
              "kserve": "#ff7f0e", "mlserver": "#2ca02c"}
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        concs = sorted({r["concurrency"] for r in measured if r["model"] == model})
        present = [s for s in servers if any(r["server"] == s and r["model"] == model for r in measured)]
        width = 0.8 / len(present)
        for row, (key, label) in enumerate((("rps", "requests/s"), ("p50_ms", "p50 latency (ms)"))):
            ax = axes[row][col]
            series = {s: [next((r[key] for r in measured if r["server"] == s and r["model"] == model
                                and r["concurrency"] == c), 0.0) for c in concs] for s in present}
            top = max((v for vals in series.values() for v in vals), default=0.0)
            fmt = "%.2f" if top < 10 else "%.1f" if top < 100 else "%.0f"
            for i, (s, vals) in enumerate(series.items()):
                xs = [j + (i - (len(present) - 1) / 2) * width for j in range(len(concs))]
                bars = ax.bar(xs, vals, width, label=s, color=colors.get(s))
                ax.bar_label(bars, fmt=fmt, fontsize=7)
            ax.set_xticks(range(len(concs)), [f"concurrency {c}" for c in concs])
            ax.set_ylabel(label)
            ax.set_title(f"{model}: {label}")
            ax.margins(y=0.12)
    handles = {s: plt.Rectangle((0, 0), 1, 1, color=colors.get(s)) for s in servers}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def peer_versions() -> dict[str, str]:
    out = {}
    for venv, dist in (("kserve", "kserve"), ("mlserver", "mlserver")):
        try:
            code = f"import importlib.metadata as m; print(m.version('{dist}'))"
            out[dist] = subprocess.run([str(peer_python(venv)), "-c", code],
                                       capture_output=True, text=True, check=True).stdout.strip()
        except (SystemExit, subprocess.CalledProcessError):
            out[dist] = "missing"
    return out


def git_commit() -> str:
    """The commit measured; `+dirty` when the server's code differs from it in the working tree."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "inference_server"], cwd=REPO,
                           capture_output=True, text=True)
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4, help="wrk duration per point (default 4)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="start and measure every server this many times, in turn; report each point's best round")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--servers", nargs="+", default=list(SERVERS), choices=list(SERVERS))
    ap.add_argument("--models", nargs="+", default=["digits", "inception"], choices=["digits", "inception"])
    ap.add_argument("--binary-models", nargs="*", default=["inception"],
                    help="models for which ours is also measured with the binary tensor extension")
    ap.add_argument("--auto-backend-models", nargs="*", default=["inception"],
                    help="models for which ours is also measured with its default backend (auto), binary body")
    ap.add_argument("--blas-threads", type=int, default=1, help="OPENBLAS_NUM_THREADS for every server (default 1)")
    ap.add_argument("--mlserver-parallel-workers", type=int, default=0,
                    help="MLServer's parallel_workers (default 0: inference in the server process)")
    ap.add_argument("--no-setup", action="store_true", help="do not run bench/setup_peers.sh first")
    ap.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                    help="also ours from the checkout DIR (JSON rows, pycaffe), in the same rounds")
    ap.add_argument("--out", type=Path, default=RESULTS / "compare.json")
    ap.add_argument("--plot", type=Path, default=RESULTS / "compare.png")
    args = ap.parse_args()

    env = {"OPENBLAS_NUM_THREADS": str(args.blas_threads), "OMP_NUM_THREADS": str(args.blas_threads),
           "GLOG_minloglevel": "2", "PYTHONUNBUFFERED": "1"}
    os.environ.update(env)  # before `import caffe`: the reference forward runs like the servers do
    if not args.no_setup and any(s in PEERS for s in args.servers):
        subprocess.run(["bash", str(BENCH / "setup_peers.sh")], check=True, stdout=subprocess.DEVNULL)
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    load_before = os.getloadavg()

    tmp = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    tempfile.tempdir = str(tmp)  # the servers' work folders (configs, logs) go in here too
    models = [m for m in prepare_models(tmp) if m.name in args.models]
    forward_ms, inputs, work = {}, {}, []
    for model in models:
        name, x = input_of(model)
        reference, forward_ms[model.name] = reference_forward(model, name, x)
        bodies = {"json": (json_body(name, x), JSON_HEADERS), "binary": binary_body(name, x)}
        inputs[model.name] = {"input": name, "shape": list(x.shape), "json_body_bytes": len(bodies["json"][0]),
                              "binary_body_bytes": len(bodies["binary"][0])}
        print(f"model {model.name}: input {name} {list(x.shape)}, JSON body {len(bodies['json'][0])} bytes, "
              f"direct forward p50 {forward_ms[model.name]:.3f} ms", flush=True)
        work.append((model, bodies, reference))
    all_rows = []
    for rnd in range(1, args.rounds + 1):
        for model, bodies, reference in work:
            print(f"round {rnd}/{args.rounds}, model {model.name}", flush=True)
            for setup in setups_for(model.name, args):
                all_rows.extend({**r, "round": rnd} for r in run_server(setup, model, bodies, reference, args, env))
    rows = best_of_rounds(all_rows)

    ratios = ratio_rows(rows)
    print_table(rows, ratios, forward_ms)
    result = {
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": git_commit(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": {"python": platform.python_version(), **peer_versions(), "pycaffe": pycaffe_dir().name},
        "settings": {"seconds": args.seconds, "rounds": args.rounds, "concurrency": args.concurrency, "env": env,
                     "wrk_timeout_s": WRK_TIMEOUT_S,
                     "mlserver_parallel_workers": args.mlserver_parallel_workers},
        "models": {m: {**inputs[m], "forward_p50_ms": forward_ms[m]} for m in forward_ms},
        "rows": rows,
        "ratios": ratios,
        "all_rounds": all_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(rows, args.plot, f"caffe-serving vs KServe {result['versions']['kserve']} vs MLServer "
         f"{result['versions']['mlserver']} ({started:%Y-%m-%d}, {os.cpu_count()} CPUs, wrk {args.seconds:g} s/point)")
    print(f"\nwrote {args.out} and {args.plot} in {result['duration_s']:.0f} s")
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

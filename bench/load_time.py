"""Time to ready and time to fast of a real `caffeserve serve` process, per backend and cache state.

    python bench/load_time.py [--model inception fcn8s openpose digits big ...] [--before DIR] [--repeat N]
                              [--fcn-size 256] [--pose-size 256] [--serving-loss]

Rows, per model (each a fresh process; wall time from starting it):
- pycaffe: ready (the first 200 from /v2/health/ready).
- auto, cold: empty local and shared cache. Ready, then fast: the moment the model metadata says the check
  has ended (`backend_check` no longer "running"), serving with onnxruntime (or not: the row says which).
- auto, new node: the local cache empty, the shared cache (onnxCache.sharedDir) filled by the cold run: what
  a new pod on another node pays.
- auto, restart: the same local cache again (what a restarted container on the same node pays).
Each row is the median of `--repeat` runs (cold runs with caches of their own).
`--before DIR` (an older checkout, e.g. `git archive <commit> | tar -x -C DIR`) starts its servers the same
way: there `auto` converts, gates and times before ready (ready and fast are one moment); it has no shared
cache, so a new node pays the cold row. `--serving-loss` runs a client at concurrency 1 on a cold auto server
from its ready until its check ends (the answers pycaffe gave meanwhile), then on a pycaffe server for as
long: requests/s and p50 of each.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

from caffe_testing.servers import ServerProcess, http_json  # noqa: E402

MODELS = ("digits", "inception", "fcn8s", "openpose", "big")


def model_files(kind: str, d: Path, fcn_size: int, pose_size: int) -> tuple[Path, Path, str]:
    """(prototxt, weights, a label for the table)."""
    if kind == "digits":
        ex = REPO / "examples" / "digits"
        return ex / "deploy.prototxt", ex / "digits.caffemodel", "digits"
    if kind == "inception":
        import inception_net

        proto, weights = inception_net.write(d)
        return proto, weights, "inception-size (GoogLeNet 3a-4a, 224)"
    if kind in ("fcn8s", "openpose"):
        import big_nets

        if kind == "fcn8s":
            return (*big_nets.write(big_nets.fcn8s(fcn_size), d, kind), f"FCN-8s-size (538 MB, {fcn_size}x{fcn_size})")
        return (*big_nets.write(big_nets.openpose(pose_size), d, kind),
                f"OpenPose-size (209 MB, {pose_size}x{pose_size})")
    if kind == "big":  # tests/test_large_model.py's 560 MB InnerProduct
        import caffe
        from caffe import layers as L

        n = caffe.NetSpec()
        n.data = L.Input(shape=dict(dim=[1, 14_000]))
        n.ip = L.InnerProduct(n.data, num_output=10_000, weight_filler=dict(type="gaussian", std=0.01))
        proto = d / "big.prototxt"
        proto.write_text(str(n.to_proto()))
        net = caffe.Net(str(proto), caffe.TEST)
        weights = d / "big.caffemodel"
        net.save(str(weights))
        del net
        return proto, weights, "560 MB InnerProduct"
    raise SystemExit(f"unknown model {kind}")


def start(cfg: dict, d: Path, env: dict, code_root: Path) -> tuple[ServerProcess, float]:
    # the process's working folder and import path: `-m caffeserve` imports from `code_root`
    server = ServerProcess(cfg, d, env={**env, "PYTHONPATH": str(code_root)}, root=code_root)
    t0 = time.perf_counter()
    server.start(timeout=900)
    return server, t0


def run(cfg: dict, d: Path, env: dict, code_root: Path, loss_s: float = 0.0) -> dict:
    """One server: ready and fast (s from its start), the backend it ends with; with `loss_s`, a client at
    concurrency 1 from ready, for `loss_s` seconds or (auto) until the check ends: its pycaffe answers."""
    server, t0 = start(cfg, d, env, code_root)
    try:
        ready = time.perf_counter() - t0
        out: dict = {"ready": ready}
        client = Client(server.url, cfg["name"]) if loss_s else None
        if client is not None:
            client.start()
            if cfg["backend"] == "pycaffe":
                time.sleep(loss_s)
        while True:
            p = params(server, cfg["name"])
            if p.get("backend_check") != "running":
                break
            time.sleep(0.1)
        out.update(fast=time.perf_counter() - t0, backend=p["backend"], load_seconds=p.get("load_seconds"),
                   check_s=p.get("backend_check_seconds"))
        if client is not None:
            out["client"] = client.finish()
        return out
    finally:
        server.stop()


def params(server: ServerProcess, name: str) -> dict:
    return http_json("GET", server.url + f"/v2/models/{name}")[1]["parameters"]


class Client(threading.Thread):
    """Closed loop at concurrency 1 (one kept-alive connection, binary tensor data): per answer, when it came,
    its latency and the backend that answered (X-Caffeserve-Backend)."""

    def __init__(self, url: str, name: str):
        import numpy as np

        from compare import binary_body

        super().__init__(daemon=True)
        meta = http_json("GET", f"{url}/v2/models/{name}")[1]
        spec = meta["inputs"][0]
        x = np.random.default_rng(0).uniform(-1, 1, [1, *spec["shape"][1:]]).astype(np.float32)
        self.body, self.headers = binary_body(spec["name"], x)
        self.url, self.path = urllib.parse.urlsplit(url), f"/v2/models/{name}/infer"
        self.stop, self.answers, self.t0 = threading.Event(), [], time.perf_counter()

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=120)
        while not self.stop.is_set():
            t = time.perf_counter()
            conn.request("POST", self.path, self.body, self.headers)
            r = conn.getresponse()
            r.read()
            self.answers.append((time.perf_counter() - self.t0, time.perf_counter() - t, r.status,
                                 r.getheader("X-Caffeserve-Backend")))
        conn.close()

    def finish(self) -> dict:
        """Requests/s and p50 (ms) of the pycaffe answers, over the time until the last one."""
        self.stop.set()
        self.join(120)
        pyc = [a for a in self.answers if a[3] == "pycaffe" and a[2] == 200]
        span = pyc[-1][0] if pyc else float("nan")
        return {"rps": len(pyc) / span, "p50_ms": statistics.median(a[1] for a in pyc) * 1000, "span_s": span,
                "n": len(pyc), "errors": sum(a[2] != 200 for a in self.answers)}


def fmt(row: dict) -> str:
    ready, fast, checked = row["ready"], row["fast"], row.get("check_s") is not None
    if row["backend"] == "onnxruntime":
        tail = f"fast {fast:6.1f} s" + ("" if checked else " (onnxruntime from the start)")
    else:
        tail = f"stays pycaffe after its check, at {fast:.1f} s" if checked else "pycaffe"
    return f"ready {ready:6.1f} s   {tail}"


def table(label: str, rows: dict[str, dict]) -> None:
    print(f"\n{label}")
    for name, row in rows.items():
        print(f"  {name:<38} {fmt(row)}", flush=True)


def median(cfg: dict, d: Path, envs: list[dict], root: Path) -> dict:
    """One run per env; ready and fast as medians, the rest from the last run."""
    runs = [run(cfg, d, env, root) for env in envs]
    row = {k: statistics.median(r[k] for r in runs) if k in ("ready", "fast") else runs[-1][k]
           for k in runs[-1] if k != "client"}
    return row


def bench_model(kind: str, args) -> None:
    d = Path(tempfile.mkdtemp(prefix="load-time-"))
    n = range(args.repeat)
    try:
        proto, weights, label = model_files(kind, d, args.fcn_size, args.pose_size)
        cfg = {"name": "m", "model": {"prototxt": str(proto), "weights": str(weights)}}
        pycaffe, auto = {**cfg, "backend": "pycaffe"}, {**cfg, "backend": "auto"}
        rows: dict[str, dict] = {"pycaffe": median(pycaffe, d, [{}] * args.repeat, REPO)}
        if args.before:
            before = args.before.resolve()
            rows["before: auto, cold (= a new node)"] = median(
                auto, d, [{"CAFFESERVE_CACHE_DIR": str(d / f"before-{i}")} for i in n], before)
            rows["before: auto, restart"] = median(auto, d, [{"CAFFESERVE_CACHE_DIR": str(d / "before-0")}] * len(n),
                                                   before)
        # each cold run with caches of its own; the last one's shared cache serves the new nodes
        colds = [run({**auto, "onnxCache": {"sharedDir": str(d / f"shared-{i}")}}, d,
                     {"CAFFESERVE_CACHE_DIR": str(d / f"local-{i}")}, REPO) for i in n]
        rows["after: auto, cold"] = {k: statistics.median(r[k] for r in colds) if k in ("ready", "fast") else v
                                     for k, v in colds[-1].items()}
        shared = {**auto, "onnxCache": {"sharedDir": str(d / f"shared-{n[-1]}")}}
        rows["after: auto, new node (shared cache)"] = median(
            shared, d, [{"CAFFESERVE_CACHE_DIR": str(d / f"new-node-{i}")} for i in n], REPO)
        rows["after: auto, restart"] = median(shared, d, [{"CAFFESERVE_CACHE_DIR": str(d / f"local-{n[-1]}")}] *
                                              len(n), REPO)
        table(label, rows)
        if args.serving_loss:  # runs of their own: load on the server slows its check
            cold = run({**auto, "onnxCache": {"sharedDir": str(d / "shared-loss")}}, d,
                       {"CAFFESERVE_CACHE_DIR": str(d / "local-loss")}, REPO, args.serving_loss)
            during = cold["client"]
            base = run(pycaffe, d, {}, REPO, max(1.0, during["span_s"]))["client"]
            print(f"  serving with pycaffe while the check runs (c=1, binary, {during['span_s']:.1f} s from ready, "
                  f"{during['n']} answers): {during['rps']:.2f} req/s, p50 {during['p50_ms']:.1f} ms; pycaffe alone "
                  f"for as long: {base['rps']:.2f} req/s, p50 {base['p50_ms']:.1f} ms "
                  f"({during['rps'] / base['rps']:.2f}x); errors {during['errors'] + base['errors']}; the check "
                  f"then chose {cold['backend']} ({cold['fast'] - cold['ready']:.1f} s after ready)", flush=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=["inception"], choices=MODELS)
    p.add_argument("--before", type=Path, help="an older checkout to time the same way")
    p.add_argument("--repeat", type=int, default=1, help="runs of the pycaffe and warm rows (the median is printed)")
    p.add_argument("--fcn-size", type=int, default=256, help="FCN-8s input height and width")
    p.add_argument("--pose-size", type=int, default=256, help="OpenPose input height and width")
    p.add_argument("--serving-loss", action="store_true",
                   help="a client at c=1 on a cold auto server until its check ends, and on pycaffe as long")
    args = p.parse_args()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"commit {commit}; {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    for kind in args.model:
        bench_model(kind, args)


if __name__ == "__main__":
    os.environ.setdefault("GLOG_minloglevel", "2")
    main()

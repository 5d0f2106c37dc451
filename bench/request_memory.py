"""Peak memory and event-loop stalls of one server under large JSON bodies (issue 15's corpus).

    python bench/request_memory.py [--repo DIR] [--scenarios numbers,trailing-string,...]

Each scenario runs against a fresh `caffeserve serve` (so that its peak RSS, VmHWM, is the
scenario's own) and prints: the statuses, the server's RSS when ready and at its peak, and the
longest answer time of `GET /v2/health/live`, polled every 10 ms on a keep-alive connection while
the bodies are sent and decoded. `--repo` runs the server from another checkout (e.g. an export of
an older commit) to compare before and after.

Scenarios (a dense net with input [N, 784] and maxBatch 64, as the digits model):
- numbers: a 60 MiB body of 12.6 M numbers (refused: its batch is above maxBatch)
- trailing-string: the same with one string at the end (refused: not all numbers)
- 4x-trailing-string: four of those at once
- valid: a pooling net with a [1, 4, 1024, 1024] input, a valid request of 4.2 M numbers
  (answered 200); the peak is compared with its decoded FP32 tensor (16 MiB)
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from caffe_testing.bodies import ISSUE_NUMBERS, json_body as body, rss  # noqa: E402
from caffe_testing.servers import free_port  # noqa: E402

MiB = 1024 * 1024


class Server:
    def __init__(self, repo: Path, cfg: dict, tmp: Path):
        path = tmp / f"server-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": f"{repo}:{repo}/operator"}
        self.proc = subprocess.Popen([sys.executable, "-m", "caffeserve", "serve", "--config", str(path),
                                      "--port", str(self.port), "--log-level", "WARNING"], cwd=repo, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/v2/health/ready")
                if c.getresponse().status == 200:
                    c.close()
                    return
                c.close()
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server not ready")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def post(port: int, model: str, payload: bytes, out: list, i: int):
    t0 = time.monotonic()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        c.request("POST", f"/v2/models/{model}/infer", payload, {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        out[i] = (r.status, round(time.monotonic() - t0, 2), data[:100])
        c.close()
    except Exception as e:  # a reset is a result too
        out[i] = (type(e).__name__, round(time.monotonic() - t0, 2), b"")


def run(repo: Path, model: str, cfg: dict, payload: bytes, copies: int, tmp: Path, tensor_bytes: int | None):
    server = Server(repo, cfg, tmp)
    try:
        ready_rss, _ = rss(server.proc.pid)
        stop = threading.Event()
        worst = [0.0]

        def probe():
            c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            while not stop.is_set():
                t0 = time.monotonic()
                c.request("GET", "/v2/health/live")
                c.getresponse().read()
                worst[0] = max(worst[0], time.monotonic() - t0)
                time.sleep(0.01)
            c.close()

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        time.sleep(0.3)
        results: list = [None] * copies
        threads = [threading.Thread(target=post, args=(server.port, model, payload, results, i)) for i in range(copies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.3)
        stop.set()
        prober.join(60)
        _, peak = rss(server.proc.pid)
        line = (f"  statuses {[r[0] for r in results]}, seconds {[r[1] for r in results]}\n"
                f"  RSS ready {ready_rss / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB"
                f" (+{(peak - ready_rss) / MiB:.0f} MiB)"
                f"; longest /v2/health/live answer {worst[0] * 1000:.0f} ms")
        if tensor_bytes:
            line += f"\n  peak growth / decoded tensor: {(peak - ready_rss) / tensor_bytes:.1f}x"
        for r in results:
            if r[0] != 200:
                line += f"\n  e.g. {r[2][:100]!r}"
                break
        return line
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=REPO, help="checkout to run the server from")
    p.add_argument("--scenarios", default="numbers,trailing-string,4x-trailing-string,valid")
    p.add_argument("--backend", default="pycaffe", help="the servers' backend (pycaffe, onnxruntime, auto)")
    args = p.parse_args()
    import caffe
    from caffe import layers as L, params as P

    from caffe_testing.nets import dense_net, save_net

    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    proto, weights = save_net(dense_net(784, 10), tmp, "dense")
    dense = {"name": "dense", "model": {"prototxt": str(proto), "weights": str(weights)}, "backend": args.backend}
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4, 1024, 1024]))
    n.out = L.Pooling(n.data, pool=P.Pooling.AVE, global_pooling=True)
    pproto, pweights = save_net(n, tmp, "pool")
    pool = {"name": "pool", "model": {"prototxt": str(pproto), "weights": str(pweights)}, "backend": args.backend}

    count = ISSUE_NUMBERS
    print(f"server from {args.repo}")
    for name in args.scenarios.split(","):
        if name == "numbers":
            payload, copies, model, cfg, tensor = body([16071, 784], count), 1, "dense", dense, None
        elif name == "trailing-string":
            payload, copies, model, cfg, tensor = body([count + 1], count, True), 1, "dense", dense, None
        elif name == "4x-trailing-string":
            payload, copies, model, cfg, tensor = body([count + 1], count, True), 4, "dense", dense, None
        elif name == "valid":
            payload, copies, model, cfg, tensor = body([1, 4, 1024, 1024], 4 * MiB), 1, "pool", pool, 16 * MiB
        else:
            raise SystemExit(f"unknown scenario {name}")
        print(f"{name}: {copies} x {len(payload) / MiB:.1f} MiB body")
        print(run(args.repo, model, cfg, payload, copies, tmp, tensor), flush=True)


if __name__ == "__main__":
    main()

"""Does `instances: 2` overlap? Served throughput of one mid-size net with 1 and 2 Net copies, in one run.

pycaffe's own binding holds the GIL for the whole forward pass, so two worker threads would take
turns; scripts/caffe/apply_patches.py patches `Net._forward` to release it. This prints the direct
two-thread forward rate too, which shows whether the installed pycaffe has the patch.

    .venv/bin/python bench/instances.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson

# one BLAS thread per Net, set before Caffe loads OpenBLAS: otherwise each forward fans out over every
# core and two Nets fight over them (the server sets this itself, per `instances`)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from caffe_testing.nets import save_net  # noqa: E402
from caffe_testing.servers import ServerProcess  # noqa: E402
from wrk import run_wrk  # noqa: E402


def build_net(directory: Path):
    import caffe
    from caffe import layers as L

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 64, 64]))
    n.c1 = L.Convolution(n.data, num_output=32, kernel_size=3, pad=1)
    n.r1 = L.ReLU(n.c1, in_place=True)
    n.c2 = L.Convolution(n.r1, num_output=32, kernel_size=3, pad=1)
    n.ip = L.InnerProduct(n.c2, num_output=10)
    return save_net(n, directory, "midnet")


def direct_rate(proto, weights, threads: int, seconds: float = 2.0) -> float:
    """Forward passes per second with `threads` threads, each owning its own Net."""
    import caffe

    counts = [0] * threads
    stop = time.monotonic() + seconds

    def work(i):
        caffe.set_mode_cpu()
        net = caffe.Net(str(proto), caffe.TEST, weights=str(weights))
        net.blobs["data"].data[...] = 0.5
        barrier.wait()
        while time.monotonic() < stop:
            net.forward()
            counts[i] += 1

    barrier = threading.Barrier(threads)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return sum(counts) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        proto, weights = build_net(Path(d))
        one, two = direct_rate(proto, weights, 1), direct_rate(proto, weights, 2)
        print(f"direct pycaffe, one Net per thread: 1 thread {one:.0f}/s, 2 threads {two:.0f}/s ({two / one:.2f}x)")
        x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
        body = orjson.dumps({"inputs": [{"name": "data", "shape": [1, 3, 64, 64], "datatype": "FP32",
                                         "data": x.ravel().tolist()}]})
        rates = {}
        for instances in (1, 2):
            cfg = {"name": "midnet", "model": {"prototxt": str(proto), "weights": str(weights)}, "instances": instances}
            with ServerProcess(cfg, Path(d), env={"OPENBLAS_NUM_THREADS": "1"}) as server:
                url = f"{server.url}/v2/models/midnet/infer"
                run_wrk(url, body, {"Content-Type": "application/json"}, 4, 1)
                r = run_wrk(url, body, {"Content-Type": "application/json"}, 4, args.seconds)
                rates[instances] = r
                print(f"served, instances {instances}, concurrency 4: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
                      f"p99 {r['p99_ms']:.2f} ms")
        print(f"instances 2 / instances 1 throughput: {rates[2]['rps'] / rates[1]['rps']:.2f}x")


if __name__ == "__main__":
    main()

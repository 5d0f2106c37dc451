"""Load time of a real `caffeserve serve` process, start to ready, per backend and cache state.

    python bench/load_time.py [--model digits|inception|big] [--before DIR] [--repeat N]

For each model: pycaffe; auto with an empty ONNX cache (convert, gate, time); auto restarted on that
cache; and the load probe alone (the child process that catches Caffe's aborts). Wall time is measured
from starting the process to the first 200 from /v2/health/ready, the same way for every row; the
server's own `load_seconds` (metadata) is printed beside it. `--before DIR` also starts the servers of
an older checkout (e.g. `git archive <commit> | tar -x -C DIR`) the same way, for a before/after (it must
have the `caffeserve` package: the figures in docs/onnx.md for e267cbb, older, were taken with
`-m caffeserve`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import caffe_testing.servers as server_process  # noqa: E402
from caffe_testing.servers import ServerProcess, http_json  # noqa: E402


def model_files(kind: str, d: Path) -> tuple[Path, Path, dict]:
    if kind == "digits":
        ex = REPO / "examples" / "digits"
        return ex / "deploy.prototxt", ex / "digits.caffemodel", {}
    if kind == "inception":
        import inception_net

        proto, weights = inception_net.write(d)
        return proto, weights, {}
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
        return proto, weights, {}
    raise SystemExit(f"unknown model {kind}")


def time_to_ready(cfg: dict, d: Path, env: dict, code_root: Path) -> tuple[float, dict]:
    server = ServerProcess(cfg, d, env={**env, "PYTHONPATH": str(code_root)})
    server_process.REPO = code_root  # the process's working folder: `-m caffeserve` imports from it
    t0 = time.perf_counter()
    with server:
        wall = time.perf_counter() - t0
        params = http_json("GET", server.url + f"/v2/models/{cfg['name']}")[1]["parameters"]
    return wall, params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="inception", choices=["digits", "inception", "big"])
    p.add_argument("--before", type=Path, help="an older checkout to time the same way")
    p.add_argument("--repeat", type=int, default=3, help="runs per row (the median is printed)")
    args = p.parse_args()
    d = Path(tempfile.mkdtemp(prefix="load-time-"))
    try:
        proto, weights, extra = model_files(args.model, d)
        cfg = {"name": "m", "model": {"prototxt": str(proto), "weights": str(weights)}, **extra}
        roots = [("after", REPO)] + ([("before", args.before.resolve())] if args.before else [])
        for label, root in roots:
            cache = d / f"cache-{label}"
            rows = {}
            for name, backend, fresh in (("pycaffe", "pycaffe", False), ("auto, empty cache", "auto", True),
                                         ("auto, cached", "auto", False)):
                walls, loads, chosen = [], [], ""
                for _ in range(args.repeat if not fresh else 1):
                    if fresh:
                        shutil.rmtree(cache, ignore_errors=True)
                    wall, params = time_to_ready({**cfg, "backend": backend}, d,
                                                 {"CAFFESERVE_CACHE_DIR": str(cache)}, root)
                    walls.append(wall)
                    loads.append(params.get("load_seconds"))
                    chosen = params["backend"]
                load = statistics.median(x for x in loads if x is not None) if any(loads) else None
                rows[name] = statistics.median(walls)
                parts = {k: v for k, v in params.items() if k.startswith(("backend_", "load_probe"))
                         and isinstance(v, (int, float))}
                print(f"{args.model:<9} {label:<6} {name:<18} ready in {rows[name]:6.2f} s (median of {len(walls)})"
                      + (f", load_seconds {load:.2f}" if load is not None else "") + f", serving with {chosen}"
                      + (f"; last run: {parts}" if parts else ""), flush=True)
            print(f"{args.model:<9} {label:<6} cached auto / pycaffe = {rows['auto, cached'] / rows['pycaffe']:.2f}×")
        if not args.before:
            from inference_server.config import parse_config
            from inference_server.loading.child_load import probe_load

            probes = [probe_load(parse_config({**cfg, "backend": b})).seconds
                      for b in ("pycaffe", "auto") for _ in range(args.repeat)]
            print(f"{args.model:<9} load probe alone: {statistics.median(probes):.2f} s (median of {len(probes)})")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("GLOG_minloglevel", "2")
    main()

"""pycaffe vs ONNX Runtime on the digits net and three zoo-shaped nets, in one short run.

For each net: forward p50 of each backend at batch 1 and 8 (same process, same input), the ratio,
and the parity gate's max |Δ|; then the served requests/s at concurrency 4 through
`caffeserve serve` with each backend (load from wrk, binary tensor bodies). The zoo-shaped nets are
built with NetSpec and He-initialised random weights: an inception block stack, a residual stack
with BatchNorm+Scale, and a depthwise-separable (MobileNet-style) stack, all on 3×112×112 inputs.

    .venv/bin/python bench/backends.py [--iterations 10] [--seconds 5] [--skip-serving]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import caffe  # noqa: E402
from caffe import layers as L, params as P  # noqa: E402

from inference_server.backends import BackendChoice, create_backend  # noqa: E402
from inference_server.config import load_config, parse_config  # noqa: E402
from inference_server.loading.selection import evaluate  # noqa: E402

SIZE = 112


def conv_bn_relu(n, name, bottom, out, k=3, stride=1, pad=None, group=1):
    c = L.Convolution(bottom, num_output=out, kernel_size=k, stride=stride,
                      pad=(k - 1) // 2 if pad is None else pad, group=group, bias_term=False)
    setattr(n, name, c)
    setattr(n, f"{name}_bn", L.BatchNorm(c, in_place=True))
    setattr(n, f"{name}_scale", L.Scale(c, bias_term=True, in_place=True))
    setattr(n, f"{name}_relu", L.ReLU(c, in_place=True))
    return c


def head(n, x, classes=1000):
    n.gpool = L.Pooling(x, pool=P.Pooling.AVE, global_pooling=True)
    n.logits = L.InnerProduct(n.gpool, num_output=classes)
    n.prob = L.Softmax(n.logits)
    return n


def inception_stack() -> caffe.NetSpec:
    """GoogLeNet-style: stem, then 4 inception blocks (1x1, 3x3, 5x5, pool-proj branches + Concat)."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, SIZE, SIZE]))
    n.stem = L.Convolution(n.data, num_output=64, kernel_size=7, stride=2, pad=3)
    n.stem_relu = L.ReLU(n.stem, in_place=True)
    x = n.stem_pool = L.Pooling(n.stem, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    for i, width in enumerate((64, 96, 128, 128)):
        b = f"inc{i}"
        b1 = L.Convolution(x, num_output=width, kernel_size=1)
        setattr(n, f"{b}_1x1", b1)
        setattr(n, f"{b}_1x1_relu", L.ReLU(b1, in_place=True))
        r3 = L.Convolution(x, num_output=width // 2, kernel_size=1)
        setattr(n, f"{b}_3x3r", r3)
        setattr(n, f"{b}_3x3r_relu", L.ReLU(r3, in_place=True))
        b3 = L.Convolution(r3, num_output=width, kernel_size=3, pad=1)
        setattr(n, f"{b}_3x3", b3)
        setattr(n, f"{b}_3x3_relu", L.ReLU(b3, in_place=True))
        r5 = L.Convolution(x, num_output=width // 4, kernel_size=1)
        setattr(n, f"{b}_5x5r", r5)
        setattr(n, f"{b}_5x5r_relu", L.ReLU(r5, in_place=True))
        b5 = L.Convolution(r5, num_output=width // 2, kernel_size=5, pad=2)
        setattr(n, f"{b}_5x5", b5)
        setattr(n, f"{b}_5x5_relu", L.ReLU(b5, in_place=True))
        pool = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=1, pad=1)
        setattr(n, f"{b}_pool", pool)
        pp = L.Convolution(pool, num_output=width // 2, kernel_size=1)
        setattr(n, f"{b}_pool_proj", pp)
        setattr(n, f"{b}_pool_proj_relu", L.ReLU(pp, in_place=True))
        x = L.Concat(b1, b3, b5, pp)
        setattr(n, f"{b}_out", x)
        if i == 1:
            x = n.inc_pool = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    return head(n, x)


def residual_stack() -> caffe.NetSpec:
    """ResNet-style: stem, then 3 stages of 2 basic blocks (conv-BN-Scale-ReLU ×2 + shortcut Eltwise)."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, SIZE, SIZE]))
    x = conv_bn_relu(n, "stem", n.data, 64, k=7, stride=2)
    x = n.stem_pool = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    channels = 64
    for s, width in enumerate((64, 128, 256)):
        for blk in range(2):
            name = f"res{s}_{blk}"
            stride = 2 if s > 0 and blk == 0 else 1
            y = conv_bn_relu(n, f"{name}_a", x, width, stride=stride)
            y = L.Convolution(y, num_output=width, kernel_size=3, pad=1, bias_term=False)
            setattr(n, f"{name}_b", y)
            setattr(n, f"{name}_b_bn", L.BatchNorm(y, in_place=True))
            setattr(n, f"{name}_b_scale", L.Scale(y, bias_term=True, in_place=True))
            if stride != 1 or channels != width:
                x = L.Convolution(x, num_output=width, kernel_size=1, stride=stride, bias_term=False)
                setattr(n, f"{name}_proj", x)
                setattr(n, f"{name}_proj_bn", L.BatchNorm(x, in_place=True))
                setattr(n, f"{name}_proj_scale", L.Scale(x, bias_term=True, in_place=True))
            x = L.Eltwise(x, y)
            setattr(n, f"{name}_sum", x)
            setattr(n, f"{name}_relu", L.ReLU(x, in_place=True))
            channels = width
    return head(n, x)


def depthwise_stack() -> caffe.NetSpec:
    """MobileNet-style: stem, then 8 depthwise 3x3 + pointwise 1x1 pairs with BatchNorm+Scale+ReLU."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, SIZE, SIZE]))
    x = conv_bn_relu(n, "stem", n.data, 32, stride=2)
    channels = 32
    for i, (width, stride) in enumerate(
        ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1))
    ):
        x = conv_bn_relu(n, f"dw{i}", x, channels, stride=stride, group=channels)
        x = conv_bn_relu(n, f"pw{i}", x, width, k=1)
        channels = width
    return head(n, x)


def save_he_init(netspec, directory: Path, name: str, seed: int = 0) -> tuple[Path, Path]:
    """Prototxt + caffemodel with He-initialised weights and plausible BatchNorm statistics."""
    proto = directory / f"{name}.prototxt"
    proto.write_text(str(netspec.to_proto()))
    net = caffe.Net(str(proto), caffe.TEST)
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        blobs = layer.blobs
        if layer.type == "BatchNorm":
            blobs[0].data[...] = rng.normal(0, 0.1, blobs[0].data.shape)
            blobs[1].data[...] = rng.uniform(0.5, 1.5, blobs[1].data.shape)
            blobs[2].data[...] = 1.0
        elif layer.type == "Scale":
            blobs[0].data[...] = rng.uniform(0.8, 1.2, blobs[0].data.shape)
            blobs[1].data[...] = rng.normal(0, 0.05, blobs[1].data.shape)
        elif len(blobs):
            w = blobs[0].data
            fan_in = int(np.prod(w.shape[1:]))
            w[...] = rng.normal(0, np.sqrt(2.0 / fan_in), w.shape)
            if len(blobs) > 1:
                blobs[1].data[...] = 0.0
    weights = directory / f"{name}.caffemodel"
    net.save(str(weights))
    return proto, weights


def p50_ms(backend, x: np.ndarray, output: str, iterations: int) -> float:
    backend.infer({"data": x}, [output])
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        backend.infer({"data": x}, [output])
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def binary_body(x: np.ndarray, output: str) -> tuple[bytes, dict]:
    head_ = orjson.dumps({"inputs": [{"name": "data", "shape": list(x.shape), "datatype": "FP32",
                                      "parameters": {"binary_data_size": x.nbytes}}],
                          "outputs": [{"name": output, "parameters": {"binary_data": True}}]})
    return head_ + x.tobytes(), {"Content-Type": "application/octet-stream",
                                 "Inference-Header-Content-Length": str(len(head_))}


def served_rps(cfg_dict: dict, tmp: Path, x: np.ndarray, output: str, seconds: float) -> dict:
    from caffe_testing.servers import ServerProcess
    from wrk import run_wrk

    with ServerProcess(cfg_dict, tmp, env={"CAFFESERVE_CACHE_DIR": os.environ["CAFFESERVE_CACHE_DIR"]},
                       ) as server:
        url = f"{server.url}/v2/models/{cfg_dict['name']}/infer"
        body, headers = binary_body(x, output)
        run_wrk(url, body, headers, 4, 1)  # warm-up
        return run_wrk(url, body, headers, 4, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=10, help="timed forwards per backend and batch size")
    ap.add_argument("--seconds", type=float, default=5, help="wrk duration per served measurement")
    ap.add_argument("--skip-serving", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as d:
        tmp = Path(d)
        os.environ.setdefault("CAFFESERVE_CACHE_DIR", str(tmp / "onnx-cache"))
        run(args, tmp)


def run(args, tmp: Path) -> None:
    digits = load_config(ROOT / "examples/digits/server.yaml")
    nets = [("digits", digits.path(digits.model.prototxt), digits.path(digits.model.weights))]
    for name, build in (("inception", inception_stack), ("residual_bn", residual_stack),
                        ("depthwise", depthwise_stack)):
        nets.append((name, *save_he_init(build(), tmp, name)))

    rows, served = [], []
    for name, proto, weights in nets:
        cfg_dict = {"name": name, "backend": "onnxruntime", "model": {"prototxt": str(proto), "weights": str(weights)}}
        cfg = parse_config(cfg_dict)
        ev = evaluate(cfg)
        if ev.problem:
            print(f"{name}: {ev.problem}")
            continue
        ort_backend = create_backend(cfg, BackendChoice("onnxruntime", "bench", ev.details, ev.artifact))
        caffe_backend = create_backend(cfg, BackendChoice("pycaffe", "bench"))
        shape = ort_backend.describe().inputs[0].shape
        for batch in (1, 8):
            x = np.random.default_rng(batch).normal(0, 1, (batch, *shape[1:])).astype(np.float32)
            iters = args.iterations if batch == 1 else max(3, args.iterations // 3)
            t_caffe = p50_ms(caffe_backend, x, "prob", iters)
            t_ort = p50_ms(ort_backend, x, "prob", iters)
            d = ev.details
            rows.append(
                (name, batch, t_caffe, t_ort, d["parity_max_abs_diff"], d["parity_max_abs_ref"], d["parity_worst_blob"])
            )
        del ort_backend, caffe_backend
        if not args.skip_serving and name in ("digits", "depthwise"):
            x = np.random.default_rng(0).normal(0, 1, (1, *shape[1:])).astype(np.float32)
            for backend in ("pycaffe", "onnxruntime"):
                r = served_rps({**cfg_dict, "backend": backend}, tmp, x, "prob", args.seconds)
                served.append((name, backend, r))

    print(f"\nforward p50 (ms), same process, {os.cpu_count()} CPUs")
    print(
        f"{'net':<12} {'batch':>5} {'pycaffe':>9} {'onnxrt':>9} {'speed-up':>8} "
        f"{'parity max|Δ|':>14} {'max|ref|':>9}  blob"
    )
    for name, batch, tc, to, diff, ref, blob in rows:
        print(f"{name:<12} {batch:>5} {tc:>9.3f} {to:>9.3f} {tc / to:>7.2f}× {diff:>14.2e} {ref:>9.3g}  {blob}")
    if served:
        print("\nserved, concurrency 4, binary tensor bodies (wrk)")
        print(f"{'net':<12} {'backend':<12} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        for name, backend, r in served:
            print(f"{name:<12} {backend:<12} {r['rps']:>8.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
                  f"{r['non2xx'] + r['socket_errors']:>6}")


if __name__ == "__main__":
    main()

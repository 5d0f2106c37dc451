#!/usr/bin/env python3
"""The GPU checks of the CUDA pycaffe and the server, in one run (scripts/gpu_check.sh runs this).

    python scripts/gpu_check.py --out DIR [--refs DIR] [--budget-s 420]

Writes DIR/gpu_check.json (every figure) and prints one line per result. Where no GPU is visible
(a rehearsal on a CPU machine) every GPU step prints `SKIP (no GPU visible: <reason>)` and the CPU
parts still run: pycaffe's CPU mode on the three nets (against the CPU build's answers in --refs
where given), the server answering digits on the CPU, and the server refusing `device: gpu` with
its clear message.

1. parity: pycaffe GPU vs CPU mode on digits (examples/digits), an inception-size net (GoogLeNet's
   stem and blocks 3a-4a at 224x224, bench/inception_net.py) and a residual net with BatchNorm+Scale
   (ResNet-18-shaped at 224x224): max|delta| relative to the largest logit.
2. `caffeserve serve` with device gpu answering digits over HTTP; its metadata says gpu.
3. GPU forward throughput at batch 1, 2, 4 .. 64 on the inception-size net, and what
   `batching: auto` decides on the GPU.
4. `instances: 2` on one GPU: concurrent requests all answered, all equal to the reference.
5. an out-of-memory request: a batch that needs more GPU memory than there is gets an error with a
   message, and the server answers correctly afterwards.
6. the server's GPU memory at rest and under load (nvidia-smi).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

RESULTS: dict = {"steps": {}}
START = time.monotonic()


def say(step: str, text: str, **figures) -> None:
    print(f"[gpu_check] {step}: {text}", flush=True)
    RESULTS["steps"].setdefault(step, {}).update(figures, summary=text)


def skip(step: str, why: str) -> None:
    say(step, f"SKIP (no GPU visible: {why})", skipped=True)


# ------------------------------------------------------------------------------------------ nets
def residual_netspec(size: int = 224):
    """ResNet-18-shaped: 7x7 stem, 4 stages of 2 basic blocks, conv-BatchNorm-Scale-ReLU, Eltwise shortcuts."""
    import caffe
    from caffe import layers as L, params as P

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, size, size]))

    def cbr(name, bottom, out, k=3, stride=1, relu=True):
        c = L.Convolution(bottom, num_output=out, kernel_size=k, stride=stride, pad=(k - 1) // 2, bias_term=False)
        setattr(n, name, c)
        setattr(n, f"{name}_bn", L.BatchNorm(c, in_place=True))
        setattr(n, f"{name}_scale", L.Scale(c, bias_term=True, in_place=True))
        if relu:
            setattr(n, f"{name}_relu", L.ReLU(c, in_place=True))
        return c

    x = cbr("stem", n.data, 64, k=7, stride=2)
    x = n.stem_pool = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    channels = 64
    for s, width in enumerate((64, 128, 256, 512)):
        for b in range(2):
            stride = 2 if s > 0 and b == 0 else 1
            y = cbr(f"r{s}{b}a", x, width, stride=stride)
            y = cbr(f"r{s}{b}b", y, width, relu=False)
            if stride != 1 or channels != width:
                x = cbr(f"r{s}{b}p", x, width, k=1, stride=stride, relu=False)
            x = L.Eltwise(x, y)
            setattr(n, f"r{s}{b}sum", x)
            setattr(n, f"r{s}{b}relu", L.ReLU(x, in_place=True))
            channels = width
    n.gpool = L.Pooling(x, pool=P.Pooling.AVE, global_pooling=True)
    n.fc = L.InnerProduct(n.gpool, num_output=1000)
    n.prob = L.Softmax(n.fc)
    return n


def hungry_netspec(elements: int = 2**27, copies: int = 16):
    """A net whose blobs take `copies` x `elements` floats per item (8 GiB by default) and that computes
    little: Tile blows the 8x8 input up, Power layers (not in place) copy it, Reduction sums it."""
    import caffe
    from caffe import layers as L, params as P

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 8, 8]))
    n.wide = L.Tile(n.data, axis=1, tiles=elements // 64)
    x = n.wide
    for i in range(copies - 1):
        x = L.Power(x, power=1.0, scale=1.0 / (i + 2), shift=0.0)
        setattr(n, f"copy{i}", x)
    n.total = L.Reduction(x, operation=P.Reduction.MEAN, axis=1)
    return n


def save_he(netspec, directory: Path, name: str, seed: int) -> tuple[Path, Path]:
    """NAME.prototxt and NAME.caffemodel with He-initialised weights and BatchNorm statistics near
    the identity, so that activations stay O(1) through a deep net."""
    import caffe

    directory.mkdir(parents=True, exist_ok=True)
    proto = directory / f"{name}.prototxt"
    proto.write_text(str(netspec.to_proto()))
    net = caffe.Net(str(proto), caffe.TEST)
    rng = np.random.default_rng(seed)
    types = {n: layer.type for n, layer in zip(net._layer_names, net.layers)}
    for layer, blobs in net.params.items():
        if types[layer] == "BatchNorm":
            blobs[0].data[...] = rng.normal(0, 0.1, blobs[0].data.shape)
            blobs[1].data[...] = rng.uniform(0.5, 1.5, blobs[1].data.shape)
            blobs[2].data[...] = 1.0
        elif types[layer] == "Scale":
            blobs[0].data[...] = rng.uniform(0.5, 1.5, blobs[0].data.shape)
            if len(blobs) > 1:
                blobs[1].data[...] = rng.normal(0, 0.1, blobs[1].data.shape)
        else:
            w = blobs[0].data
            w[...] = rng.normal(0.0, np.sqrt(2.0 / int(np.prod(w.shape[1:]))), w.shape)
            if len(blobs) > 1:
                blobs[1].data[...] = rng.normal(0.0, 0.01, blobs[1].data.shape)
    weights = directory / f"{name}.caffemodel"
    net.save(str(weights))
    return proto, weights


def make_nets(work: Path) -> dict:
    """{name: (prototxt, weights, input blob, input shape for one item, logit blob)}."""
    import inception_net

    digits = REPO / "examples" / "digits"
    nets = {"digits": (digits / "deploy.prototxt", digits / "digits.caffemodel", "data", (1, 8, 8), None)}
    proto, weights = inception_net.write(work / "inception")
    nets["inception"] = (proto, weights, "data", (3, 224, 224), "fc")
    proto, weights = save_he(residual_netspec(), work / "residual", "residual", seed=1)
    nets["residual"] = (proto, weights, "data", (3, 224, 224), "fc")
    proto = work / "hungry.prototxt"
    proto.write_text(str(hungry_netspec().to_proto()))
    import caffe

    caffe.set_mode_cpu()
    caffe.Net(str(proto), caffe.TEST).save(str(work / "hungry.caffemodel"))  # no parameters
    nets["hungry"] = (proto, work / "hungry.caffemodel", "data", (1, 8, 8), None)
    return nets


def logit_blob(net, declared: str | None) -> str:
    if declared:
        return declared
    # The blob feeding the final Softmax (the logits); else the last output.
    names = list(net.blobs.keys())
    if net.layers[-1].type == "Softmax":
        return names[-2]
    return net.outputs[-1]


def forward(proto, weights, feed: dict, blobs: list[str]) -> dict:
    import caffe

    net = caffe.Net(str(proto), caffe.TEST, weights=str(weights))
    for k, v in feed.items():
        net.blobs[k].reshape(*v.shape)
    net.reshape()
    for k, v in feed.items():
        net.blobs[k].data[...] = v
    net.forward()
    return {b: net.blobs[b].data.copy() for b in blobs}


# ------------------------------------------------------------------------------------------ HTTP
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, payload=None, timeout: float = 120):
    body = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"error": raw.decode(errors="replace")}


def infer_payload(name: str, x: np.ndarray) -> dict:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


class Server:
    """`caffeserve serve` on loopback with a config written to `work`."""

    def __init__(self, work: Path, config: dict, ready: bool = True):
        import yaml

        self.path = work / f"{config['name']}-{time.monotonic_ns()}.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / f"{self.path.stem}.log"
        self.ready = ready
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "caffeserve", "serve", "--config", str(self.path),
                                      "--port", str(self.port)], cwd=REPO, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        path = "/v2/health/ready" if self.ready else "/v2/health/live"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                status, body = http("GET", self.url + path, timeout=2)
                if status == 200:
                    return self
                if self.ready and "failed" in (body or {}).get("error", ""):
                    raise RuntimeError(f"the model failed to load: {body['error']}")
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not up in 180 s: {self.log.read_text()[-3000:]}")

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def smi(pid: int | None = None) -> dict:
    """GPU memory from nvidia-smi: this process's (where the driver can map it) and the whole GPU's, MiB."""
    out = {}
    if shutil.which("nvidia-smi") is None:
        return out
    q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True)
    if q.returncode == 0 and q.stdout.strip():
        used, total = (int(v) for v in q.stdout.splitlines()[0].split(","))
        out.update(gpu_used_mib=used, gpu_total_mib=total)
    q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True)
    apps = {}
    for line in q.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            apps[int(parts[0])] = int(parts[1])
    if pid is not None and pid in apps:
        out["process_mib"] = apps[pid]
    out["compute_apps"] = len(apps)
    return out


# ------------------------------------------------------------------------------------------ steps
def step_parity(nets, gpu: bool, refs: Path | None) -> None:
    import caffe

    rng = np.random.default_rng(0)
    for name in ("digits", "inception", "residual"):
        proto, weights, inp, shape, declared = nets[name]
        batch = 8 if name == "digits" else 4
        x = (rng.random((batch, *shape), dtype=np.float32) * (16 if name == "digits" else 1)).astype(np.float32)
        if name == "digits" and refs is not None and (refs / "digits.npz").exists():
            ref = np.load(refs / "digits.npz")
            x = ref["input"]
        caffe.set_mode_cpu()
        probe = caffe.Net(str(proto), caffe.TEST, weights=str(weights))
        logits = logit_blob(probe, declared)
        out_name = probe.outputs[-1]
        del probe
        cpu = forward(proto, weights, {inp: x}, [logits, out_name])
        scale = float(np.abs(cpu[logits]).max())
        figures = {"batch": int(x.shape[0]), "logit_blob": logits, "largest_logit": scale}
        if name == "digits" and refs is not None and (refs / "digits.npz").exists():
            built = np.load(refs / "digits.npz")
            figures["cpu_mode_vs_cpu_build_rel"] = float(np.abs(cpu[logits] - built[logits]).max() / scale)
        if not gpu:
            say(f"parity.{name}", f"CPU mode ran (largest logit {scale:.3g})"
                + (f", vs the CPU build {figures['cpu_mode_vs_cpu_build_rel']:.2e}" if "cpu_mode_vs_cpu_build_rel" in figures else "")
                + "; GPU SKIP (no GPU visible)", **figures, skipped_gpu=True)
            continue
        caffe.set_device(0)
        caffe.set_mode_gpu()
        dev = forward(proto, weights, {inp: x}, [logits, out_name])
        caffe.set_mode_cpu()
        rel = float(np.abs(dev[logits] - cpu[logits]).max() / scale)
        prob_abs = float(np.abs(dev[out_name] - cpu[out_name]).max())
        top1 = float((dev[out_name].reshape(len(x), -1).argmax(1) == cpu[out_name].reshape(len(x), -1).argmax(1)).mean())
        figures.update(gpu_vs_cpu_rel=rel, output_max_abs=prob_abs, top1_agreement=top1)
        say(f"parity.{name}", f"GPU vs CPU max|d|/max|logit| = {rel:.2e} (output max|d| {prob_abs:.2e}, "
            f"top-1 agree {top1:.0%})", **figures, ok=rel < 1e-4)


def step_serve_digits(work: Path, gpu: bool, refs: Path | None) -> None:
    import yaml

    digits = REPO / "examples" / "digits"
    cfg = yaml.safe_load((digits / "server.yaml").read_text())
    for key in ("prototxt", "weights", "labels"):
        if cfg["model"].get(key):
            cfg["model"][key] = str(digits / cfg["model"][key])
    x = np.random.default_rng(1).random((4, 1, 8, 8), dtype=np.float32) * 16
    if refs is not None and (refs / "digits.npz").exists():
        ref = np.load(refs / "digits.npz")
        x = ref["input"][:4]
    cfg["backend"] = "pycaffe"  # this checks pycaffe's CUDA build (ONNX Runtime is another backend)
    cpu_cfg = {**cfg, "device": {"kind": "cpu"}}
    with Server(work, cpu_cfg) as s:
        status, body = http("POST", s.url + "/v2/models/digits/infer", infer_payload("data", x))
        cpu_out = np.array(body["outputs"][0]["data"], np.float32) if status == 200 else None
        say("serve.cpu", f"device cpu answered digits over HTTP: {status}", status=status)
    gpu_cfg = {**cfg, "device": {"kind": "gpu", "id": 0}}
    if not gpu:
        with Server(work, gpu_cfg, ready=False) as s:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                status, body = http("GET", s.url + "/v2/health/ready")
                if status == 503 and "failed" in body.get("error", ""):
                    break
                time.sleep(0.2)
            live = http("GET", s.url + "/v2/health/live")[0]
            say("serve.gpu", f"SKIP (no GPU visible); device gpu refused at startup: ready {status}, live {live}: "
                f"{body.get('error')}", skipped=True, ready_status=status, live_status=live, message=body.get("error"))
        return
    with Server(work, gpu_cfg) as s:
        rest = smi(s.proc.pid)
        status, meta = http("GET", s.url + "/v2/models/digits")
        params = meta.get("parameters", {}) if status == 200 else {}
        status, body = http("POST", s.url + "/v2/models/digits/infer", infer_payload("data", x))
        out = np.array(body["outputs"][0]["data"], np.float32) if status == 200 else None
        diff = float(np.abs(out - cpu_out).max()) if out is not None and cpu_out is not None else None
        say("serve.gpu", f"device gpu answered digits over HTTP: {status}, metadata device={params.get('device')}, "
            f"max|d| vs the CPU server {diff}", status=status, metadata_device=params.get("device"),
            max_abs_vs_cpu=diff, memory_at_rest=rest, ok=status == 200 and params.get("device") == "gpu")


def step_throughput(nets, work: Path, gpu: bool) -> None:
    import caffe

    if not gpu:
        skip("throughput", "GPU forward at batch 1..64 and batching auto")
        return
    proto, weights, inp, shape, _ = nets["inception"]
    caffe.set_device(0)
    caffe.set_mode_gpu()
    net = caffe.Net(str(proto), caffe.TEST, weights=str(weights))
    curve = []
    rng = np.random.default_rng(0)
    for b in (1, 2, 4, 8, 16, 32, 64):
        net.blobs[inp].reshape(b, *shape)
        net.reshape()
        net.blobs[inp].data[...] = rng.random((b, *shape), dtype=np.float32)
        net.forward()  # warm-up
        times = []
        t_end = time.perf_counter() + 1.0
        while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 100):
            t = time.perf_counter()
            net.forward()
            _ = net.blobs["prob"].data[0, 0]  # the result is on the host: the forward pass has finished
            times.append(time.perf_counter() - t)
        ms = float(np.median(times) * 1000)
        curve.append({"batch": b, "forward_ms": round(ms, 3), "items_per_s": round(b / ms * 1000, 1)})
        print(f"[gpu_check]   inception batch {b:3d}: {ms:8.3f} ms  {b / ms * 1000:9.1f} items/s", flush=True)
    del net
    caffe.set_mode_cpu()
    say("throughput.pycaffe", f"inception-size net on the GPU: batch 1 {curve[0]['items_per_s']} items/s, "
        f"batch 64 {curve[-1]['items_per_s']} items/s", curve=curve)
    cfg = {"name": "inception", "model": {"prototxt": str(proto), "weights": str(weights)},
           "inputs": [{"name": inp, "shape": [1, *shape], "datatype": "FP32"}], "outputs": [{"name": "prob"}],
           "device": {"kind": "gpu"}, "backend": "pycaffe", "batching": {"enabled": "auto", "maxBatchSize": 64}}
    with Server(work, cfg) as s:
        status, meta = http("GET", s.url + "/v2/models/inception")
        p = meta.get("parameters", {})
        say("throughput.batching_auto", f"batching auto on the GPU: {'on' if p.get('batching') else 'off'}, "
            f"max batch {p.get('batching_max_batch_size')}: {p.get('batching_decision')}",
            enabled=p.get("batching"), max_batch_size=p.get("batching_max_batch_size"),
            reason=p.get("batching_decision"), curve=p.get("batching_curve"))


def step_instances(nets, work: Path, gpu: bool) -> None:
    if not gpu:
        skip("instances", "instances: 2 on one GPU")
        return
    proto, weights, inp, shape, _ = nets["residual"]
    x = np.random.default_rng(2).random((1, *shape), dtype=np.float32)
    ref = forward(proto, weights, {inp: x}, ["prob"])["prob"].ravel()
    cfg = {"name": "residual", "model": {"prototxt": str(proto), "weights": str(weights)},
           "inputs": [{"name": inp, "shape": [1, *shape], "datatype": "FP32"}], "outputs": [{"name": "prob"}],
           "device": {"kind": "gpu"}, "backend": "pycaffe", "instances": 2}
    with Server(work, cfg) as s:
        rest = smi(s.proc.pid)
        payload = infer_payload(inp, x)
        results, load_mem = [], {}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                m = smi(s.proc.pid)
                if m.get("gpu_used_mib", 0) >= load_mem.get("gpu_used_mib", 0):
                    load_mem.update(m)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def worker():
            for _ in range(25):
                results.append(http("POST", s.url + "/v2/models/residual/infer", payload))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        stop.set()
        sampler.join()
        ok = [r for r in results if r[0] == 200]
        worst = max((float(np.abs(np.array(r[1]["outputs"][0]["data"], np.float32) - ref).max()) for r in ok), default=None)
        say("instances", f"instances: 2 on one GPU: {len(ok)}/{len(results)} answered 200 in {elapsed:.1f} s "
            f"({len(results) / elapsed:.0f} req/s at concurrency 8), worst max|d| vs pycaffe CPU {worst}",
            answered=len(ok), sent=len(results), req_per_s=len(results) / elapsed, worst_max_abs=worst,
            memory_at_rest=rest, memory_under_load=load_mem, ok=len(ok) == len(results))


def step_oom(nets, work: Path, gpu: bool) -> None:
    if not gpu:
        skip("oom", "out-of-memory request")
        return
    proto, weights, inp, shape, _ = nets["hungry"]
    cfg = {"name": "hungry", "model": {"prototxt": str(proto), "weights": str(weights)},
           "inputs": [{"name": inp, "shape": [1, *shape], "datatype": "FP32"}], "outputs": [{"name": "total"}],
           "device": {"kind": "gpu"}, "backend": "pycaffe"}
    x1 = np.random.default_rng(3).random((1, *shape), dtype=np.float32)
    with Server(work, cfg) as s:
        url = s.url + "/v2/models/hungry/infer"
        before = http("POST", url, infer_payload(inp, x1))
        free = smi(s.proc.pid)
        big = np.repeat(x1, 15, axis=0)  # 15 x 8 GiB of blobs: more than an H200 holds, within Caffe's int limits
        status, body = http("POST", url, infer_payload(inp, big))
        after = http("POST", url, infer_payload(inp, x1))
        alive = s.proc.poll() is None
        same = (before[0] == 200 and after[0] == 200
                and before[1]["outputs"][0]["data"] == after[1]["outputs"][0]["data"])
        say("oom", f"batch 15 of an 8 GiB-per-item net: {status} {body.get('error')!r}; afterwards batch 1: {after[0]}, "
            f"same answer as before: {same}, server alive: {alive}", status=status, message=body.get("error"),
            after_status=after[0], same_answer=same, alive=alive, memory=free,
            ok=400 <= status < 600 and bool(body.get("error")) and same and alive)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--refs", type=Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import caffe
    from inference_server.backends.pycaffe import gpu_problem

    problem = gpu_problem(0)
    gpu = problem is None
    RESULTS["gpu"] = gpu
    RESULTS["gpu_problem"] = problem
    RESULTS["caffe"] = caffe.__file__
    RESULTS["python"] = sys.version.split()[0]
    RESULTS["numpy"] = np.__version__
    print(f"[gpu_check] pycaffe {caffe.__file__} on Python {RESULTS['python']}, numpy {np.__version__}; "
          f"GPU: {'yes' if gpu else 'no (' + problem + ')'}", flush=True)
    if gpu and shutil.which("nvidia-smi"):
        RESULTS["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    failed = []
    try:
        nets = make_nets(work)
        for name, fn in (("parity", lambda: step_parity(nets, gpu, args.refs)),
                         ("serve", lambda: step_serve_digits(work, gpu, args.refs)),
                         ("throughput", lambda: step_throughput(nets, work, gpu)),
                         ("instances", lambda: step_instances(nets, work, gpu)),
                         ("oom", lambda: step_oom(nets, work, gpu))):
            t = time.monotonic()
            try:
                fn()
            except Exception as e:  # one broken step must not hide the others' figures
                failed.append(name)
                say(name, f"FAILED: {type(e).__name__}: {e}", failed=True)
            RESULTS["steps"].setdefault(name, {})["seconds"] = round(time.monotonic() - t, 1)
    finally:
        RESULTS["seconds"] = round(time.monotonic() - START, 1)
        RESULTS["failed"] = failed + [k for k, v in RESULTS["steps"].items() if v.get("ok") is False]
        (args.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        with open(args.out / "servers.log", "w") as f:  # every server's log, one file
            for log in sorted(work.glob("*.log")):
                f.write(f"===== {log.name}\n{log.read_text(errors='replace')[-20000:]}\n")
        shutil.rmtree(work, ignore_errors=True)
    print(f"[gpu_check] done in {RESULTS['seconds']} s; failed: {RESULTS['failed'] or 'none'}", flush=True)
    return 1 if RESULTS["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

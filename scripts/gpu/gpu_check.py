#!/usr/bin/env python3
"""The one prepared check of the CUDA pycaffe and the server on a lent GPU (scripts/gpu/gpu_check.sh runs it).

    python scripts/gpu/gpu_check.py --out DIR [--refs DIR] [--budget-s 270]

This process only orchestrates and never loads Caffe or CUDA: each step runs in a child process of its
own, in a process group of its own with every server it starts, and that group is killed when the step
ends, runs past its share of the budget, or the check is stopped (SIGTERM/SIGINT). So a Caffe abort or a
hang costs one step, no server outlives its step, and no CUDA context of the checker's sits on the GPU
while a server's memory is read. DIR/gpu_check.json is rewritten after every step (a kill leaves what was
measured); DIR/steps.log holds the steps' own output, DIR/servers.log every server's log. The last lines
printed are a short summary (the device tool returns only the end of the output).

Steps (GPU parts where nvidia-smi lists a GPU; a listed GPU that the build cannot use is a FAILURE):
  probe         pycaffe loads; nvidia-smi's GPUs against CUDA's (gpu_problem); versions in use
  prepare       the nets (digits, an inception-size net, a ResNet-18-shaped net with BatchNorm+Scale, and
                a net whose blobs outgrow the card, sized from its memory) and their CPU answers
  parity        pycaffe GPU vs CPU mode on digits, inception, residual (max|d| / max|logit|)
  serve         `caffeserve serve` on the CPU and with device gpu: digits over REST and over gRPC
                (tritonclient.grpc), metadata device, GPU memory at rest
  throughput.pycaffe / throughput.server
                forward time at batch 1..64, both measured by the server's own calibration code
                (inference_server.loading.calibration.measure_curve on the pycaffe backend): directly, and
                inside a server with `batching: auto` (its curve and decision)
  instances     `instances: 1` then `instances: 2` on one GPU, 8 client threads, one binary-tensor body
                encoded once: every request sent is counted and must be answered 200 with the CPU answer
  oom           a batch whose blobs exceed the card's memory: an error with a message (507), then the
                server answers batch 1 as before
Without a visible GPU (the rehearsal on a CPU machine) the GPU parts print SKIP and the same code runs
on the CPU at a small size where it can (marked "rehearsed on the CPU"): its figures are not GPU figures.

Rehearsal only: GPU_CHECK_FAULT=STEP:raise|abort|hang injects a fault into one step's child.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
sys.path[:0] = [str(REPO), str(REPO / "bench")]
# The check runs in the carried working tree (gpu_check.sh puts it on PYTHONPATH), so it shares caffe_testing's
# plain HTTP and process helpers (stdlib and yaml only, both on the lent machine; gpu_wheels.py measures the
# imports). It keeps its own Server, forward and request bodies: Server reads the ports a server picked
# (port 0) from its log and fails at once on a model that failed to load, where ServerProcess reserves a port
# first and only polls; caffe_testing.nets.forward is the CPU reference (it sets CPU mode), and the parity step
# runs the same forward in GPU mode.
from caffe_testing import servers as shared  # noqa: E402

SMI_TIMEOUT_S = 15
HTTP_TIMEOUT_S = 60
SERVER_START_S = 90
GRPC_TIMEOUT_S = 30

# (step, share of the budget it may take at most in seconds, the least it needs to be worth starting)
STEPS = [("probe", 60, 10), ("prepare", 90, 15), ("parity", 90, 15), ("serve", 90, 20),
         ("throughput.pycaffe", 60, 15), ("throughput.server", 90, 20), ("instances", 90, 25), ("oom", 60, 20)]
GPU_ONLY = {"oom"}  # steps that cannot be rehearsed on a CPU


# ========================================================================================== results
class Results:
    """One step's results, written to a JSON file after every figure (the parent reads it, even after a kill)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict = {}

    def say(self, name: str, status: str, text: str, **figures) -> None:
        """status: ok | failed | skip | cpu (a CPU part ran, or a GPU part was rehearsed on the CPU)."""
        print(f"[gpu_check] {name}: {status.upper()}: {text}", flush=True)
        self.data[name] = {**figures, "status": status, "summary": text}
        self.flush()

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.flush()

    def flush(self) -> None:
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            os.replace(tmp, self.path)


R = Results(None)


def say(name: str, status: str, text: str, **figures) -> None:
    R.say(name, status, text, **figures)


# ========================================================================================== GPU facts
def nvidia_smi(*args: str) -> str | None:
    """nvidia-smi's output, or None where it is missing, fails or hangs (SMI_TIMEOUT_S)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        q = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=SMI_TIMEOUT_S)
    except (subprocess.TimeoutExpired, OSError):
        return None
    return q.stdout if q.returncode == 0 else None


def listed_gpus() -> list[dict]:
    out = nvidia_smi("--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader,nounits") or ""
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            gpus.append({"index": int(parts[0]), "name": parts[1], "memory_mib": int(float(parts[2])),
                         "driver": parts[3]})
    return gpus


def gpu_memory(pids: list[int] | None = None) -> dict:
    """GPU memory from nvidia-smi, MiB: the whole GPU's, and the processes' where the driver maps their pids."""
    out = {}
    q = nvidia_smi("--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits")
    if q and q.strip():
        used, total = (int(float(v)) for v in q.splitlines()[0].split(","))
        out.update(gpu_used_mib=used, gpu_total_mib=total)
    q = nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits") or ""
    apps = {}
    for line in q.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            apps[int(parts[0])] = int(parts[1])
    out["compute_apps"] = len(apps)
    if pids:
        out["processes_mib"] = sum(apps.get(p, 0) for p in pids) if any(p in apps for p in pids) else None
    return out


def oom_plan(total_mib: int, batch: int = 15, elements: int = 2**27) -> dict:
    """The out-of-memory net for a card of `total_mib`: `copies` blobs of `elements` floats per item, so that
    a batch of `batch` needs at least 1.25x the card's whole memory (a real out-of-memory case on any card,
    not one made by the guard's margin), while batch 1 fits and no blob passes Caffe's 2^31 - 1 elements."""
    assert batch * elements < 2**31, "a blob of the batch would pass Caffe's element limit"
    per_blob_mib = elements * 4 / 2**20
    copies = max(2, -(-int(1.25 * total_mib) // int(batch * per_blob_mib)))
    item_mib = copies * per_blob_mib
    assert item_mib < 0.5 * total_mib, "batch 1 would not fit"
    return {"batch": batch, "elements": elements, "copies": copies, "item_mib": item_mib,
            "batch_mib": batch * item_mib, "card_mib": total_mib}


# ========================================================================================== nets (children)
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


def hungry_netspec(elements: int, copies: int):
    """A net whose blobs take `copies` x `elements` floats per item and that computes little: Tile blows
    the 8x8 input up, Power layers (not in place) copy it, Reduction sums it."""
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
    """NAME.prototxt and NAME.caffemodel with He-initialised weights and BatchNorm statistics near the
    identity, so that activations stay O(1) through a deep net."""
    import caffe

    directory.mkdir(parents=True, exist_ok=True)
    proto = directory / f"{name}.prototxt"
    proto.write_text(str(netspec.to_proto()))
    net = caffe.Net(str(proto), caffe.TEST)
    rng = np.random.default_rng(seed)
    types = {n: layer.type for n, layer in zip(net._layer_names, net.layers, strict=True)}
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


# ========================================================================================== servers (children)
def http_json(method: str, url: str, payload=None, timeout: float = HTTP_TIMEOUT_S):
    """caffe_testing.servers.http with a JSON body; an error page that is not JSON becomes {"error": text}."""
    body = None if payload is None else json.dumps(payload).encode()
    status, _, raw = shared.http(method, url, body, {"Content-Type": "application/json"}, timeout=timeout)
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, {"error": raw.decode(errors="replace")}


def json_payload(name: str, x: np.ndarray) -> dict:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def binary_body(name: str, x: np.ndarray, output: str) -> tuple[bytes, dict]:
    """An OIP request with the tensor as binary data (Triton's extension): encoded once, sent many times."""
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    head = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": output}]}).encode()
    return head + raw, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}


def metadata_device(params: dict) -> str | None:
    """The metadata's device as a plain word ("gpu"), also where a server writes the enum's name ("DeviceKind.gpu")."""
    value = params.get("device")
    return None if value is None else str(value).rsplit(".", 1)[-1].lower()


class Server:
    """`caffeserve serve` on loopback, REST and gRPC on ports the kernel picks (read from its log). A start
    that fails (exit, timeout, a model that fails to load) stops the process before raising. It stays in
    the step's process group, which the parent kills when the step ends, whatever happened."""

    def __init__(self, work: Path, config: dict, ready: bool = True):
        import yaml

        self.path = work / f"{config['name']}-{time.monotonic_ns()}.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.log = work / f"{self.path.stem}.log"
        self.ready = ready
        self.proc: subprocess.Popen | None = None
        self.url = self.grpc = None

    def __enter__(self):
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "caffeserve", "serve", "--config", str(self.path),
                                          "--port", "0", "--grpc-port", "0", "--no-access-log"],
                                         cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self) -> None:
        deadline = time.monotonic() + SERVER_START_S
        path = "/v2/health/ready" if self.ready else "/v2/health/live"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            text = self.log.read_text(errors="replace")
            if self.url is None and (m := re.search(r"listening on http://[\d.]+:(\d+)", text)):
                self.url = f"http://127.0.0.1:{m.group(1)}"
            if self.grpc is None and (m := re.search(r"listening for gRPC on [\d.]+:(\d+)", text)):
                self.grpc = f"127.0.0.1:{m.group(1)}"
            if self.url is not None:
                try:
                    status, body = http_json("GET", self.url + path, timeout=5)
                    if status == 200:
                        return
                    if self.ready and "failed" in (body or {}).get("error", ""):
                        raise RuntimeError(f"the model failed to load: {body['error']}")
                except OSError:
                    pass
            time.sleep(0.1)
        raise TimeoutError(f"server not {'ready' if self.ready else 'live'} in {SERVER_START_S} s: {self.tail()}")

    def memory_at_rest(self) -> dict:
        """GPU memory with this server loaded and idle, read the same way for every server (no other process
        of the check holds a CUDA context meanwhile: only the step that loads pycaffe itself has one)."""
        time.sleep(1.0)
        return gpu_memory([self.proc.pid])

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        shared.stop_process(self.proc, 20)

    def __exit__(self, *exc):
        self.stop()


def server_config(name: str, proto, weights, inp: str, shape, output: str, device: str, **more) -> dict:
    return {"name": name, "model": {"prototxt": str(proto), "weights": str(weights)},
            "inputs": [{"name": inp, "shape": [1, *shape], "datatype": "FP32"}], "outputs": [{"name": output}],
            "device": {"kind": device}, "backend": "pycaffe", **more}


def grpc_infer(target: str, model: str, inp: str, x: np.ndarray, output: str) -> np.ndarray:
    """One inference over gRPC with tritonclient (this process never imports our OIP stubs: DESIGN.md)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(target)
    try:
        t = grpcclient.InferInput(inp, list(x.shape), "FP32")
        t.set_data_from_numpy(x.astype(np.float32))
        res = client.infer(model, [t], outputs=[grpcclient.InferRequestedOutput(output)],
                           client_timeout=GRPC_TIMEOUT_S)
        return res.as_numpy(output)
    finally:
        client.close()


def run_load(url: str, path: str, body: bytes, headers: dict, check, threads: int, seconds: float,
             pids: list[int]) -> dict:
    """`threads` clients sending the same body for `seconds` on kept-alive connections. Every request sent is
    counted, with what became of it: answered 200 and right, 200 but wrong, another status, an exception."""
    host, port = url.removeprefix("http://").split(":")
    lock = threading.Lock()
    tally = {"sent": 0, "ok": 0, "wrong": 0, "status": {}, "errors": {}}
    memory: dict = {}
    deadline = time.monotonic() + seconds
    stop = threading.Event()

    def client():
        conn = None
        while time.monotonic() < deadline:
            with lock:
                tally["sent"] += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT_S)
                conn.request("POST", path, body, headers)
                r = conn.getresponse()
                data = r.read()
                if r.status == 200:
                    key = "ok" if check(json.loads(data)) else "wrong"
                    with lock:
                        tally[key] += 1
                else:
                    with lock:
                        tally["status"][r.status] = tally["status"].get(r.status, 0) + 1
            except Exception as e:  # a reset or a timeout is counted, never a silent thread death
                with lock:
                    kind = type(e).__name__
                    tally["errors"][kind] = tally["errors"].get(kind, 0) + 1
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def sample():
        while not stop.wait(0.5):
            m = gpu_memory(pids)
            if m.get("gpu_used_mib", 0) >= memory.get("gpu_used_mib", 0):
                memory.update(m)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + HTTP_TIMEOUT_S + 5)
    elapsed = time.perf_counter() - t0
    stop.set()
    alive = sum(w.is_alive() for w in workers)
    tally.update(seconds=round(elapsed, 2), req_per_s=round(tally["ok"] / elapsed, 1), threads=threads,
                 clients_still_running=alive, memory_under_load=memory)
    tally["all_answered"] = tally["sent"] > 0 and tally["ok"] == tally["sent"] and alive == 0
    return tally


# ========================================================================================== steps (children)
def step_probe(ctx: dict) -> None:
    from importlib import metadata

    import caffe

    from inference_server.backends.pycaffe import _cuda_build, gpu_problem

    problem = gpu_problem(0)
    versions = {}
    for dist in ("numpy", "scipy", "scikit-image", "protobuf", "grpcio", "pyyaml", "pydantic", "orjson", "uvloop",
                 "httptools", "pillow", "tritonclient", "six"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    R.put("probe", {"caffe": caffe.__file__, "cuda_build": _cuda_build(caffe._caffe.__file__),
                    "gpu_problem": problem, "python": sys.version.split()[0], "versions": versions})
    say(
        "pycaffe",
        "ok",
        f"{caffe.__file__} on Python {sys.version.split()[0]}, numpy {np.__version__}, CUDA build "
        f"{_cuda_build(caffe._caffe.__file__)}; "
        f"CUDA sees a GPU: {'yes' if problem is None else 'no (' + problem + ')'}",
        versions=versions,
    )


def step_prepare(ctx: dict) -> None:
    import caffe

    import inception_net

    caffe.set_mode_cpu()
    work = Path(ctx["work"])
    digits = REPO / "examples" / "digits"
    nets = {"digits": [str(digits / "deploy.prototxt"), str(digits / "digits.caffemodel"), "data", [1, 8, 8], None]}
    proto, weights = inception_net.write(work / "inception")
    nets["inception"] = [str(proto), str(weights), "data", [3, 224, 224], "fc"]
    proto, weights = save_he(residual_netspec(), work / "residual", "residual", seed=1)
    nets["residual"] = [str(proto), str(weights), "data", [3, 224, 224], "fc"]
    # The CPU answers the servers' replies are held against (steps that start servers never load Caffe).
    refs = {}
    for name, seed, batch in (("digits", 2, 1), ("residual", 2, 1)):
        proto, weights, inp, shape, _ = nets[name]
        x = np.random.default_rng(seed).random((batch, *shape), dtype=np.float32) * (16 if name == "digits" else 1)
        path = work / f"ref-{name}.npz"
        np.savez(path, input=x, prob=forward(proto, weights, {inp: x}, ["prob"])["prob"])
        refs[name] = str(path)
    if ctx.get("gpu_total_mib"):
        plan = oom_plan(ctx["gpu_total_mib"])
        proto = work / "hungry.prototxt"
        proto.write_text(str(hungry_netspec(plan["elements"], plan["copies"]).to_proto()))
        caffe.Net(str(proto), caffe.TEST).save(str(work / "hungry.caffemodel"))  # no parameters
        nets["hungry"] = [str(proto), str(work / "hungry.caffemodel"), "data", [1, 8, 8], None]
        R.put("oom_plan", plan)
    R.put("nets", nets)
    R.put("refs", refs)
    say("prepare", "ok", f"nets {', '.join(nets)}; CPU answers for {', '.join(refs)}")


def step_parity(ctx: dict) -> None:
    import caffe

    gpu, nets = ctx["gpu"], ctx["nets"]
    refs = Path(ctx["refs"]) / "digits.npz" if ctx.get("refs") else None
    rng = np.random.default_rng(0)
    for name in ("digits", "inception", "residual"):
        proto, weights, inp, shape, declared = nets[name]
        batch = 8 if name == "digits" else 4
        x = (rng.random((batch, *shape), dtype=np.float32) * (16 if name == "digits" else 1)).astype(np.float32)
        built = np.load(refs) if name == "digits" and refs is not None and refs.exists() else None
        if built is not None:
            x = built["input"]
        caffe.set_mode_cpu()
        probe = caffe.Net(str(proto), caffe.TEST, weights=str(weights))
        names = list(probe.blobs.keys())
        logits = declared or (names[-2] if probe.layers[-1].type == "Softmax" else probe.outputs[-1])
        out_name = probe.outputs[-1]
        del probe
        cpu = forward(proto, weights, {inp: x}, [logits, out_name])
        scale = float(np.abs(cpu[logits]).max())
        figures = {"batch": int(x.shape[0]), "logit_blob": logits, "largest_logit": scale}
        vs_build = ""
        if built is not None:
            figures["cpu_mode_vs_cpu_build_rel"] = float(np.abs(cpu[logits] - built[logits]).max() / scale)
            vs_build = f", vs the CPU build {figures['cpu_mode_vs_cpu_build_rel']:.2e}"
        if not gpu:
            ok = figures.get("cpu_mode_vs_cpu_build_rel", 0.0) <= 1e-5 and scale > 0
            say(f"parity.{name}", "cpu" if ok else "failed",
                f"CPU mode ran (largest logit {scale:.3g}{vs_build}); GPU: SKIP (no GPU)", **figures)
            continue
        caffe.set_device(0)
        caffe.set_mode_gpu()
        dev = forward(proto, weights, {inp: x}, [logits, out_name])
        caffe.set_mode_cpu()
        rel = float(np.abs(dev[logits] - cpu[logits]).max() / scale)
        prob_abs = float(np.abs(dev[out_name] - cpu[out_name]).max())
        top1 = float(
            (dev[out_name].reshape(len(x), -1).argmax(1) == cpu[out_name].reshape(len(x), -1).argmax(1)).mean()
        )
        figures.update(gpu_vs_cpu_rel=rel, output_max_abs=prob_abs, top1_agreement=top1)
        say(f"parity.{name}", "ok" if rel < 1e-4 else "failed",
            f"GPU vs CPU max|d|/max|logit| {rel:.2e} (output max|d| {prob_abs:.2e}, top-1 agree {top1:.0%}){vs_build}",
            **figures)


def step_serve(ctx: dict) -> None:
    import yaml

    gpu, work = ctx["gpu"], Path(ctx["work"])
    digits = REPO / "examples" / "digits"
    cfg = yaml.safe_load((digits / "server.yaml").read_text())
    for key in ("prototxt", "weights", "labels"):
        if cfg["model"].get(key):
            cfg["model"][key] = str(digits / cfg["model"][key])
    cfg["backend"] = "pycaffe"  # this checks pycaffe's CUDA build (ONNX Runtime is another backend)
    ref = np.load(ctx["refs_cpu"]["digits"])
    x = np.repeat(ref["input"], 4, axis=0) + np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1)

    def ask(s: Server) -> tuple[int, np.ndarray | None, np.ndarray | None]:
        status, body = http_json("POST", s.url + "/v2/models/digits/infer", json_payload("data", x))
        rest = np.array(body["outputs"][0]["data"], np.float32).reshape(4, -1) if status == 200 else None
        return status, rest, grpc_infer(s.grpc, "digits", "data", x, "prob").reshape(4, -1)

    with Server(work, {**cfg, "device": {"kind": "cpu"}}) as s:
        status, cpu_rest, cpu_grpc = ask(s)
        same = cpu_rest is not None and float(np.abs(cpu_rest - cpu_grpc).max())
        say("serve.cpu", "cpu" if status == 200 and same is not None and same <= 1e-6 else "failed",
            f"device cpu answered digits: REST {status}, gRPC (tritonclient) max|d| vs REST {same}",
            http_status=status, grpc_vs_rest=same)
    gpu_cfg = {**cfg, "device": {"kind": "gpu", "id": 0}}
    if not gpu:
        with Server(work, gpu_cfg, ready=False) as s:
            deadline = time.monotonic() + 60
            status, body = 0, {}
            while time.monotonic() < deadline:
                status, body = http_json("GET", s.url + "/v2/health/ready", timeout=5)
                if status == 503 and "failed" in body.get("error", ""):
                    break
                time.sleep(0.2)
            live = http_json("GET", s.url + "/v2/health/live", timeout=5)[0]
            refused = status == 503 and live == 200 and "no CUDA GPU is visible" in body.get("error", "")
            say("serve.gpu", "cpu" if refused else "failed", f"SKIP (no GPU); device gpu refused at startup: ready "
                f"{status}, live {live}: {body.get('error')}", ready_status=status, live_status=live,
                message=body.get("error"))
        return
    with Server(work, gpu_cfg) as s:
        rest_memory = s.memory_at_rest()
        status, meta = http_json("GET", s.url + "/v2/models/digits")
        device = metadata_device(meta.get("parameters", {})) if status == 200 else None
        status, out_rest, out_grpc = ask(s)
        diff = float(np.abs(out_rest - cpu_rest).max()) if out_rest is not None and cpu_rest is not None else None
        grpc_diff = float(np.abs(out_grpc - out_rest).max()) if out_rest is not None else None
        ok = (status == 200 and device == "gpu" and diff is not None and diff <= 1e-5
              and grpc_diff is not None and grpc_diff <= 1e-6)
        say("serve.gpu", "ok" if ok else "failed",
            f"device gpu answered digits: REST {status}, metadata device {device}, max|d| vs the CPU server {diff}, "
            f"gRPC vs REST {grpc_diff}; GPU memory at rest {rest_memory.get('processes_mib')} MiB (server), "
            f"{rest_memory.get('gpu_used_mib')} MiB in all", http_status=status, metadata_device=device,
            max_abs_vs_cpu=diff, grpc_vs_rest=grpc_diff, memory_at_rest=rest_memory)


def curve_text(curve: list[dict]) -> str:
    return ", ".join(f"b{c['batch']} {c['items_per_s']:.0f}/s" for c in curve)


def step_throughput_pycaffe(ctx: dict) -> None:
    """The forward curve of pycaffe alone, timed by the server's own calibration code (measured as the
    server measures it for `batching: auto`)."""
    from inference_server.backends.pycaffe import PycaffeBackend
    from inference_server.loading.calibration import measure_curve

    gpu = ctx["gpu"]
    net = "inception" if gpu else "digits"
    proto, weights, inp, shape, _ = ctx["nets"][net]
    max_batch = 64 if gpu else 8
    backend = PycaffeBackend(proto, weights, "gpu" if gpu else "cpu", 0)
    curve = measure_curve(backend, {inp: tuple(shape)}, ["prob"], max_batch)
    say("throughput.pycaffe", "ok" if gpu else "cpu",
        f"{net} {'on the GPU' if gpu else 'rehearsed on the CPU'}: {curve_text(curve)}", net=net, curve=curve,
        rehearsed=not gpu)


def step_throughput_server(ctx: dict) -> None:
    gpu, work = ctx["gpu"], Path(ctx["work"])
    net = "inception" if gpu else "digits"
    proto, weights, inp, shape, _ = ctx["nets"][net]
    max_batch = 64 if gpu else 8
    cfg = server_config(net, proto, weights, inp, shape, "prob", "gpu" if gpu else "cpu",
                        batching={"enabled": "auto", "maxBatchSize": max_batch})
    with Server(work, cfg) as s:
        status, meta = http_json("GET", f"{s.url}/v2/models/{net}")
        p = meta.get("parameters", {}) if status == 200 else {}
        curve = p.get("batching_curve") or []
        say("throughput.server", ("ok" if gpu else "cpu") if curve else "failed",
            f"{net} in the server, batching auto {'on' if p.get('batching') else 'off'} "
            f"(max batch {p.get('batching_max_batch_size')}): {p.get('batching_decision')}; {curve_text(curve)}",
            net=net, enabled=p.get("batching"), max_batch_size=p.get("batching_max_batch_size"),
            reason=p.get("batching_decision"), curve=curve, rehearsed=not gpu)


def step_instances(ctx: dict) -> None:
    gpu, work = ctx["gpu"], Path(ctx["work"])
    net = "residual" if gpu else "digits"
    proto, weights, inp, shape, _ = ctx["nets"][net]
    ref = np.load(ctx["refs_cpu"][net])
    x, want = ref["input"], ref["prob"].ravel()
    body, headers = binary_body(inp, x, "prob")
    tolerance = 1e-4

    def right(answer: dict) -> bool:
        got = np.asarray(answer["outputs"][0]["data"], np.float32)
        return got.shape == want.shape and float(np.abs(got - want).max()) <= tolerance

    seconds = float(ctx.get("load_seconds", 8 if gpu else 3))
    runs = {}
    for instances in (1, 2):
        cfg = server_config(net, proto, weights, inp, shape, "prob", "gpu" if gpu else "cpu", instances=instances)
        with Server(work, cfg) as s:
            rest = s.memory_at_rest()
            status, _ = http_json("POST", f"{s.url}/v2/models/{net}/infer", json_payload(inp, x))
            tally = run_load(s.url, f"/v2/models/{net}/infer", body, headers, right, 8, seconds, [s.proc.pid])
            tally.update(memory_at_rest=rest, first_status=status, alive=s.proc.poll() is None)
            runs[instances] = tally
    one, two = runs[1], runs[2]
    ok = one["all_answered"] and two["all_answered"] and one["wrong"] == two["wrong"] == 0
    where = "on one GPU" if gpu else "rehearsed on the CPU"
    say(
        "instances",
        ("ok" if gpu else "cpu") if ok else "failed",
        f"{net} {where}, 8 clients, binary body: "
        f"instances 1 {one['ok']}/{one['sent']} right, {one['req_per_s']} req/s; "
        f"instances 2 {two['ok']}/{two['sent']} right, {two['req_per_s']} req/s"
        + ("" if ok else f"; errors {one['errors'] or one['status']} / {two['errors'] or two['status']}"),
        net=net,
        instances_1=one,
        instances_2=two,
        rehearsed=not gpu,
    )


def step_oom(ctx: dict) -> None:
    work = Path(ctx["work"])
    plan = ctx["oom_plan"]
    proto, weights, inp, shape, _ = ctx["nets"]["hungry"]
    cfg = server_config("hungry", proto, weights, inp, shape, "total", "gpu")
    x1 = np.random.default_rng(3).random((1, *shape), dtype=np.float32)
    with Server(work, cfg) as s:
        url = f"{s.url}/v2/models/hungry/infer"
        before = http_json("POST", url, json_payload(inp, x1))
        memory = gpu_memory([s.proc.pid])
        status, body = http_json("POST", url, json_payload(inp, np.repeat(x1, plan["batch"], axis=0)))
        after = http_json("POST", url, json_payload(inp, x1))
        alive = s.proc.poll() is None
    same = before[0] == 200 and after[0] == 200 and before[1]["outputs"][0]["data"] == after[1]["outputs"][0]["data"]
    ok = 400 <= status < 600 and bool(body.get("error")) and same and alive
    say(
        "oom",
        "ok" if ok else "failed",
        f"batch {plan['batch']} needing {plan['batch_mib'] / 1024:.0f} GiB of blobs "
        f"on a {plan['card_mib'] / 1024:.0f} GiB "
        f"card: {status} {body.get('error')!r}; then batch 1: {after[0]}, same answer {same}, server alive {alive}",
        http_status=status,
        message=body.get("error"),
        after_status=after[0],
        same_answer=same,
        alive=alive,
        plan=plan,
        memory=memory,
    )


STEP_FUNCS = {"probe": step_probe, "prepare": step_prepare, "parity": step_parity, "serve": step_serve,
              "throughput.pycaffe": step_throughput_pycaffe, "throughput.server": step_throughput_server,
              "instances": step_instances, "oom": step_oom}


def child_main(step: str, ctx_path: Path, result_path: Path) -> int:
    global R
    R = Results(result_path)
    ctx = json.loads(ctx_path.read_text())
    fault = os.environ.get("GPU_CHECK_FAULT", "")
    if fault.partition(":")[0] == step:
        kind = fault.partition(":")[2]
        print(f"[gpu_check] {step}: injecting a fault ({kind}; GPU_CHECK_FAULT)", flush=True)
        if kind == "abort":
            os.abort()  # as Caffe's glog FATAL ends a process
        if kind == "hang":
            time.sleep(10**6)
        raise RuntimeError("an injected fault (GPU_CHECK_FAULT)")
    STEP_FUNCS[step](ctx)
    return 0


# ========================================================================================== orchestration
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class Stopped(BaseException):
    """SIGTERM/SIGINT reached the check: stop the running step, keep what was measured."""


def on_signal(signum, _frame):
    for sig in (signal.SIGTERM, signal.SIGINT):  # once: the stop itself runs to its end
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signal.Signals(signum).name)


def kill_group(pgid: int) -> None:
    """SIGTERM to a step's process group (servers drain), SIGKILL to what is left 5 s later."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)


class Check:
    def __init__(self, out: Path, refs: Path | None, budget_s: float):
        self.out, self.start = out, time.monotonic()
        self.deadline = self.start + budget_s
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=os.environ.get("GPU_CHECK_WORK")))
        self.results: dict = {"budget_s": budget_s, "steps": {}, "failed": [], "running": None, "stopped": None,
                              "check_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]}
        self.ctx: dict = {"work": str(self.work), "refs": str(refs) if refs else None, "gpu": False}
        self.logged: set[str] = set()
        self.env = {**os.environ, "GLOG_minloglevel": os.environ.get("GLOG_minloglevel", "2"),
                    "PYTHONUNBUFFERED": "1"}

    # ------------------------------------------------------------------ bookkeeping
    def write(self) -> None:
        self.results["seconds"] = round(time.monotonic() - self.start, 1)
        self.results["failed"] = sorted({name for name, r in self.results["steps"].items()
                                         if r.get("status") == "failed"})
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.out / "gpu_check.json")
        with open(self.out / "servers.log", "a") as f:
            for log in sorted(self.work.glob("*.log"), key=lambda p: p.stat().st_mtime):
                if log.name not in self.logged:
                    self.logged.add(log.name)
                    f.write(f"===== {log.name}\n{log.read_text(errors='replace')[-20000:]}\n")

    def record(self, name: str, status: str, text: str, **figures) -> None:
        print(f"[gpu_check] {name}: {status.upper()}: {text}", flush=True)
        self.results["steps"][name] = {**figures, "status": status, "summary": text}

    # ------------------------------------------------------------------ one step in its child
    def run_step(self, step: str, cap_s: float, least_s: float) -> dict:
        left = self.deadline - time.monotonic()
        if left < least_s:
            self.record(step, "failed", f"not run: {left:.0f} s of the budget left, the step needs {least_s} s")
            return {}
        timeout = min(cap_s, left)
        ctx_path, result_path = self.work / f"ctx-{step}.json", self.work / f"result-{step}.json"
        ctx_path.write_text(json.dumps(self.ctx))
        self.results["running"] = step
        self.write()
        t0 = time.monotonic()
        with open(self.out / "steps.log", "a") as log:
            log.write(f"===== {step} (at most {timeout:.0f} s)\n")
            log.flush()
            proc = subprocess.Popen([sys.executable, __file__, "--step", step, "--ctx", str(ctx_path),
                                     "--result", str(result_path)], cwd=REPO, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        problem, stopped = None, None
        try:
            rc = proc.wait(timeout)
            if rc != 0:
                problem = f"its process ended with {rc if rc > 0 else signal.Signals(-rc).name}"
        except subprocess.TimeoutExpired:
            problem = f"stopped after {timeout:.0f} s (its share of the budget)"
        except Stopped as e:
            problem, stopped = f"stopped by {e.args[0]}", e
        finally:  # whatever happened, nothing of the step outlives it: not the child, not a server
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a stop now waits for the bookkeeping
            kill_group(proc.pid)
            proc.wait()
        seconds = round(time.monotonic() - t0, 1)
        got = json.loads(result_path.read_text()) if result_path.exists() else {}
        for name, r in got.items():
            if isinstance(r, dict) and "status" in r:
                self.record(name, r.pop("status"), r.pop("summary"), **r, step=step)
        if problem:
            tail = (self.out / "steps.log").read_text(errors="replace").rsplit(f"===== {step} ", 1)[-1]
            last = [line for line in tail.splitlines()[1:] if line.strip()][-3:]
            self.record(step if step not in got else f"{step}.end", "failed", f"{problem}: {' | '.join(last)[-400:]}")
        self.results.setdefault("step_seconds", {})[step] = seconds
        if stopped is None:
            self.results["running"] = None
        self.write()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a stop that came meanwhile raises here
        if stopped is not None:
            raise stopped
        return got

    # ------------------------------------------------------------------ the whole check
    def run(self) -> int:
        gpus = listed_gpus()
        self.results["nvidia_smi"] = gpus
        got = self.run_step("probe", *next((c, m) for s, c, m in STEPS if s == "probe"))
        self.results["probe"] = got.get("probe")
        problem = got.get("probe", {}).get("gpu_problem", "the probe did not finish")
        usable = "probe" in got and problem is None
        self.results.update(gpu=usable, gpu_problem=problem)
        unusable = None
        if gpus and not usable:
            unusable = f"nvidia-smi lists {gpus[0]['name']} but this build cannot use it: {problem}"
            self.record("gpu", "failed", unusable)
        elif gpus:
            self.record("gpu", "ok", f"{gpus[0]['name']}, {gpus[0]['memory_mib']} MiB, driver {gpus[0]['driver']}: "
                        "CUDA sees it", **gpus[0])
        else:
            self.record("gpu", "skip", f"no GPU listed by nvidia-smi ({problem}): GPU parts SKIP or are rehearsed "
                        "on the CPU")
        self.ctx.update(gpu=usable, gpu_total_mib=gpus[0]["memory_mib"] if gpus and usable else None)
        self.write()
        for step, cap, least in STEPS[1:]:
            if unusable and step not in ("prepare", "parity", "serve"):
                self.record(step, "skip", f"not run: {unusable}")
                continue
            if step in GPU_ONLY and not usable:
                self.record(step, "skip", "no GPU (cannot be rehearsed on a CPU; its sizing is tested)")
                continue
            if step == "oom" and "oom_plan" not in self.ctx:
                self.record(step, "failed", "not run: the card's memory is unknown (nvidia-smi)")
                continue
            if step != "prepare" and "nets" not in self.ctx:
                self.record(step, "failed", "not run: the nets were not prepared")
                continue
            got = self.run_step(step, cap, least)
            if step == "prepare":
                for key, ctx_key in (("nets", "nets"), ("refs", "refs_cpu"), ("oom_plan", "oom_plan")):
                    if key in got:
                        self.ctx[ctx_key] = got[key]
        return 1 if self.results["failed"] else 0

    def summary(self) -> None:
        r = self.results
        gpu = r.get("nvidia_smi") or []
        print(
            f"[gpu_check] ===== summary: {gpu[0]['name'] + ', ' if gpu else ''}GPU usable: {r.get('gpu')}; "
            f"{r['seconds']} s of a {r['budget_s']:.0f} s budget"
            + (f"; STOPPED ({r['stopped']})" if r["stopped"] else ""),
            flush=True,
        )
        for name, s in r["steps"].items():
            print(f"[gpu_check] {s['status'].upper():6} {name}: {s['summary'][:220]}", flush=True)
        print(f"[gpu_check] failed: {', '.join(r['failed']) or 'none'}; figures in {self.out / 'gpu_check.json'}",
              flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="where gpu_check.json, steps.log and servers.log go")
    ap.add_argument("--refs", type=Path, help="the CPU build's answers (the bundle's refs/)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="the whole check's time; each step gets a share")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--ctx", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        return child_main(args.step, args.ctx, args.result)
    if args.out is None:
        ap.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("steps.log", "servers.log"):
        (args.out / name).write_text("")
    check = Check(args.out, args.refs, args.budget_s)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    rc = 1
    try:
        rc = check.run()
    except Stopped as e:
        check.results["stopped"] = f"{e.args[0]} during {check.results.get('running') or 'the check'}"
        rc = 143
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the bookkeeping below runs to its end
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if check.results["running"]:
            check.results["steps"].setdefault(check.results["running"], {"status": "failed", "summary": "stopped"})
        check.write()
        shutil.rmtree(check.work, ignore_errors=True)
        check.summary()
    return rc


if __name__ == "__main__":
    sys.exit(main())

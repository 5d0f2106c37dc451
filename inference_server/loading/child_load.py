"""Load the model in a child process first, so that a Caffe abort cannot take the server down.

Caffe reports most load failures with glog's CHECK / LOG(FATAL), which print one line and abort the
process: an unknown layer type, a malformed prototxt, weights of the wrong shape, a message over
protobuf's read limit, a Reshape whose batch size is baked in. pycaffe cannot turn those into Python
exceptions (glog's failure function may not return, and an exception from it would end in
std::terminate). So before the server's own Net is built, a child process (`python -m
inference_server.loading.child_load`, the same interpreter and pycaffe) does everything pycaffe does at load
that can abort:

- builds the Net from the prototxt and the weights (on the configured device),
- reshapes it to the served input shapes and runs one forward there,
- reshapes it to every other batch size the load runs pycaffe at: 1 and 2 (the batch probe, where the
  server would ever run a batch), and the parity gate's stacked batch (backends other than pycaffe).
  Caffe checks shapes in each layer's Reshape (a Reshape whose batch is baked in, an InnerProduct whose
  input size does not fit), which runs before any forward; a forward at each size would double the cost.

The child imports only pycaffe's native module (`caffe._caffe`, not the `caffe` package with
scikit-image and scipy) and reports, as one JSON line, the served input shapes and output blobs, which
the parent then uses to find a cached ONNX verdict without loading the Net itself. When the child ends
by a signal, its glog FATAL / "Check failed" lines (and protobuf's error lines) become the
ModelLoadError: readiness answers 503 with them, `caffeserve check` prints them and exits 1.

Cost: one more start of the interpreter and of the native module (about 0.5 s here), one more read of
the weights and one forward; measured figures are in docs/onnx.md.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from . import python_layers

EXIT_LOAD_ERROR = 3  # the child found a ModelLoadError (a Python-level refusal) and printed it as JSON
MAX_MESSAGE = 4000
STEP = "caffeserve-loadprobe:"  # the child's progress lines on stderr, so a failure says what it was doing
_GLOG_LINE = re.compile(r"^[FE]\d{4,8} [\d:.]+\s+\d+ (?P<where>[^\]]+)\] (?P<msg>.*)$")


@dataclass
class ProbedLoad:
    input_shapes: dict[str, tuple[int, ...]]  # served (full) shapes, as served.input_shapes finds them
    outputs: list[str]  # served blobs, as served.output_blobs finds them
    batches: list[int]  # the batch sizes a forward ran at
    seconds: float  # wall time of the child, start to exit


def request(cfg) -> dict:
    """What the child needs from the config, as JSON."""
    from .forward_probe import runs_batches
    from .parity import N_RANDOM_INPUTS

    return {
        "prototxt": str(cfg.path(cfg.model.prototxt)),
        "weights": str(cfg.path(cfg.model.weights)),
        "device": [cfg.device.kind if isinstance(cfg.device.kind, str) else cfg.device.kind.value, cfg.device.id],
        "inputs": [[s.name, list(s.shape) if s.shape else None] for s in (cfg.inputs or [])],
        "outputs": [o.name for o in (cfg.outputs or [])],
        "python_layers": python_layers.folder(cfg),
        "batch_two": runs_batches(cfg),
        "parity_stack": (N_RANDOM_INPUTS + (1 if cfg.preprocessing is not None else 0))
        if cfg.backend != "pycaffe"
        else 0,
    }


def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("GLOG_minloglevel", "2")  # Caffe's INFO lines per layer: only errors and the FATAL line matter here
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def failure_message(returncode: int, stderr: str) -> str:
    """Why the child failed, in Caffe's own words where it printed them."""
    lines = []
    for raw in stderr.splitlines():
        line = raw.strip()
        m = _GLOG_LINE.match(line)
        if m:
            lines.append(f"{m['where']}: {m['msg']}")
        elif line.startswith("[libprotobuf ERROR") or line.startswith("[libprotobuf FATAL"):
            lines.append(line.split("] ", 1)[-1] if "] " in line else line)
    if returncode < 0:
        try:
            how = f"Caffe aborted the load ({signal.Signals(-returncode).name})"
        except ValueError:
            how = f"Caffe ended the load with signal {-returncode}"
        if -returncode == signal.SIGKILL and not lines:
            how += ", probably killed for lack of memory"
    else:
        how = f"loading the model failed (exit status {returncode})"
    step = [ln.split(STEP, 1)[1].strip() for ln in stderr.splitlines() if ln.startswith(STEP)]
    if step and step[-1] != "done":
        how += f" while {step[-1]}"
    if not lines:  # no glog line: a Python traceback or something else; its last lines say most
        tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-3:]
        lines = tail
    message = how + (": " + " | ".join(lines) if lines else "")
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


def probe_load(cfg, timeout_s: float | None = None) -> ProbedLoad:
    """Run the load in a child; ModelLoadError with Caffe's message when it fails in any way."""
    t0 = time.perf_counter()
    _allow_python_layers(cfg)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "inference_server.loading.child_load"],
            input=json.dumps(request(cfg)),
            capture_output=True,
            text=True,
            env=_child_env(),
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise ModelLoadError(f"loading the model took longer than {timeout_s:g} s (in the load probe)") from None
    seconds = time.perf_counter() - t0
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode in (0, EXIT_LOAD_ERROR) and last.startswith("{"):
        found = json.loads(last)
        if r.returncode == EXIT_LOAD_ERROR:
            raise ModelLoadError(found["error"])
        return ProbedLoad(
            {k: tuple(v) for k, v in found["inputs"].items()}, found["outputs"], found["batches"], seconds
        )
    raise ModelLoadError(failure_message(r.returncode, r.stderr))


def _allow_python_layers(cfg) -> None:
    """A net with Python layers: refused here, in the server, unless the config allows them (python_layers.py);
    allowed, their folder is on this process's sys.path, for the Nets it builds after the probe."""
    python_layers.allow(str(cfg.path(cfg.model.prototxt)), python_layers.folder(cfg))


# --- the child

class _RawNet:
    """The few pycaffe Net properties served.py reads, over the native `_caffe.Net` (no `caffe` package import)."""

    def __init__(self, net):
        self.net = net
        names = list(net._blob_names)
        self.blobs = dict(zip(names, net._blobs, strict=True))
        self.inputs = [names[i] for i in net._inputs]
        self.outputs = [names[i] for i in net._outputs]
        self.n_layers = len(net.layers)

    def forward(self) -> None:
        self.net._forward(0, self.n_layers - 1)


def _import_native(full: bool = False):
    """`caffe._caffe` without running `caffe/__init__.py` (which imports scikit-image, scipy, ...); with
    `full`, the whole package (a Python layer's module subclasses `caffe.Layer`, which only it defines)."""
    import importlib.util
    import types

    if full:
        import caffe  # noqa: F401
    elif "caffe" not in sys.modules:
        spec = importlib.util.find_spec("caffe")
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError("pycaffe (the `caffe` package) is not installed")
        pkg = types.ModuleType("caffe")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["caffe"] = pkg
    import caffe._caffe as native

    return native


def _step(what: str) -> None:
    print(f"{STEP} {what}", file=sys.stderr, flush=True)


def _child(req: dict) -> dict:
    from types import SimpleNamespace

    import numpy as np

    from ..backends.pycaffe import set_device
    from . import served

    native = _import_native(full=bool(req.get("python_layers")))
    if req.get("python_layers"):  # allowed by the parent (python_layers.allow): the modules' folder first
        sys.path.insert(0, req["python_layers"])
    kind, device_id = req["device"]
    set_device(kind, device_id, native)
    _step(f"building the Net from {req['prototxt']} and {req['weights']}")
    try:
        net = _RawNet(native.Net(req["prototxt"], 1, weights=req["weights"]))  # 1 == TEST
    except Exception as e:
        raise ModelLoadError(f"pycaffe could not load {req['prototxt']} with weights {req['weights']}: {e}") from None
    cfg = SimpleNamespace(inputs=[SimpleNamespace(name=n, shape=s) for n, s in req["inputs"]] or None,
                          outputs=[SimpleNamespace(name=n) for n in req["outputs"]] or None)
    shapes = served.input_shapes(cfg, net)
    outputs = served.output_blobs(cfg, net)
    served_batch = next(iter(shapes.values()))[0] if shapes else 1
    sizes = {served_batch, 1}
    if req["batch_two"]:
        sizes.add(2)
    if req["parity_stack"]:
        sizes.add(req["parity_stack"] * served_batch)
    rng = np.random.default_rng(0)
    # The served batch first, with a forward: a net that cannot run other batch sizes fails there with its
    # own message. The other sizes are reshaped to, not run: Caffe checks shapes in each layer's Reshape
    # (a baked-in Reshape, an InnerProduct's input size), and a forward would double the probe's cost.
    for b in [served_batch, *sorted(sizes - {served_batch})]:
        why = ("the served batch" if b == served_batch else "the batch probe (the server would run batches; with "
               "limits.maxBatch 1 and batching off it runs none)" if b == 2 else
               "the parity gate's stacked batch" if b != 1 else "the probe's single items")
        _step(f"{'running a forward' if b == served_batch else 'reshaping the Net'} at batch {b} ({why})")
        for name, shape in shapes.items():
            full = (b, *shape[1:]) if shape else shape
            net.blobs[name].reshape(*full)
        net.net.reshape()
        if b == served_batch:
            for name in shapes:
                net.blobs[name].data[...] = rng.uniform(-1, 1, net.blobs[name].data.shape)
            net.forward()
    _step("done")
    return {"inputs": {k: list(v) for k, v in shapes.items()}, "outputs": outputs,
            "batches": [served_batch, *sorted(sizes - {served_batch})]}


def main() -> int:
    req = json.loads(sys.stdin.read())
    try:
        found = _child(req)
    except ModelLoadError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return EXIT_LOAD_ERROR
    print(json.dumps(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`backend: auto`'s onnxruntime check in a child process, while the server already serves with pycaffe.

The child (`python -m inference_server.loading.background`, the same interpreter) converts the net (or
finds the graph in the shared cache), runs the parity gate and the timing (selection.evaluate), writes
the verdict to the local cache, and prints the Evaluation as one JSON line; the server then publishes it
to the shared cache (serving/switch.py). Why a process, not a thread: conversion and the gate run Python
for seconds to minutes; in a thread they would hold the GIL that the server's event loop needs.

Its CPU priority: the server's by default. `CAFFESERVE_AUTO_CHECK_NICE=N` lowers it (`nice` N), so that
requests come first on a busy machine, at a price measured here: the timing then runs starved too, and
ONNX Runtime's thread pool loses more to contention than pycaffe does (the inception-size net timed at
2.2x pycaffe's speed at nice 10, 1.2-2.1x at nice 19, 5.6-7.2x at nice 0, the same minutes, load average 7),
so a low priority on a busy node can cache a wrong "not faster" verdict. A child that crashes (a Caffe
abort, the OOM killer) or fails in any way is reported as a reason, never as a load failure: the model
keeps serving with pycaffe.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time

from ..backends import BackendChoice
from . import python_layers
from .child_load import EXIT_LOAD_ERROR, ProbedLoad, _child_env, failure_message

log = logging.getLogger("caffeserve.backends")

NICE_ENV = "CAFFESERVE_AUTO_CHECK_NICE"
DEFAULT_NICE = 0  # the module docstring says why not lower


class Cancelled(Exception):
    """The check was stopped (the model is unloaded or the server stops)."""


def failed(why: str, seconds: float | None = None) -> BackendChoice:
    """pycaffe keeps serving: the check could not finish."""
    details: dict[str, object] = {"backend_check": "failed", "backend_check_error": why}
    if seconds is not None:
        details["backend_check_seconds"] = round(seconds, 3)
    return BackendChoice("pycaffe", f"auto: serving with pycaffe because the onnxruntime check failed: {why}", details)


@dataclasses.dataclass
class CheckResult:
    choice: BackendChoice
    graph: str | None = None  # the converted graph judged (local or shared cache), where there is one
    verdict_file: str | None = None  # the local verdict, not yet published (serving/switch.py publishes it)


class BackgroundCheck:
    """One model's check; `run` blocks (call it from a thread of its own), `cancel` ends the child."""

    def __init__(self, cfg, probed: ProbedLoad):
        self.cfg, self.probed = cfg, probed
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.cancelled = False

    def request(self) -> str:
        cfg, probed = self.cfg, self.probed
        return json.dumps({
            "config": cfg.model_dump(mode="json", by_alias=True, exclude={"base_dir"}),
            "base_dir": cfg.base_dir,
            "probed": {"inputs": {k: list(v) for k, v in probed.input_shapes.items()}, "outputs": probed.outputs,
                       "batches": probed.batches},
        })

    def run(self) -> CheckResult:
        """The choice the check leads to (pycaffe with the reason where it failed); Cancelled if cancelled."""
        from .selection import Evaluation, finish

        t0 = time.perf_counter()
        with self._lock:
            if self.cancelled:
                raise Cancelled()
            self._proc = subprocess.Popen([sys.executable, "-m", "inference_server.loading.background"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=_child_env())
        out, err = self._proc.communicate(self.request())
        seconds = time.perf_counter() - t0
        if self.cancelled:
            raise Cancelled()
        rc = self._proc.returncode
        last = out.strip().splitlines()[-1] if out.strip() else ""
        if rc in (0, EXIT_LOAD_ERROR) and last.startswith("{"):
            found = json.loads(last)
            if rc == EXIT_LOAD_ERROR:
                return CheckResult(failed(found["error"], seconds))
            ev = Evaluation(**found)
            choice = finish(self.cfg, ev, seconds)
            choice.details.update(backend_check="done", backend_check_seconds=round(seconds, 3))
            return CheckResult(choice, ev.artifact, ev.verdict_file)
        return CheckResult(failed(_ended(rc, err), seconds))

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()


def _ended(returncode: int, stderr: str) -> str:
    """How the child ended, in child_load's words (Caffe's own lines where it printed them), said of the check."""
    message = failure_message(returncode, stderr)
    for load, check in (("Caffe aborted the load", "its process ended"), ("Caffe ended the load", "its process ended"),
                        ("loading the model failed", "its process failed")):
        message = message.replace(load, check, 1)
    return message


# --- the child

def _nice() -> None:
    try:
        n = int(os.environ.get("CAFFESERVE_AUTO_CHECK_NICE") or DEFAULT_NICE)
        if n:
            os.nice(n)
    except (OSError, ValueError) as e:
        print(f"{NICE_ENV}: cannot lower the priority ({e})", file=sys.stderr)


def _end_with_parent() -> None:
    """A server that exits (os._exit at the end of its grace period) leaves no check running."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main() -> int:
    from ..config import parse_config
    from ..errors import ModelLoadError
    from .selection import evaluate

    _end_with_parent()
    _nice()
    req = json.loads(sys.stdin.read())
    cfg = parse_config(req["config"], req["base_dir"], environ={})  # the parent's overrides are in it already
    p = req["probed"]
    probed = ProbedLoad({k: tuple(v) for k, v in p["inputs"].items()}, p["outputs"], p["batches"], 0.0)
    try:
        python_layers.allow(str(cfg.path(cfg.model.prototxt)), python_layers.folder(cfg))
        ev = evaluate(cfg, probed=probed, publish=False)
    except ModelLoadError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return EXIT_LOAD_ERROR
    except Exception as e:  # reported by the parent as the reason pycaffe keeps serving
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return EXIT_LOAD_ERROR
    print(json.dumps(dataclasses.asdict(ev), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`backend: auto` ready as fast as pycaffe loads: the check beside serving, then the switch.

A model with `auto` and no cached verdict turns ready on pycaffe; this thread then runs the onnxruntime
check in a child process (loading/background.py). Where the verdict is onnxruntime, it starts ONNX
Runtime's workers (their sessions, the batch probe) beside pycaffe's, then swaps the model's executor
on the event loop (Model.adopt_backend): from that moment new requests go to onnxruntime, while the
requests already queued on pycaffe's workers run there (a worker's stop marker sits behind them in its
queue), so no request is lost or answered twice. Then pycaffe's workers stop and its Nets are freed.
Where the verdict is pycaffe, or the check fails in any way (the converter, the gate, a crash of the
child, onnxruntime's workers failing to start), pycaffe keeps serving and the reason says why. So it does
where the server has a memory budget and both backends at once (the switch's overlap) would pass it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..backends import BackendChoice
from ..loading import onnx_cache
from ..loading.background import BackgroundCheck, Cancelled, CheckResult, failed
from .executor import Executor
from .memory import InsufficientMemory, ModelMemory, release_freed_memory, rss_bytes

if TYPE_CHECKING:
    from ..loading.child_load import ProbedLoad
    from .dataplane import Model

log = logging.getLogger(__name__)

SWAP_WAIT_S = 60.0  # how long the switch waits for the event loop to run the swap (a stopping server: never)
# One check at a time per server: a repository server starting many `auto` models would otherwise load every
# model's Net a second time at once (each check is a process holding a Net, the graph and a session).
_ONE_CHECK = threading.Semaphore(1)


class BackendSwitch:
    """The check of one model's `auto` backend beside serving, and the switch it may lead to."""

    def __init__(self, model: Model, probed: ProbedLoad):
        self.model = model
        self.check = BackgroundCheck(model.cfg, probed)
        self.thread = threading.Thread(target=self._run, name=f"backend-check-{model.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
        """Stop the check (the model is unloaded or the server stops); a switch under way is abandoned."""
        self.check.cancel()

    def _run(self) -> None:
        m = self.model
        served = m.stats.inference_count
        try:
            with _ONE_CHECK:
                result = self.check.run()
        except Cancelled:
            return
        except Exception as e:  # the check's own machinery: pycaffe keeps serving, saying why
            log.exception("model %s: the onnxruntime check failed", m.name)
            result = CheckResult(failed(f"{type(e).__name__}: {e}"))
        if self.check.cancelled:
            return
        choice = result.choice
        publish(m.cfg, result, m.stats.inference_count - served)
        if choice.name == "onnxruntime":
            with m.memory_lock or contextlib.nullcontext():  # no load measures its memory meanwhile
                self._switch(choice)
        else:
            _on_loop(m, lambda: m.adopt_backend(choice))
            log.info("model %s: staying with pycaffe (%s)", m.name, choice.reason)

    def _switch(self, choice: BackendChoice) -> None:
        """Start onnxruntime's workers, admit what they hold beside pycaffe's against the memory budget, swap
        them in, stop pycaffe's. Where they fail to start or do not fit, pycaffe stays."""
        m = self.model
        rss0, gpu0 = rss_bytes(), m._gpu_used()
        executor = Executor(m.cfg, choice, on_batch=m._on_batch)
        try:
            desc = executor.start()
        except Exception as e:
            log.warning("model %s: onnxruntime passed the check but its workers did not start: %s", m.name, e)
            why = failed(f"onnxruntime passed the check but its workers did not start: {e}")
            why.details.update({k: v for k, v in choice.details.items() if k not in why.details})
            _on_loop(m, lambda: m.adopt_backend(why))
            return
        try:
            self._admit_both(rss0, gpu0)
        except InsufficientMemory as e:
            executor.stop()
            del executor
            gc.collect()
            release_freed_memory()
            log.warning("model %s: onnxruntime passed the check but does not fit beside pycaffe: %s", m.name, e.message)
            stay = BackendChoice(
                "pycaffe", "auto: serving with pycaffe: onnxruntime passed the check, but pycaffe's Net and "
                f"onnxruntime's sessions, held at once during the switch, do not fit: {e.message}",
                {**choice.details, "backend_check": "done", "backend_switch_refused": e.message})
            _on_loop(m, lambda: m.adopt_backend(stay))
            return
        old = _on_loop(m, lambda: m.adopt_backend(choice, executor, desc))
        if old is None:  # the model was unloaded (or the server stops) meanwhile: it keeps what it had
            executor.stop()
            return
        t0 = time.perf_counter()
        old.stop()  # returns once the requests queued on pycaffe have been answered
        del old
        gc.collect()
        release_freed_memory()
        m.memory.host_bytes = max(0, m.memory.host_bytes + rss_bytes() - rss0)
        gpu1 = m._gpu_used()
        if m.memory.gpu_bytes is not None and gpu0 is not None and gpu1 is not None:
            m.memory.gpu_bytes = max(0, m.memory.gpu_bytes + gpu1 - gpu0)
        m.metrics.set_memory(m.memory.host_bytes, m.memory.gpu_bytes)
        log.info("model %s: switched to onnxruntime (%s); pycaffe's workers drained in %.3f s and were freed",
                 m.name, choice.reason, time.perf_counter() - t0)

    def _admit_both(self, rss0: int, gpu0: int | None) -> None:
        """The server's memory budget (a many-model server's --memory-bytes / --gpu-memory-bytes) must hold
        both backends at once: pycaffe serves until the swap, and its requests drain after it. So what
        onnxruntime's workers grew the process by is checked, on top of the model's pycaffe memory, as a
        load's measured memory is (InsufficientMemory where it does not fit)."""
        m = self.model
        if m.admit is None:
            return
        gpu1 = m._gpu_used()
        both = ModelMemory(host_bytes=m.memory.host_bytes + max(0, rss_bytes() - rss0),
                           gpu_bytes=None if m.memory.gpu_bytes is None or gpu0 is None or gpu1 is None
                           else m.memory.gpu_bytes + max(0, gpu1 - gpu0))
        m.admit(both)


def publish(cfg, result: CheckResult, served: int) -> None:
    """Publish the check's graph and verdict to the shared cache, for the next pod. Not a verdict that
    onnxruntime is not faster, timed while this server answered requests: the timing ran beside them (on 2
    cores, ONNX Runtime's thread pool loses more to them than pycaffe does), so that verdict is dropped and
    the next start times again; the graph is still published (it does not depend on the load)."""
    if result.verdict_file is None:
        return
    local = Path(result.verdict_file)
    choice = result.choice
    verdict: dict | None = None
    if choice.name == "pycaffe" and "speedup" in choice.details and served > 0:
        local.unlink(missing_ok=True)
        choice.reason += (f" (timed while this server answered {served} requests, so not recorded: the next "
                          "start times it again)")
        choice.details["verdict_recorded"] = False
    else:
        try:
            verdict = json.loads(local.read_text())
        except (OSError, ValueError):
            return
    graph = Path(result.graph) if result.graph else None
    onnx_cache.publish_files(onnx_cache.shared_dir(cfg), local.parent, graph, verdict)


def _on_loop(m: Model, fn):
    """Run `fn` on the model's event loop (where requests read the executor) and return its result;
    None where the loop no longer runs."""
    done: concurrent.futures.Future = concurrent.futures.Future()

    def call() -> None:
        try:
            done.set_result(fn())
        except BaseException as e:
            done.set_exception(e)

    loop = m.loop
    if loop is None:
        return None
    try:
        loop.call_soon_threadsafe(call)
        return done.result(SWAP_WAIT_S)
    except (RuntimeError, concurrent.futures.TimeoutError):  # the loop is closed or stopped
        return None

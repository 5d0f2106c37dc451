"""Worker threads that own the Nets, their shared queue, and dynamic batching.

Caffe's mode and device are per thread, so each Net is created and used by one thread for its
whole life. Requests reach the workers through one bounded queue; a worker takes the oldest item,
and with batching on keeps taking compatible items (same per-item shapes and outputs) until the batch
is full or `max_queue_delay_ms` has passed since it took the first. Results go back to the asyncio
loop with one `call_soon_threadsafe` per item. Items whose deadline passed while queued are never run.

A forward pass short enough (under INLINE_MAX_S per request, measured as the model serves) runs on the
event loop itself when the worker is idle: one CPU instance, batching off. For a net like the digits
one the hand-off to a worker and back (a futex wake, a self-pipe write, two GIL switches) costs more
than the forward pass: ~40% of the request's GIL-holding samples under py-spy. A lock keeps the worker
and the loop off the Net at the same time; a forward that grows slower (a larger batch, a busier
machine) goes back to the worker.

Batching is only ever on for a batch-separable net (loading/forward_probe.py, run by the first worker at load):
`enabled: true` on any other net is a load error naming the output, `auto` leaves it off and says why.
The split asserts what it assumes (every output's axis 0 is the stacked batch) and fails the batch
rather than hand out rows that belong to someone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..backends import BackendChoice, create_backend
from ..backends.base import Backend, NetDescription
from ..config import ServerConfig
from ..errors import DeadlineExceeded, GpuOutOfMemory, InferenceError, ModelLoadError, Unavailable
from ..loading.calibration import BatchingDecision, decide, measure_curve
from ..loading.forward_probe import NetProbe, probe, runs_batches
from ..loading.parity import value_range

log = logging.getLogger(__name__)

INLINE_MAX_S = 0.0002  # a forward pass expected under this runs on the event loop (see the module docstring)
_EWMA = 0.2  # weight of the newest forward pass in the per-row time estimate
# A forward pass counts at most this in the estimate: one the OS held up (a busy machine preempts the
# thread mid-pass) must not send the next requests through the worker hop, which costs more than the
# pass. A net that is slow on every pass still crosses INLINE_MAX_S after a few.
_ROW_SAMPLE_MAX_S = 2 * INLINE_MAX_S


@dataclass(slots=True)
class WorkItem:
    inputs: dict[str, np.ndarray]  # float32, batch dimension first
    outputs: list[str]
    batch: int
    deadline: float  # time.monotonic()
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0

    def signature(self):
        return (tuple((k, v.shape[1:]) for k, v in self.inputs.items()), tuple(self.outputs))


@dataclass(slots=True)
class Timing:
    queue_s: float
    compute_s: float
    batch_size: int


def _deliver(fut: asyncio.Future, result, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _post(loop: asyncio.AbstractEventLoop, *args) -> None:
    """Hand a result to the event loop; once shutdown has closed it, nobody waits for the result."""
    try:
        loop.call_soon_threadsafe(*args)
    except RuntimeError:  # loop closed: the request was cut off at the end of the grace period
        pass


def _expire(fut: asyncio.Future) -> None:
    # the worker sees the deadline too and skips the item if it has not started it yet
    _deliver(fut, None, DeadlineExceeded("the request did not complete within its deadline"))


class Executor:
    """Runs `instances` worker threads, each owning one backend instance."""

    _STOP = object()

    def __init__(self, cfg: ServerConfig, choice: BackendChoice, on_batch=None):
        self.cfg = cfg
        self.choice = choice
        self.instances = cfg.instances
        self.max_queue = cfg.limits.max_queue
        self.batching = cfg.batching.enabled is True
        self.max_batch = cfg.batching.max_batch_size
        self.max_delay = cfg.batching.max_queue_delay_ms / 1000.0
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.pending = 0  # queued or running; only the event loop thread touches it
        self.threads: list[threading.Thread] = []
        self.description: NetDescription | None = None
        self.on_batch = on_batch  # callback(batch_size, compute_s) for metrics, called in the worker thread
        self.decision: BatchingDecision | None = None  # set with `batching: auto`
        self.probe: NetProbe = None  # type: ignore[assignment]  # set by the first worker at load
        # the inline path (module docstring): the worker's backend, when the config allows it
        self.inline_backend: Backend | None = None
        self.net_lock = threading.Lock()  # held by whoever runs a forward pass on the Net
        self.row_s = float("inf")  # recent forward time per batch row (seconds), from both paths

    # --- lifecycle
    def start(self) -> NetDescription:
        """Create every backend in its own thread; raises ModelLoadError if any fails to load."""
        ready: list[tuple[NetDescription, BaseException | None]] = []
        cond = threading.Condition()

        for i in range(self.instances):
            t = threading.Thread(target=self._run, args=(i, ready, cond), name=f"net-worker-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        with cond:
            cond.wait_for(lambda: len(ready) == self.instances)
        errors = [err for _, err in ready if err is not None]
        if errors:
            self.stop()
            raise errors[0] if isinstance(errors[0], ModelLoadError) else ModelLoadError(str(errors[0]))
        self.description = ready[0][0]
        return self.description

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask every worker to end after its current item; True when all ended within `timeout`."""
        self.inline_backend = None
        for _ in self.threads:
            self.queue.put(self._STOP)
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    # --- submission (event loop thread)
    def run_inline(self, inputs: dict[str, np.ndarray], outputs: list[str], batch: int,
                   deadline: float) -> tuple[dict[str, np.ndarray], Timing] | None:
        """(outputs, timing) of a forward pass run here, on the event loop, when it may be (the module
        docstring); None when the request must go to a worker (`submit`)."""
        backend = self.inline_backend
        if (backend is None or self.pending or batch * self.row_s > INLINE_MAX_S
                or not self.net_lock.acquire(blocking=False)):
            return None
        try:
            start = time.monotonic()
            if start > deadline:
                raise DeadlineExceeded("the request's deadline passed before it reached the model")
            try:
                result = backend.infer(inputs, outputs)
            except InferenceError:
                raise
            except Exception as e:  # a backend failure is the server's fault: 500 with the message
                log.exception("forward pass failed")
                raise InferenceError(f"inference failed: {e}") from None
            compute = time.monotonic() - start
        finally:
            self.net_lock.release()
        self.row_s += _EWMA * (min(compute / batch, _ROW_SAMPLE_MAX_S) - self.row_s)
        if self.on_batch is not None:
            self.on_batch(batch, compute)
        return result, Timing(0.0, compute, batch)

    async def submit(self, inputs: dict[str, np.ndarray], outputs: list[str], batch: int, deadline: float):
        if self.pending >= self.max_queue:
            raise Unavailable(f"the model's queue is full ({self.max_queue} requests); retry later", retry_after_s=1)
        done = self.run_inline(inputs, outputs, batch, deadline)
        if done is not None:
            return done
        self.pending += 1
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.put(WorkItem(inputs, outputs, batch, deadline, fut, loop))
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), _expire, fut)
        try:
            return await fut
        finally:
            timer.cancel()
            self.pending -= 1

    # --- worker thread
    def _run(self, index: int, ready: list, cond: threading.Condition) -> None:
        try:
            backend = create_backend(self.cfg, self.choice)
            desc = backend.describe()
            if index == 0:
                self._probe(backend, desc)
            err = None
        except Exception as e:  # reported to start(); the thread ends
            backend, desc, err = None, None, e
        with cond:
            ready.append((desc, err))
            cond.notify_all()
        if err is not None:
            return
        if index == 0 and self.instances == 1 and not self.batching and self.cfg.device.kind == "cpu":
            self.inline_backend = backend
        # only the inline path shares this worker's Net: with several instances each worker runs alone
        # (one lock for all of them would run their forward passes one at a time)
        lock = self.net_lock if self.inline_backend is backend else contextlib.nullcontext()
        carry: WorkItem | None = None
        while True:
            first = carry if carry is not None else self.queue.get()
            carry = None
            if first is self._STOP:
                return
            batch = [first]
            if self.batching:
                batch, carry = self._gather(first)
            with lock:
                self._execute(backend, batch)
            if carry is self._STOP:
                return

    def _probe(self, backend, desc: NetDescription) -> None:
        """Find the data-dependent output shapes and whether the net may be batched; then apply `batching`."""
        items = {b.name: b.shape[1:] for b in desc.inputs}
        declared = {b.name: b.shape for b in desc.outputs}
        outputs = [b.name for b in desc.outputs]
        enabled = self.cfg.batching.enabled
        self.probe = probe(backend, declared, items, outputs, self.cfg.parity_tolerance,
                           value_range(self.cfg.preprocessing), runs_batches(self.cfg))
        if not self.probe.separable:
            if enabled is True:
                raise ModelLoadError(f"batching is enabled but this net cannot be batched: {self.probe.reason}; "
                                     "set batching.enabled to false (or auto, which batches only nets that can)")
            if enabled == "auto":
                self.decision = BatchingDecision(False, 1, f"the net cannot be batched: {self.probe.reason}")
                self.batching, self.max_batch = False, 1
                log.info("batching auto: off (%s)", self.decision.reason)
            return
        if enabled == "auto":
            self._calibrate(backend, items, outputs)

    def _calibrate(self, backend, items: dict[str, tuple[int, ...]], outputs: list[str]) -> None:
        """`batching: auto`: time this worker's Net at several batch sizes and decide (before serving)."""
        curve = measure_curve(backend, items, outputs, self.cfg.batching.max_batch_size)
        self.decision = decide(curve, self.cfg.batching)
        self.batching = self.decision.enabled
        self.max_batch = self.decision.max_batch_size
        log.info("batching auto: %s (%s)", "on" if self.batching else "off", self.decision.reason)

    def _gather(self, first: WorkItem):
        """Collect compatible items behind `first`; returns (batch, an item that did not fit or None)."""
        batch, size, sig = [first], first.batch, first.signature()
        until = time.monotonic() + self.max_delay
        while size < self.max_batch:
            remaining = until - time.monotonic()
            try:
                item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is self._STOP or item.signature() != sig or size + item.batch > self.max_batch:
                return batch, item
            batch.append(item)
            size += item.batch
        return batch, None

    def _execute(self, backend, items: list[WorkItem]) -> None:
        now = time.monotonic()
        live = []
        for it in items:
            if it.future.cancelled():
                continue
            if now > it.deadline:
                _post(
                    it.loop,
                    _deliver,
                    it.future,
                    None,
                    DeadlineExceeded("the request's deadline passed while it was queued"),
                )
                continue
            live.append(it)
        if not live:
            return
        try:
            if len(live) == 1:
                it = live[0]
                results = [backend.infer(it.inputs, it.outputs)]
            else:
                names = list(live[0].inputs)
                stacked = {n: np.concatenate([it.inputs[n] for it in live]) for n in names}
                out = backend.infer(stacked, live[0].outputs)
                rows = sum(it.batch for it in live)
                for k, v in out.items():
                    if v.ndim == 0 or v.shape[0] != rows:  # the probe rules this out; never split a guess
                        raise InferenceError(f"output '{k}' has shape {list(v.shape)} for {rows} stacked items: "
                                             "its axis 0 is not the batch, so it cannot be split between requests")
                results, start = [], 0
                for it in live:
                    results.append({k: v[start : start + it.batch] for k, v in out.items()})
                    start += it.batch
            error: InferenceError | None = None
        except GpuOutOfMemory as e:
            if len(live) == 1:
                results, error = [None], e
            else:  # the stacked batch did not fit: each request on its own may
                for it in live:
                    self._execute(backend, [it])
                return
        except InferenceError as e:
            results, error = [None] * len(live), e
        except Exception as e:  # a backend failure is the server's fault: 500 with the message
            log.exception("forward pass failed")
            results, error = [None] * len(live), InferenceError(f"inference failed: {e}")
        done = time.monotonic()
        batch_size = sum(it.batch for it in live)
        row_s = min((done - now) / batch_size, _ROW_SAMPLE_MAX_S)
        self.row_s = row_s if self.row_s == float("inf") else self.row_s + _EWMA * (row_s - self.row_s)
        for it, res in zip(live, results, strict=True):
            _post(it.loop, _deliver, it.future, (res, Timing(now - it.enqueued, done - now, batch_size)), error)
        if self.on_batch is not None:
            self.on_batch(batch_size, done - now)

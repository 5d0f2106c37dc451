"""Prometheus metrics of the inference server, named the way the ecosystem names them.

The metrics every request touches (its count by code, the in-flight gauge, the request, queue and
compute durations, the batch size) are plain numbers, a duration appended to its histogram's list and put in
its bucket when the counts are read, and become Prometheus families only when /metrics is scraped
(`_RequestCollector`): prometheus_client's own objects take a lock and a Python loop over the buckets per
observation, which cost a small request ~9 µs in all. The
rest (readiness, load time, backend, memory: set once per load) are prometheus_client's gauges.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from .stats import FOLD_AT, drain

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class FastHistogram:
    """A histogram's bucket counts and sum (a value lands in the first bucket whose bound is ≥ it).

    `observe` appends the value; the values are put in their buckets when the counts are read (a scrape) or
    every FOLD_AT values. Any thread may observe (a deque's append is atomic).
    """

    __slots__ = ("bounds", "_counts", "_sum", "created", "_values", "_lock")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self._sum = 0.0
        self.created = time.time()
        self._values: deque[float] = deque()  # observed, not in the counts yet
        self._lock = threading.Lock()  # held while folding

    def observe(self, value: float) -> None:
        values = self._values
        values.append(value)
        if len(values) > FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        with self._lock:
            values = drain(self._values)
            counts, bounds = self._counts, self.bounds
            for v in values:
                counts[bisect_left(bounds, v)] += 1
            self._sum += sum(values)

    @property
    def counts(self) -> list[int]:
        self._fold()
        return self._counts

    @property
    def sum(self) -> float:
        self._fold()
        return self._sum

    def cumulative(self) -> list[tuple[str, float]]:
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            buckets.append((bound, total))
        return buckets


class InFlight:
    """A gauge of requests being handled (event loop only)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class RequestMetrics:
    """One model version's per-request numbers. The event loop updates the request ones; a worker thread or
    the inline path the forward ones (instances run in parallel: the histograms take any thread's values)."""

    __slots__ = ("codes", "codes_created", "in_flight", "request_seconds", "queue_seconds", "compute_seconds",
                 "batch_size")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.codes_created: dict[int, float] = {}
        self.in_flight = InFlight()
        self.request_seconds = FastHistogram(LATENCY_BUCKETS)
        self.queue_seconds = FastHistogram(LATENCY_BUCKETS)
        self.compute_seconds = FastHistogram(LATENCY_BUCKETS)
        self.batch_size = FastHistogram(BATCH_BUCKETS)


_HISTOGRAMS = (  # (name, help, RequestMetrics attribute)
    ("caffeserve_request_duration_seconds", "Time from a complete request to its response.", "request_seconds"),
    ("caffeserve_queue_duration_seconds", "Time a request waited for a worker.", "queue_seconds"),
    ("caffeserve_compute_duration_seconds", "Forward pass time of one (possibly batched) execution.",
     "compute_seconds"),
    ("caffeserve_batch_size", "Items (batch rows) per forward pass.", "batch_size"),
)


class _RequestCollector(Collector):
    """The per-request numbers of every model version as Prometheus families, made at each scrape (the
    same names, types, labels and `_created` series prometheus_client's own Counter/Histogram/Gauge write)."""

    def __init__(self, models: dict[tuple[str, str], RequestMetrics]):
        self.models = models

    def collect(self) -> Iterator[Metric]:
        models = list(self.models.items())
        requests = CounterMetricFamily("caffeserve_inference_requests", "Inference requests by outcome (HTTP code).",
                                       labels=["model", "version", "code"])
        for (model, version), m in models:
            for code, n in list(m.codes.items()):
                requests.add_metric([model, version, str(code)], n, created=m.codes_created[code])
        yield requests
        for name, help_, attr in _HISTOGRAMS:
            family = HistogramMetricFamily(name, help_, labels=["model", "version"])
            created = []
            for (model, version), m in models:
                h: FastHistogram = getattr(m, attr)
                family.add_metric([model, version], h.cumulative(), h.sum)
                created.append(Sample(f"{name}_created", {"model": model, "version": version}, h.created))
            yield family
            if created:  # prometheus_client writes a histogram's `_created` as a gauge family of its own
                gauge = GaugeMetricFamily(f"{name}_created", help_)
                gauge.samples = created
                yield gauge
        in_flight = GaugeMetricFamily("caffeserve_inflight_requests", "Inference requests being handled.",
                                      labels=["model", "version"])
        for (model, version), m in models:
            in_flight.add_metric([model, version], m.in_flight.value)
        yield in_flight


class MetricFamilies:
    """Every metric family of one server, in one registry: each model's ServerMetrics are label children of
    these (a server holding many models renders them all on one /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # per model version, kept across reloads (the counters are cumulative, as Prometheus expects)
        self.request_metrics: dict[tuple[str, str], RequestMetrics] = {}
        r.register(_RequestCollector(self.request_metrics))
        self.ready = Gauge(
            "caffeserve_model_ready", "1 when the model is loaded and serving.", ["model", "version"], registry=r,
        )
        self.load_seconds = Gauge(
            "caffeserve_model_load_seconds", "Seconds from the start of the model's load to ready (0 until ready).",
            ["model", "version"], registry=r,
        )
        self.backend = Gauge(
            "caffeserve_model_backend_info", "The backend serving the model, and why (value is always 1).",
            ["model", "version", "backend", "reason"], registry=r,
        )
        self.backend_since = Gauge(
            "caffeserve_model_backend_since_timestamp_seconds",
            "Unix time since which the backend in caffeserve_model_backend_info serves the model.",
            ["model", "version"], registry=r,
        )
        self.backend_switches = Counter(
            "caffeserve_model_backend_switches", "Switches of a served model from one backend to another "
            "(backend: auto, once its onnxruntime check beside serving found onnxruntime faster).",
            ["model", "version", "from_backend", "to_backend"], registry=r,
        )
        self.batching = Gauge(
            "caffeserve_batching_max_batch_size", "Largest stacked batch in use (1: batching off).",
            ["model", "version"], registry=r,
        )
        self.calibration = Gauge(
            "caffeserve_batching_calibration_items_per_second", "Measured items/s per batch size (batching: auto).",
            ["model", "version", "batch"], registry=r,
        )
        self.memory = Gauge(
            "caffe_model_memory_bytes", "Memory a loaded model holds, measured at its load: host RSS growth "
            "(memory=host) and GPU memory (memory=gpu); 0 once unloaded.", ["model", "version", "memory"], registry=r,
        )
        self.budget = Gauge(
            "caffe_memory_budget_bytes", "The memory models may hold in this server (absent: no budget).",
            ["memory"], registry=r,
        )


class ServerMetrics:
    """One model's metrics: label children of the server's families (created once, so the hot path does a
    dict lookup and an observe)."""

    def __init__(self, model: str, version: str, families: MetricFamilies | None = None):
        self.families = f = families or MetricFamilies()
        self.registry = f.registry
        self.labels = {"model": model, "version": version}
        hot = f.request_metrics.get((model, version))
        if hot is None:
            hot = f.request_metrics[(model, version)] = RequestMetrics()
        self._hot = hot
        self._codes, self._codes_created = hot.codes, hot.codes_created
        self.request_seconds = hot.request_seconds
        self.queue_seconds = hot.queue_seconds
        self.compute_seconds = hot.compute_seconds
        self.batch_size = hot.batch_size
        self.in_flight = hot.in_flight
        self.ready = f.ready.labels(**self.labels)
        self.load_seconds = f.load_seconds.labels(**self.labels)
        self.backend = f.backend
        self.batching = f.batching.labels(**self.labels)
        self.calibration = f.calibration
        self._backend: tuple[str, str] | None = None  # the backend_info labels set now

    def set_memory(self, host: int, gpu: int | None) -> None:
        self.families.memory.labels(memory="host", **self.labels).set(host)
        if gpu is not None:
            self.families.memory.labels(memory="gpu", **self.labels).set(gpu)

    def count(self, code: int) -> None:
        """One request answered with `code` (event loop only)."""
        n = self._codes.get(code)
        if n is None:
            self._codes_created[code] = time.time()
            n = 0
        self._codes[code] = n + 1

    def observe_batch(self, size: int, compute_s: float) -> None:
        """One forward pass (a worker thread, or the event loop running it inline)."""
        self.batch_size.observe(size)
        self.compute_seconds.observe(compute_s)

    def set_backend(self, backend: str, reason: str, since: float | None = None) -> None:
        """The serving backend and why (the previous series removed: one backend_info series per model);
        a change of backend counts as a switch."""
        previous = self._backend
        if previous == (backend, reason):
            return
        if previous is not None:
            try:
                self.backend.remove(self.labels["model"], self.labels["version"], *previous)
            except KeyError:
                pass
            if previous[0] != backend:
                self.families.backend_switches.labels(from_backend=previous[0], to_backend=backend,
                                                      **self.labels).inc()
        self._backend = (backend, reason)
        self.backend.labels(backend=backend, reason=reason, **self.labels).set(1)
        if since is not None:
            self.families.backend_since.labels(**self.labels).set(since)

    def set_batching(self, enabled: bool, max_batch: int, curve: list[dict]) -> None:
        self.batching.set(max_batch if enabled else 1)
        for point in curve:
            self.calibration.labels(batch=str(point["batch"]), **self.labels).set(point["items_per_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)

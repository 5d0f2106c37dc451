"""Prometheus metrics of the inference server, named the way the ecosystem names them.

Label children are created once and cached, so the hot path does a dict lookup and an observe.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class MetricFamilies:
    """Every metric family of one server, in one registry: each model's ServerMetrics are label children of
    these (a server holding many models renders them all on one /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "caffeserve_inference_requests", "Inference requests by outcome (HTTP code).",
            ["model", "version", "code"], registry=r,
        )
        self.request_seconds = Histogram(
            "caffeserve_request_duration_seconds", "Time from a complete request to its response.",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_seconds = Histogram(
            "caffeserve_queue_duration_seconds", "Time a request waited for a worker.",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.compute_seconds = Histogram(
            "caffeserve_compute_duration_seconds", "Forward pass time of one (possibly batched) execution.",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "caffeserve_batch_size", "Items (batch rows) per forward pass.",
            ["model", "version"], buckets=BATCH_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            "caffeserve_inflight_requests", "Inference requests being handled.", ["model", "version"], registry=r,
        )
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
        self.requests = f.requests
        self.request_seconds = f.request_seconds.labels(**self.labels)
        self.queue_seconds = f.queue_seconds.labels(**self.labels)
        self.compute_seconds = f.compute_seconds.labels(**self.labels)
        self.batch_size = f.batch_size.labels(**self.labels)
        self.in_flight = f.in_flight.labels(**self.labels)
        self.ready = f.ready.labels(**self.labels)
        self.load_seconds = f.load_seconds.labels(**self.labels)
        self.backend = f.backend
        self.batching = f.batching.labels(**self.labels)
        self.calibration = f.calibration
        self._codes: dict[int, Counter] = {}
        self._backend: tuple[str, str] | None = None  # the backend_info labels set now

    def set_memory(self, host: int, gpu: int | None) -> None:
        self.families.memory.labels(memory="host", **self.labels).set(host)
        if gpu is not None:
            self.families.memory.labels(memory="gpu", **self.labels).set(gpu)

    def count(self, code: int) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self.requests.labels(code=str(code), **self.labels)
        child.inc()

    def observe_batch(self, size: int, compute_s: float) -> None:
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

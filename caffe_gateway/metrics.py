"""The gateway's Prometheus metrics.

Per-request figures (REST requests by model and HTTP code, gRPC calls by model, method and
status code, requests by variant, upstream latency of both) are counted as they happen, in plain
dicts that a collector turns into Prometheus families at scrape: an increment on the hot path is
one dict update, not prometheus_client's lock and child lookup (the gateway's handlers all run
on its one event loop); the state figures (queue depth, in flight, endpoints, retries, ejections) are read from the
balancer when scraped, so they cost the hot path nothing. `caffeserve_gateway_inflight_requests` plus
`caffeserve_gateway_queued_requests` per model is the concurrency an autoscaler would scale on.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from .balancer import Balancer
from .traffic import TrafficState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _BalancerState:
    """Collector reading the balancer's live state at scrape time."""

    def __init__(self, balancer: Balancer):
        self.balancer = balancer

    def collect(self):
        depth = GaugeMetricFamily("caffeserve_gateway_queued_requests",
                                  "Requests waiting in the gateway for a free endpoint.", labels=["model"])
        in_flight = GaugeMetricFamily("caffeserve_gateway_inflight_requests",
                                      "Requests forwarded and not yet answered.", labels=["model"])
        endpoints = GaugeMetricFamily("caffeserve_gateway_endpoints",
                                      "Ready endpoints by state (ejected ones are skipped while healthy ones exist).",
                                      labels=["model", "state"])
        retries = CounterMetricFamily("caffeserve_gateway_retries",
                                      "Requests retried on another endpoint after a connection failure.",
                                      labels=["model"])
        ejections = CounterMetricFamily("caffeserve_gateway_ejections",
                                        "Endpoints ejected after consecutive failures.", labels=["model"])
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:  # scraped outside the loop (tests)
            now = 0.0
        for name, route in sorted(self.balancer.models.items()):
            depth.add_metric([name], route.queued)
            in_flight.add_metric([name], route.in_flight)
            ejected = route.ejected_count(now)
            endpoints.add_metric([name, "ready"], route.ready_count() - ejected)
            endpoints.add_metric([name, "ejected"], ejected)
            retries.add_metric([name], route.retries_total)
            ejections.add_metric([name], route.ejections_total)
        return [depth, in_flight, endpoints, retries, ejections]


class _Counts:
    """A counter family kept as {label values: count}; `collect` exports it."""

    def __init__(self, name: str, documentation: str, labels: list[str]):
        self.name, self.documentation, self.labels = name, documentation, labels
        self.values: dict[tuple, int] = {}

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, n in list(self.values.items()):
            family.add_metric([str(v) for v in key], n)
        return [family]


class _Latency:
    """A histogram per model kept as [count per bucket..., count above the last, sum]; `collect` exports it."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]):
        self.name, self.documentation, self.buckets = name, documentation, buckets
        self.per_model: dict[str, list] = {}

    def observe(self, model: str, seconds: float) -> None:
        h = self.per_model.get(model)
        if h is None:
            h = self.per_model[model] = [0] * (len(self.buckets) + 1) + [0.0]
        h[bisect_left(self.buckets, seconds)] += 1  # the first bucket whose upper bound (le) holds it
        h[-1] += seconds

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model"])
        for model, h in list(self.per_model.items()):
            total, cumulative = 0, []
            for bound, n in zip((*self.buckets, float("inf")), h[:-1], strict=True):
                total += n
                cumulative.append((floatToGoString(bound), total))
            family.add_metric([model], cumulative, sum_value=h[-1])
        return [family]


class GatewayMetrics:
    def __init__(self, balancer: Balancer):
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests = _Counts("caffeserve_gateway_requests", "Requests answered, by model and HTTP code.",
                                 ["model", "code"])
        self._latency = _Latency("caffeserve_gateway_upstream_latency_seconds",
                                 "Time from forwarding a request to an inference server to its whole answer.",
                                 LATENCY_BUCKETS)
        self._grpc_requests = _Counts("caffeserve_gateway_grpc_requests",
                                      "gRPC calls answered, by model, method and gRPC status code.",
                                      ["model", "method", "grpc_code"])
        self._variant_requests = _Counts("caffeserve_gateway_variant_requests",
                                         "Requests answered, by model, variant (primary, canary) and code (HTTP, "
                                         "or the gRPC status name).", ["model", "variant", "code"])
        for collector in (self._requests, self._latency, self._grpc_requests, self._variant_requests,
                          _BalancerState(balancer), TrafficState(balancer)):
            self.registry.register(collector)

    def count(self, model: str, code: int) -> None:
        values, key = self._requests.values, (model, code)
        values[key] = values.get(key, 0) + 1

    def count_grpc(self, model: str, method: str, code: str) -> None:
        values, key = self._grpc_requests.values, (model, method, code)
        values[key] = values.get(key, 0) + 1

    def count_variant(self, model: str, variant: str, code: int | str) -> None:
        values, key = self._variant_requests.values, (model, variant, code)
        values[key] = values.get(key, 0) + 1

    def observe_upstream(self, model: str, seconds: float) -> None:
        self._latency.observe(model, seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

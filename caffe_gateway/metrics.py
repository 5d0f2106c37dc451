"""The gateway's Prometheus metrics.

Per-request figures (REST requests by model and HTTP code, gRPC calls by model, method and
status code, upstream latency of both) are counted as they happen;
the state figures (queue depth, in flight, endpoints, retries, ejections) are read from the
balancer when scraped, so they cost the hot path nothing. `caffeserve_gateway_inflight_requests` plus
`caffeserve_gateway_queued_requests` per model is the concurrency an autoscaler would scale on.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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


class GatewayMetrics:
    def __init__(self, balancer: Balancer):
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests = Counter("caffeserve_gateway_requests", "Requests answered, by model and HTTP code.",
                                 ["model", "code"], registry=self.registry)
        self._latency = Histogram("caffeserve_gateway_upstream_latency_seconds",
                                  "Time from forwarding a request to an inference server to its whole answer.",
                                  ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._grpc_requests = Counter("caffeserve_gateway_grpc_requests",
                                      "gRPC calls answered, by model, method and gRPC status code.",
                                      ["model", "method", "grpc_code"], registry=self.registry)
        self._variant_requests = Counter("caffeserve_gateway_variant_requests",
                                         "Requests answered, by model, variant (primary, canary) and HTTP code.",
                                         ["model", "variant", "code"], registry=self.registry)
        self.registry.register(_BalancerState(balancer))
        self.registry.register(TrafficState(balancer))
        self._variant_children: dict[tuple[str, str, int], object] = {}
        self._request_children: dict[tuple[str, int], object] = {}
        self._grpc_children: dict[tuple[str, str, str], object] = {}
        self._latency_children: dict[str, object] = {}

    def count(self, model: str, code: int) -> None:
        key = (model, code)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self._requests.labels(model, str(code))
        child.inc()

    def count_grpc(self, model: str, method: str, code: str) -> None:
        key = (model, method, code)
        child = self._grpc_children.get(key)
        if child is None:
            child = self._grpc_children[key] = self._grpc_requests.labels(model, method, code)
        child.inc()

    def count_variant(self, model: str, variant: str, code: int) -> None:
        key = (model, variant, code)
        child = self._variant_children.get(key)
        if child is None:
            child = self._variant_children[key] = self._variant_requests.labels(model, variant, str(code))
        child.inc()

    def observe_upstream(self, model: str, seconds: float) -> None:
        child = self._latency_children.get(model)
        if child is None:
            child = self._latency_children[model] = self._latency.labels(model)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

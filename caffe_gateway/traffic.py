"""Traffic between a model's variants, and the load signal autoscalers read.

Variants (canary): a model has its primary route and, while a canary runs, a canary route with
`percent` of the requests (balancer.Balancer.set_canary; from the Services' labels in a cluster,
inference_server/slices.py). The split is a weighted round robin with a running credit, so over
any N requests the canary gets N × percent / 100 of them, ±1: exact, not a coin toss. A request
whose URL names a version (`/v2/models/m/versions/v/...`) goes to the variant serving `v` when
exactly one does. A variant with no ready endpoint and no hold takes no share: its requests go to the other
(so a canary that is still loading, or being removed, fails nothing). A primary scaled to zero
keeps its share: its requests are held, and wake it.

The load signal: in-flight + queued requests (held ones included) per model and variant, what
KEDA's HTTP add-on and Knative's KPA scale on. The gateway serves it
- as JSON for KEDA's `metrics-api` scaler: `GET /autoscaling/{model}[/{variant}]` →
  `{"model", "variant", "concurrency", "inFlight", "queued", "readyEndpoints"}`, read with
  `valueLocation: concurrency` (KEDA divides by the ScaledObject's `targetValue` per replica);
- on /metrics as `caffeserve_gateway_concurrency{model,variant}` for a Prometheus scaler.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .balancer import Balancer, ModelRoute

AUTOSCALING_PREFIX = "/autoscaling/"


def pinned_version(rest: str) -> str | None:
    """`m/versions/v/infer` → "v"; None when the path names no version."""
    parts = rest.split("/", 4)
    if len(parts) >= 3 and parts[1] == "versions" and parts[2]:
        return parts[2]
    return None


def _can_take(route: ModelRoute) -> bool:
    """A ready endpoint, or a hold (scaled to zero: the request waits and wakes it)."""
    return bool(route.endpoints) or route.cold_start_s > 0


def choose(balancer: Balancer, model: str, version: str | None = None) -> ModelRoute | None:
    """The route of the variant that takes this request; None for an unknown model."""
    primary = balancer.models.get(model)
    canary = balancer.canaries.get(model)
    if primary is None or canary is None:
        return primary
    if version is not None and primary.version != canary.version:
        if version == canary.version:
            return canary if _can_take(canary) or not _can_take(primary) else primary
        if version == primary.version:
            return primary
    if not _can_take(canary):
        return primary
    if not _can_take(primary):
        return canary
    canary.credit += canary.percent
    if canary.credit >= 100.0:
        canary.credit -= 100.0
        return canary
    return primary


def fallback(balancer: Balancer, route: ModelRoute) -> ModelRoute | None:
    """Where a request goes when its variant lost its endpoints while it waited (a canary rolled
    back or promoted): the other variant, if it has a ready endpoint."""
    model = route.name
    primary, canary = balancer.models.get(model), balancer.canaries.get(model)
    other = primary if route is not primary else canary
    if other is not None and other is not route and other.endpoints:
        return other
    return None


def variant_routes(balancer: Balancer, model: str) -> dict[str, ModelRoute]:
    out = {}
    if (primary := balancer.models.get(model)) is not None:
        out["primary"] = primary
    if (canary := balancer.canaries.get(model)) is not None:
        out["canary"] = canary
    return out


def signal(route: ModelRoute) -> dict:
    """One variant's load, as the metrics-api scaler reads it."""
    return {
        "model": route.name,
        "variant": route.variant,
        "concurrency": route.concurrency(),
        "inFlight": route.in_flight,
        "queued": route.queued,
        "readyEndpoints": route.ready_count(),
    }


def autoscaling_answer(balancer: Balancer, path: str) -> tuple[int, dict]:
    """`/autoscaling/` (every model's variants), `/autoscaling/m` (the primary), `/autoscaling/m/canary`."""
    rest = path[len(AUTOSCALING_PREFIX):].strip("/")
    if not rest:
        return 200, {"models": [signal(r) for name in sorted(balancer.models)
                                for r in variant_routes(balancer, name).values()]}
    model, _, variant = rest.partition("/")
    routes = variant_routes(balancer, model)
    if not routes:
        return 404, {"error": f"model '{model}' is not known to the gateway"}
    route = routes.get(variant or "primary")
    if route is None:
        if variant in ("primary", "canary"):  # no canary now: no load on it
            return 200, {"model": model, "variant": variant, "concurrency": 0, "inFlight": 0, "queued": 0,
                         "readyEndpoints": 0}
        return 404, {"error": f"variant {variant!r}: expected primary or canary"}
    return 200, signal(route)


class TrafficState:
    """Prometheus collector: the load signal and the split, per model and variant (read at scrape)."""

    def __init__(self, balancer: Balancer):
        self.balancer = balancer

    def collect(self):
        concurrency = GaugeMetricFamily(
            "caffeserve_gateway_concurrency",
            "In-flight plus queued requests (held ones included): the autoscaling signal.", labels=["model", "variant"])
        percent = GaugeMetricFamily("caffeserve_gateway_traffic_percent",
                                    "Share of the model's requests each variant is given.", labels=["model", "variant"])
        ready = GaugeMetricFamily("caffeserve_gateway_variant_endpoints",
                                  "Ready endpoints per variant.", labels=["model", "variant"])
        held = CounterMetricFamily("caffeserve_gateway_held_requests",
                                   "Requests that arrived while the variant had no ready endpoint and were held.",
                                   labels=["model", "variant"])
        for name in sorted(self.balancer.models):
            routes = variant_routes(self.balancer, name)
            canary = routes.get("canary")
            for variant, route in routes.items():
                share = (canary.percent if variant == "canary" else 100.0 - canary.percent) if canary else 100.0
                concurrency.add_metric([name, variant], route.concurrency())
                percent.add_metric([name, variant], share)
                ready.add_metric([name, variant], route.ready_count())
                held.add_metric([name, variant], route.held_total)
        return [concurrency, percent, ready, held]

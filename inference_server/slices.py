"""A model server's pods as Kubernetes lists them: the label, the port, the EndpointSlice rules.

The contract between the pods that run `caffeserve serve` and whoever looks for them (the
operator asking why a model is not ready or which backend serves, the gateway routing requests):
every child of CaffeModelService `m` carries the label `caffeserving.io/model: m`; the server
listens on port 8080, named `http`, and (gRPC on) on 8081, named `grpc`; Kubernetes copies the
Service's labels onto its EndpointSlices and the Service's port names onto the slices' ports.
Pure functions of the API's objects, no client: this package stays free of Kubernetes libraries.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MODEL_LABEL = "caffeserving.io/model"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # set by Kubernetes on a Service's slices
PORT_NAME = "http"
PORT = 8080
GRPC_PORT_NAME = "grpc"
GRPC_PORT = 8081


@dataclass(frozen=True)
class SliceEndpoint:
    """One endpoint of an EndpointSlice, as the API documents its fields."""

    address: str  # its first address (IPv4, or IPv6 without brackets)
    port: int
    ready: bool  # `conditions.ready`; absent means ready
    terminating: bool
    pod: str | None  # the Pod it names in `targetRef`, if any
    grpc_port: int | None = None  # the slice's port named `grpc`, if it has one


def slice_port(slice_: Mapping[str, Any]) -> int | None:
    """The server's port in a slice: the one named `http`, else the only one; None if neither."""
    ports = slice_.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") == PORT_NAME), None)
    if port is None and len(ports) == 1 and ports[0].get("name") != GRPC_PORT_NAME:
        port = ports[0].get("port")
    return int(port) if port is not None else None


def slice_grpc_port(slice_: Mapping[str, Any]) -> int | None:
    """The server's gRPC port in a slice: the one named `grpc`; None when the pods serve no gRPC."""
    port = next((p.get("port") for p in slice_.get("ports") or [] if p.get("name") == GRPC_PORT_NAME), None)
    return int(port) if port is not None else None


def slice_endpoints(slice_: Mapping[str, Any], default_port: int | None = None) -> list[SliceEndpoint]:
    """The endpoints of an IP slice that have an address; [] for other address types, or when
    the slice names no server port and no `default_port` is given."""
    if slice_.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
        return []
    port = slice_port(slice_)
    port = default_port if port is None else port
    if port is None:
        return []
    grpc_port = slice_grpc_port(slice_)
    out = []
    for ep in slice_.get("endpoints") or []:
        addresses = ep.get("addresses") or []
        if not addresses:
            continue
        conditions = ep.get("conditions") or {}
        ref = ep.get("targetRef") or {}
        pod = ref.get("name") if ref.get("kind") == "Pod" and ref.get("name") else None
        out.append(SliceEndpoint(addresses[0], int(port), conditions.get("ready") is not False,
                                 bool(conditions.get("terminating")), pod, grpc_port))
    return out


def slice_labels(slice_: Mapping[str, Any]) -> Mapping[str, str]:
    return (slice_.get("metadata") or {}).get("labels") or {}


# --------------------------------------------------------------------------------------------
# traffic: canary variants and scale to zero (read by the gateway, written by the operator)
# --------------------------------------------------------------------------------------------
# Labels on a predictor Service, which Kubernetes copies onto its EndpointSlices (labels are
# copied, annotations are not): which variant of the model the Service's pods serve, its share
# of the model's requests, its model version, and how long the gateway holds a request while the
# variant has no ready pod (scale to zero). A Service without them is the model's only variant:
# primary, 100 %, no hold.
VARIANT_LABEL = "caffeserving.io/variant"  # primary | canary
TRAFFIC_LABEL = "caffeserving.io/traffic-percent"  # "0".."100"
VERSION_LABEL = "caffeserving.io/version"  # the model version (when it is a valid label value)
COLD_START_LABEL = "caffeserving.io/cold-start-timeout-seconds"  # hold up to this long; absent: 0
# A canary's pods carry this label (value: the model) instead of MODEL_LABEL, so that the primary
# Deployment's and Service's selector (MODEL_LABEL) never matches them.
CANARY_OF_LABEL = "caffeserving.io/canary-of"
PRIMARY, CANARY = "primary", "canary"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def label_value_ok(value: str) -> bool:
    """Whether `value` can be a Kubernetes label value (63 characters, alphanumeric at both ends)."""
    return len(value) <= 63 and bool(_LABEL_VALUE.match(value))


@dataclass(frozen=True)
class SliceTraffic:
    """What a slice's labels say about its variant (defaults: the model's only variant)."""

    variant: str = PRIMARY
    percent: float | None = None  # None: not said (a primary takes what the canary leaves)
    version: str | None = None
    cold_start_s: float = 0.0


def slice_traffic(slice_: Mapping[str, Any]) -> SliceTraffic:
    """The traffic labels of a slice; malformed numbers read as absent."""
    labels = slice_labels(slice_)

    def number(key: str) -> float | None:
        try:
            value = float(labels[key])
        except (KeyError, TypeError, ValueError):
            return None
        return value if value >= 0 else None

    percent = number(TRAFFIC_LABEL)
    return SliceTraffic(
        variant=CANARY if labels.get(VARIANT_LABEL) == CANARY else PRIMARY,
        percent=None if percent is None else min(percent, 100.0),
        version=labels.get(VERSION_LABEL) or None,
        cold_start_s=number(COLD_START_LABEL) or 0.0,
    )

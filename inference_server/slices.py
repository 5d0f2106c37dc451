"""A model server's pods as Kubernetes lists them: the label, the port, the EndpointSlice rules.

The contract between the pods that run `caffeserve serve` and whoever looks for them (the
operator asking why a model is not ready or which backend serves, the gateway routing requests):
every child of CaffeModelService `m` carries the label `caffeserving.io/model: m`; the server
listens on port 8080, named `http`, and (gRPC on) on 8081, named `grpc`; Kubernetes copies the
Service's labels onto its EndpointSlices and the Service's port names onto the slices' ports.
Pure functions of the API's objects, no client: this package stays free of Kubernetes libraries.
"""

from __future__ import annotations

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

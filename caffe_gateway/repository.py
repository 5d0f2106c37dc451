"""Triton's model repository calls through the gateway (REST and gRPC): a load or an unload changes what
servers hold, so it goes to every server of the model (its primary and canary endpoints), not to one.

The answer is the servers' own: success when every server succeeded, else the first failure as that
server sent it (its code and message: 409 where the servers do not take loads, 507 where the model does
not fit, ...), or the gateway's own word for a server it could not reach. A model the gateway does not
know has no servers to ask: 404 with a message (the operator's pool decides where a new model goes and
loads it there; the gateway routes to it once it is placed). Which calls these are: inference_server.admin.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .balancer import Balancer, Endpoint, ModelRoute
from .forward import Lost, NotRun, Refused, Unreachable

# A load reads and checks a whole model: longer than an inference's deadline
LOAD_TIMEOUT_S = 600.0


def endpoints_of(balancer: Balancer, model: str, grpc: bool = False) -> list[tuple[ModelRoute, Endpoint]]:
    """Every server of `model` the gateway knows (primary and canary), with a gRPC port where `grpc`."""
    routes = [r for r in (balancer.models.get(model), balancer.canaries.get(model)) if r is not None]
    return [(r, ep) for r in routes for ep in r.endpoints if not grpc or ep.grpc_port is not None]


def unknown_model(model: str) -> str:
    return (f"model '{model}' is not known to the gateway: no server of it to load or unload it on (load it on a "
            "server directly, or place it through the operator)")


async def broadcast(transport, targets: list[tuple[ModelRoute, Endpoint]], request: tuple,
                    timeout_s: float = LOAD_TIMEOUT_S) -> list[tuple[str, Any]]:
    """`request` sent to every target at once through `transport` (forward.py's one attempt); each
    server's address with its answer, or the forward exception that says why there is none."""
    deadline = asyncio.get_running_loop().time() + timeout_s

    async def one(route: ModelRoute, ep: Endpoint) -> tuple[str, Any]:
        try:
            return ep.address, await transport.send(route, ep, request, deadline)
        except (Unreachable, NotRun, Lost, Refused) as e:
            return ep.address, e

    return list(await asyncio.gather(*(one(r, ep) for r, ep in targets)))

"""Triton's ModelStatistics over gRPC through the gateway: a model's counters summed over its replicas.

The same sum as REST's `GET /v2/models/{m}/stats` (stats.py asks every ready replica over REST), answered
as Triton's gRPC message (inference_server.grpc.triton). ModelConfig needs nothing of its own: every
replica serves the same config, so it is forwarded like ModelMetadata.

`model_statistics(balancer, data, context)` is the whole RPC handler: the gRPC proxy registers it.
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.message import DecodeError

from inference_server.errors import grpc_status_name
from inference_server.grpc import messages as pb
from inference_server.grpc.status import retry_trailers
from inference_server.grpc.triton import statistics_response

from .stats import model_stats

RETRY_AFTER_S = 1


async def model_statistics(balancer, data: bytes, context) -> bytes:
    """ModelStatisticsRequest → ModelStatisticsResponse: one model (empty name: every model the gateway knows)."""
    try:
        req = pb.ModelStatisticsRequest.FromString(data)
    except DecodeError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed ModelStatisticsRequest: {e}")
    if not req.name:
        routes = sorted(balancer.models.items())
        results = await asyncio.gather(*(model_stats(route, name, None) for name, route in routes))
        return statistics_response([s for status, payload in results if status == 200 for s in payload])
    route = balancer.models.get(req.name)
    if route is None:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"model '{req.name}' is not known to the gateway")
    status, payload = await model_stats(route, req.name, req.version or None)
    if status != 200:
        code = grpc.StatusCode[grpc_status_name(status)]
        trailing = retry_trailers(code, payload, RETRY_AFTER_S) if status == 503 else ()
        await context.abort(code, payload, trailing_metadata=trailing)
    return statistics_response(payload)

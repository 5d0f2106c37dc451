"""gRPC statuses with retry information, shared by the server (service.py) and the gateway.

A "come back later" status (a full queue, no ready endpoint) says when to retry three ways:
`google.rpc.RetryInfo` in `grpc-status-details-bin` (gRPC's richer error model),
`grpc-retry-pushback-ms` (honoured by gRPC's own retry policy) and `retry-after` (seconds, as
REST's header). Needs grpcio and protobuf only: no numpy, no data plane.
"""

from __future__ import annotations

import grpc

from ..errors import NOT_RUN_HEADER, InferenceError, grpc_status_name
from . import messages as pb

RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo"
# REST's Caffe-Not-Run header as a trailer: this server did not start the call (loading, failed),
# so a gateway may send it to another server, where it runs once.
NOT_RUN_KEY = NOT_RUN_HEADER.lower()


def retry_trailers(code: grpc.StatusCode, message: str, seconds: int) -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata that tells a client to retry `code` after `seconds`."""
    info = pb.RetryInfo()
    info.retry_delay.seconds = seconds
    status = pb.Status(code=code.value[0], message=message)
    status.details.add(type_url=RETRY_INFO_TYPE, value=info.SerializeToString())
    return (("retry-after", str(seconds)), ("grpc-retry-pushback-ms", str(seconds * 1000)),
            ("grpc-status-details-bin", status.SerializeToString()))


def error_status(e: InferenceError) -> tuple[grpc.StatusCode, str, tuple]:
    """The gRPC code, details and trailing metadata for one of our errors (the table lives in errors.py)."""
    code = grpc.StatusCode[grpc_status_name(e.status_code)]
    retry = e.headers.get("Retry-After")
    trailing = () if retry is None else retry_trailers(code, e.message, int(retry))
    if NOT_RUN_HEADER in e.headers:
        trailing += ((NOT_RUN_KEY, "true"),)
    return code, e.message, trailing

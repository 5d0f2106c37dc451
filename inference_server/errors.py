"""One error base class; each subclass carries its HTTP status, mapped to a response once (in serving/app.py)."""

from __future__ import annotations

from caffe_http.server import NOT_RUN_HEADER as NOT_RUN_HEADER  # on a 503 for a request this replica did not start


class InferenceError(Exception):
    """An error a client should see as `{"error": message}` with `status_code`."""

    status_code = 500

    def __init__(self, message: str, status_code: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers or {}


class BadRequest(InferenceError):
    status_code = 400


class NotFound(InferenceError):
    status_code = 404


class PayloadTooLarge(InferenceError):
    status_code = 413


class RequestTimeout(InferenceError):
    status_code = 408


class Unavailable(InferenceError):
    """Not ready, overloaded or shutting down: 503 with an integer Retry-After."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int = 1, not_run: bool = False):
        headers = {"Retry-After": str(int(retry_after_s))}
        if not_run:  # this replica could not start the request; another may (a gateway retries it there)
            headers[NOT_RUN_HEADER] = "true"
        super().__init__(message, headers=headers)


class GpuOutOfMemory(InferenceError):
    """A forward pass at this batch size would not fit in the GPU's free memory; nothing was run.

    507 Insufficient Storage: the request is valid and smaller batches fit; retrying it as is won't help.
    """

    status_code = 507


class Conflict(InferenceError):
    """The call is valid but this server is not set up to take it (e.g. a model load where the model
    control mode is none): 409, gRPC FAILED_PRECONDITION; the message says how to enable it."""

    status_code = 409


class DeadlineExceeded(InferenceError):
    status_code = 504


class ModelLoadError(Exception):
    """The model could not be loaded; the message is the loader's own (shown in readiness and CR status)."""


# The one table from our HTTP codes to gRPC status code names (grpc.StatusCode members), used by the
# gRPC service for every InferenceError; the names, not grpc's enum, so this module needs no grpc.
GRPC_STATUS_OF_HTTP = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    408: "DEADLINE_EXCEEDED",
    409: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
    507: "RESOURCE_EXHAUSTED",  # a load past the memory budget, a batch past the GPU's free memory
}


def grpc_status_name(status_code: int) -> str:
    """The gRPC status code name for an HTTP code (other 4xx: INVALID_ARGUMENT, other 5xx: INTERNAL)."""
    return GRPC_STATUS_OF_HTTP.get(status_code) or ("INVALID_ARGUMENT" if 400 <= status_code < 500 else "INTERNAL")

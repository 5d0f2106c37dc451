"""One error base class; each subclass carries its HTTP status, mapped to a response once (in app.py)."""

from __future__ import annotations


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

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, headers={"Retry-After": str(int(retry_after_s))})


class GpuOutOfMemory(InferenceError):
    """A forward pass at this batch size would not fit in the GPU's free memory; nothing was run.

    507 Insufficient Storage: the request is valid and smaller batches fit; retrying it as is won't help.
    """

    status_code = 507


class DeadlineExceeded(InferenceError):
    status_code = 504


class ModelLoadError(Exception):
    """The model could not be loaded; the message is the loader's own (shown in readiness and CR status)."""

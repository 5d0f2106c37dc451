"""The access log and the log format of the server and the gateway.

`with_access_log(handler, name)` wraps a request handler: one line per request on the logger
`caffeserve.access` (method, path, model, status, response bytes, duration, request id, client), at
INFO; answers 4xx/5xx at WARNING with their `error` message (a readiness 503 while loading or draining
is the probe's expected answer: DEBUG). Successful health probes and metric
scrapes (`/v2/health/*`, `/metrics`: one every few seconds per kubelet and Prometheus) are at DEBUG.
With the access log off (`--no-access-log`) only the 4xx/5xx lines are written: an operator can
still answer "who sent the 400s?".

A request without an `X-Request-Id` gets one (16 hex digits); it is answered in `X-Request-Id`,
and the gateway forwards it, so one id names the same request in the gateway's and the server's
lines. Requests the transport refuses before any handler runs (413 by Content-Length, 408, 431,
malformed HTTP) are logged by `log_refusal` the same way.

`configure_logging(level, fmt)` sets up the process's logging: `text` (one human line) or `json`
(one JSON object per line: time, level, logger, message, and for access lines every field on its
own). Records are handed to a background thread through a queue (`QueueHandler`), so a slow log
reader never blocks the event loop.

What a line costs the request path: the access line is kept as a tuple and its records are made
`FLUSH_S` later, all the lines of those milliseconds at once; the writer thread writes whatever it has
queued in one write. One record and one write per request (each waking the writer thread) had cost
about a third of a small request's server CPU (bench/server_overhead.py measures the line on and off).
Lines keep their own time; every held line is written before the process's logging shuts down.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TextIO

import orjson

from .server import Handler, Request, Response

ACCESS_LOGGER = "caffeserve.access"
_FIELDS = ("method", "path", "model", "status", "bytes", "duration_ms", "request_id", "client", "error", "server")
_QUIET_PATHS = ("/v2/health/live", "/v2/health/ready", "/metrics")
_HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")
MODELS_PREFIX = "/v2/models/"
FLUSH_S = 0.01  # how long an access line may wait for others to be logged with it
_ACCESS_LOGS: weakref.WeakSet[AccessLog] = weakref.WeakSet()  # flushed when logging shuts down


def new_request_id() -> str:
    return os.urandom(8).hex()


def model_of(path: str) -> str:
    """The model a path names (`/v2/models/{m}/...`), else ''."""
    if path.startswith(MODELS_PREFIX):
        name = path[len(MODELS_PREFIX):].split("/", 1)[0]
        return "" if name == "stats" else name
    return ""


def error_message(resp: Response) -> str:
    """The `error` of a JSON error answer (uncompressed), else ''."""
    if resp.status < 400 or not resp.body or any(k.lower() == "content-encoding" for k in resp.headers):
        return ""
    try:
        payload = orjson.loads(resp.body)
    except orjson.JSONDecodeError:
        return resp.body[:200].decode("utf-8", "replace")
    return str(payload.get("error", "")) if isinstance(payload, dict) else ""


class AccessLog:
    """Writes the access lines; `enabled` False keeps only the 4xx/5xx ones."""

    def __init__(self, server: str, enabled: bool = True):
        self.server = server  # "server" or "gateway": which program wrote the line
        self.enabled = enabled
        self.log = logging.getLogger(ACCESS_LOGGER)
        self._held: list[tuple[float, int, str, dict[str, object]]] = []  # (time, level, text, fields), not yet logged
        self._lock = threading.Lock()
        self._scheduled = False
        _ACCESS_LOGS.add(self)

    def write(self, method: str, path: str, status: int, size: int, seconds: float, request_id: str,
              client: str, error: str = "") -> None:
        if status >= 400 and not (path in _HEALTH_PATHS and status == 503):
            level = logging.WARNING
        elif path in _HEALTH_PATHS and status == 503:
            # not ready yet (loading) or any more (draining): the probe's expected answer, polled every
            # few seconds; the server logs the state change itself
            level = logging.DEBUG
        elif not self.enabled:
            return
        elif path in _QUIET_PATHS:
            level = logging.DEBUG
        else:
            level = logging.INFO
        if not self.log.isEnabledFor(level):
            return
        fields = {"method": method, "path": path, "model": model_of(path), "status": status, "bytes": size,
                  "duration_ms": round(seconds * 1000.0, 3), "request_id": request_id, "client": client,
                  "error": error, "server": self.server}
        text = (f'{client} "{method} {path}" {status} {size}B {fields["duration_ms"]:.3f}ms '
                f'model={fields["model"] or "-"} request_id={request_id or "-"}')
        if error:
            text += f" error={orjson.dumps(error).decode()}"
        with self._lock:
            self._held.append((time.time(), level, text, fields))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            asyncio.get_running_loop().call_later(FLUSH_S, self.flush)
        except RuntimeError:  # no event loop in this thread: log it now
            self.flush()

    def flush(self) -> None:
        """Log every held line (as records of their own time)."""
        with self._lock:
            held, self._held, self._scheduled = self._held, [], False
        log = self.log
        for created, level, text, fields in held:
            record = log.makeRecord(log.name, level, "(access)", 0, text, (), None, extra={"access": fields})
            record.created, record.msecs = created, int(created * 1000) % 1000
            log.handle(record)


def with_access_log(handler: Handler, access: AccessLog) -> Handler:
    """`handler` with one access line per request (module docstring)."""
    perf = time.perf_counter

    async def handle(req: Request) -> Response:
        t0 = perf()
        headers = req.headers
        rid = headers.get("x-request-id")
        if not rid:
            rid = headers["x-request-id"] = new_request_id()
        status, size, error = 499, 0, "the client went away before the answer"
        try:
            resp = await handler(req)
            status, size, error = resp.status, len(resp.body), error_message(resp)
            if "X-Request-Id" not in resp.headers:
                resp.headers = {**resp.headers, "X-Request-Id": rid}
            return resp
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError):
                status, error = 500, f"internal error: {type(e).__name__}: {e}"
            raise
        finally:
            access.write(req.method, req.path, status, size, perf() - t0, rid, req.client, error)

    return handle


def log_refusal(access: AccessLog) -> Callable[[str, str, str, int, str], None]:
    """A callback for `HTTPServer.on_refuse`: the transport's own 4xx answers, logged like the others."""

    def refused(client: str, method: str, path: str, status: int, message: str) -> None:
        access.write(method or "-", path or "-", status, 0, 0.0, "", client, message)

    return refused


# ------------------------------------------------------------------------------------------------
# process logging
# ------------------------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message, and access fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if access:
            out.update(access)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return orjson.dumps(out).decode()


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """The process's logging: `fmt` text or json, written by a background thread (module docstring)."""
    target = _BatchWriter(stream)
    target.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = _Listener(q, target)
    listener.start()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.addHandler(_QueueHandler(q, listener))
    root.setLevel(level.upper())


class _BatchWriter(logging.Handler):
    """Formats records as they come and writes them when the writer thread has no more queued: one
    write for a burst of lines. To `stream`, or to whatever sys.stderr is at the write: a command run
    in-process, under a test's captured stderr, never writes to a stream closed since."""

    def __init__(self, stream: TextIO | None):
        super().__init__()
        self.stream = stream
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        if not self.lines:
            return
        text, self.lines = "\n".join(self.lines) + "\n", []
        stream = self.stream if self.stream is not None else sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a closed stream: nothing more can be said
            pass


class _Listener(logging.handlers.QueueListener):
    """The writer thread: writes once its queue is empty (a burst of records, one write)."""

    def __init__(self, q: queue.SimpleQueue[logging.LogRecord], writer: _BatchWriter):
        super().__init__(q, writer, respect_handler_level=False)
        self.writer = writer

    def handle(self, record: logging.LogRecord) -> None:
        super().handle(record)
        if self.queue.empty():  # type: ignore[attr-defined]
            self.writer.flush()

    def stop(self) -> None:
        super().stop()
        self.writer.flush()


class _QueueHandler(logging.handlers.QueueHandler):
    """QueueHandler that keeps the record's own fields (the access dict) for the formatter thread, and
    on close (logging.shutdown(), also at exit) lets that thread write every queued line first."""

    def __init__(self, q: queue.SimpleQueue[logging.LogRecord], listener: logging.handlers.QueueListener):
        super().__init__(q)
        self.listener: logging.handlers.QueueListener | None = listener

    def close(self) -> None:
        for access in list(_ACCESS_LOGS):  # the lines still held, before the writer thread stops
            access.flush()
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.stop()
        super().close()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.message = record.getMessage()
        record.msg, record.args = record.message, None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


def add_logging_arguments(p: argparse.ArgumentParser, default_level: str = "INFO", access_log: bool = True) -> None:
    """--log-level and --log-format on every command (and --no-access-log on those that serve HTTP)."""
    p.add_argument("--log-level", default=default_level, type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log threshold (default %(default)s)")
    p.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                   help="text (the default): one readable line per record; json: one JSON object per line "
                        "(for log collectors)")
    if access_log:
        p.add_argument("--no-access-log", dest="access_log", action="store_false",
                       help="no line per request (default: one line per request; with this flag answers "
                            "4xx/5xx are still logged, with their message)")

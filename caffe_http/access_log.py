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

What a line costs the request path: one tuple of the request's fields, appended to a list. Every
`FLUSH_S` the lines held are formatted (the same text or JSON the record formatter writes, the time
stamp made once per second) and handed to the writer thread as one queue item, which writes them in
one write. They are formatted on the loop's thread, not the writer's: a writer thread that formats
takes the GIL from the requests (measured: 0.02-0.03 ms more CPU per request). One record and one
write per request (each waking the writer thread) had cost about a third of a small request's server
CPU, and a `LogRecord` per line still a sixth (bench/server_overhead.py measures the line on and off).
Where the logging set-up is not `configure_logging`'s alone (another handler, a filter: a test's
capture), each line is a record of its own, as before. Lines keep their own time; every held line is
written before the process's logging shuts down.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.handlers
import queue
import random
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
FLUSH_S = 0.05  # how long an access line may wait for others to be logged with it
_ACCESS_LOGS: weakref.WeakSet[AccessLog] = weakref.WeakSet()  # flushed when logging shuts down


_random_bits = random.SystemRandom().getrandbits(64)  # seeds the generator below from the OS
_ids = random.Random(_random_bits)
_random_id_bits = _ids.getrandbits


def new_request_id() -> str:
    """16 hex digits: a name for the request in the logs, not a secret (no system call per request)."""
    return f"{_random_id_bits(64):016x}"


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


# one held line: (time, level, method, path, status, bytes, seconds, request id, client, error)
Line = tuple[float, int, str, str, int, int, float, str, str, str]


class AccessLog:
    """Writes the access lines; `enabled` False keeps only the 4xx/5xx ones."""

    def __init__(self, server: str, enabled: bool = True):
        self.server = server  # "server" or "gateway": which program wrote the line
        self.enabled = enabled
        self.log = logging.getLogger(ACCESS_LOGGER)
        self._held: list[Line] = []  # not yet handed to logging
        self._lock = threading.Lock()
        self._scheduled = False
        _ACCESS_LOGS.add(self)

    def write(self, method: str, path: str, status: int, size: int, seconds: float, request_id: str,
              client: str, error: str = "") -> None:
        if status < 400:
            if not self.enabled:
                return
            level = logging.DEBUG if path in _QUIET_PATHS else logging.INFO
        elif status == 503 and path in _HEALTH_PATHS:
            # not ready yet (loading) or any more (draining): the probe's expected answer, polled every
            # few seconds; the server logs the state change itself
            level = logging.DEBUG
        else:
            level = logging.WARNING
        if not self.log.isEnabledFor(level):
            return
        line = (time.time(), level, method, path, status, size, seconds, request_id, client, error)
        with self._lock:
            self._held.append(line)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            asyncio.get_running_loop().call_later(FLUSH_S, self.flush)
        except RuntimeError:  # no event loop in this thread: log it now
            self.flush()

    def flush(self) -> None:
        """Hand every held line to logging: as one item to configure_logging's writer thread, or as
        records of their own time where logging is set up otherwise."""
        with self._lock:
            held, self._held, self._scheduled = self._held, [], False
        if not held:
            return
        direct = _direct_writer(self.log)
        if direct is not None:
            q, fmt = direct
            # formatted here, on the loop's thread: the writer thread then needs the GIL only to pick the
            # text up, and does not take it from the requests for the formatting
            q.put_nowait(AccessLines(self.server, fmt.access_lines(self.server, held)))
            return
        for line in held:
            self.log.handle(access_record(self.log.name, self.server, line))


def access_fields(server: str, line: Line) -> tuple[str, dict[str, object]]:
    """(the text line, the fields) of a held line."""
    _, _, method, path, status, size, seconds, request_id, client, error = line
    duration_ms = round(seconds * 1000.0, 3)
    model = model_of(path)
    text = (f'{client} "{method} {path}" {status} {size}B {duration_ms:.3f}ms '
            f'model={model or "-"} request_id={request_id or "-"}')
    if error:
        text += f" error={orjson.dumps(error).decode()}"
    return text, {"method": method, "path": path, "model": model, "status": status, "bytes": size,
                  "duration_ms": duration_ms, "request_id": request_id, "client": client, "error": error,
                  "server": server}


def access_record(name: str, server: str, line: Line) -> logging.LogRecord:
    """A held line as a record of its own time (`access`: its fields, for the JSON format)."""
    created, level = line[0], line[1]
    text, fields = access_fields(server, line)
    record = logging.getLogger(name).makeRecord(name, level, "(access)", 0, text, (), None, extra={"access": fields})
    record.created, record.msecs = created, int(created * 1000) % 1000
    return record


class AccessLines(logging.LogRecord):
    """Formatted access lines handed to the writer thread as one queue item (a record to the queue's
    machinery)."""

    def __init__(self, server: str, lines: list[str]):
        super().__init__(ACCESS_LOGGER, logging.INFO, "(access)", 0, "", (), None)
        self.server, self.lines = server, lines


def _direct_writer(logger: logging.Logger) -> tuple[queue.SimpleQueue[logging.LogRecord], AccessFormatter] | None:
    """The writer thread's queue and formatter when every access record would go there and nowhere else,
    unfiltered, in one of our formats (logging as configure_logging sets it up); else None."""
    c: logging.Logger | None = logger
    while c is not None:
        if c.filters:
            return None
        if c.handlers:
            if c.parent is not None or len(c.handlers) != 1:
                return None
            h = c.handlers[0]
            if not isinstance(h, _QueueHandler) or h.filters or h.level or not isinstance(h.listener, _Listener):
                return None
            writer = h.listener.writer
            fmt = writer.formatter
            if writer.level or writer.filters or not isinstance(fmt, (TextFormatter, JsonFormatter)):
                return None
            return h.queue, fmt  # type: ignore[return-value]
        if not c.propagate:
            return None
        c = c.parent
    return None


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
            status, size = resp.status, len(resp.body)
            error = error_message(resp) if status >= 400 else ""
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
_LEVELS = {level: logging.getLevelName(level) for level in (logging.DEBUG, logging.INFO, logging.WARNING)}


class _SecondStamp:
    """A time stamp's whole-second part, made once per second (strftime is most of a line's cost)."""

    def __init__(self, fmt: str, convert: Callable[[float | None], time.struct_time]):
        self.fmt, self.convert = fmt, convert
        self.second, self.text = -1, ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.second, self.text = second, time.strftime(self.fmt, self.convert(created))
        return self.text


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, and the same line for held access lines without a record each."""

    HEADS_KEPT = 1024  # line heads remembered (then forgotten all at once): clients × paths × codes seen

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._stamp = _SecondStamp(self.default_time_format, self.converter)
        # (level, client, method, path, status) -> the text around the fields that change per line: a client
        # sends the same request many times, and the level name, model and quoting cost most of a line
        self._heads: dict[tuple[int, str, str, str, int], tuple[str, str]] = {}

    def access_lines(self, server: str, lines: list[Line]) -> list[str]:
        stamp, heads = self._stamp, self._heads
        out: list[str] = []
        add = out.append
        second, second_text = -1, ""
        for created, level, method, path, status, size, seconds, request_id, client, error in lines:
            head = heads.get((level, client, method, path, status))
            if head is None:
                if len(heads) >= self.HEADS_KEPT:
                    heads.clear()
                name = _LEVELS.get(level) or logging.getLevelName(level)
                head = heads[(level, client, method, path, status)] = (
                    f' {name} {ACCESS_LOGGER}: {client} "{method} {path}" {status} ',
                    f"ms model={model_of(path) or '-'} request_id=")
            if int(created) != second:  # the lines of one flush share their second, mostly
                second, second_text = int(created), stamp(created)
            # `:.3f` rounds the exact value as round(x, 3) would: the same digits, one call fewer
            text = (f"{second_text},{int(created * 1000) % 1000:03d}{head[0]}{size}B "
                    f"{seconds * 1000.0:.3f}{head[1]}{request_id or '-'}")
            add(f"{text} error={orjson.dumps(error).decode()}" if error else text)
        return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message, and access fields."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = _SecondStamp("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def access_lines(self, server: str, lines: list[Line]) -> list[str]:
        stamp, out = self._stamp, []
        for line in lines:
            created = line[0]
            text, fields = access_fields(server, line)
            record = {"time": f"{stamp(created)}.{int(created * 1000) % 1000:03d}Z",
                      "level": logging.getLevelName(line[1]), "logger": ACCESS_LOGGER, "message": text, **fields}
            out.append(orjson.dumps(record).decode())
        return out

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


AccessFormatter = TextFormatter | JsonFormatter
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """The process's logging: `fmt` text or json, written by a background thread (module docstring)."""
    target = _BatchWriter(stream)
    target.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
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

    def emit_access(self, batch: AccessLines) -> None:
        """Access lines AccessLog.flush has formatted."""
        self.lines.extend(batch.lines)

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
        if isinstance(record, AccessLines):
            self.writer.emit_access(record)
        else:
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

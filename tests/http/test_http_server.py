"""The shared HTTP server's connection handling under pipelining and refusals, as a client sees it.

The real HTTPServer runs in-process on loopback with a trivial handler: what is tested is the
connection handling, which is the same whatever the handler does.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging

import pytest

from caffe_http import server as server_module
from caffe_http.server import Response, ServerLimits

HTTPServer = server_module.HTTPServer


@pytest.fixture(autouse=True, params=[False, True], ids=["task", "eager"])
def eager(request, monkeypatch):
    """Every test twice: requests served by a task and started in the parser's callback (`eager`, the
    inference server's and the gateway's way)."""
    monkeypatch.setitem(globals(), "HTTPServer", functools.partial(server_module.HTTPServer, eager=request.param))
    return request.param


async def _handler(req):
    if req.path == "/slow":
        await asyncio.sleep(0.3)
    return Response(200, b'{"path":"' + req.path.encode() + b'"}')


def _exchange(raw: bytes, limits: ServerLimits, timeout: float = 5.0) -> bytes:
    """Send `raw` on one connection, then read until the server closes it (or `timeout`)."""

    async def run():
        server = HTTPServer(_handler, limits)
        port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        try:
            return await asyncio.wait_for(reader.read(), timeout)
        except TimeoutError:
            return b"<still open after %gs>" % timeout
        finally:
            writer.close()
            await server.stop(1)

    return asyncio.run(run())


def test_a_pipelined_request_that_stalls_in_its_headers_gets_408_within_the_header_deadline():
    # The first request and the start of the second arrive in one packet, then the client goes quiet.
    raw = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHo"
    got = _exchange(raw, ServerLimits(header_timeout_s=0.5, keepalive_timeout_s=30), timeout=3)
    assert got.startswith(b"HTTP/1.1 200 OK"), got
    assert b'{"path":"/a"}' in got
    assert b"HTTP/1.1 408" in got and b"request headers not received within 0.5 s" in got


def test_a_pipelined_request_over_the_limit_does_not_replace_the_answer_to_the_one_before_it():
    raw = (b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
           b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    got = _exchange(raw, ServerLimits(max_body_bytes=10))
    first, _, rest = got.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 OK"), got
    assert rest.startswith(b'{"path":"/slow"}HTTP/1.1 413'), got
    assert b"exceeds the limit of 10 bytes" in rest


def test_a_refused_request_is_answered_without_a_fatal_transport_error(caplog):
    # The refusal raised inside an httptools callback came back wrapped as a parser error; the handler
    # for that raised again out of data_received, so asyncio logged "Fatal error" and aborted the
    # transport (which drops a response still in its write buffer).
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        got = _exchange(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n", ServerLimits(max_body_bytes=10))
        bad = _exchange(b"NOT HTTP AT ALL\r\n\r\n", ServerLimits())
    assert got.startswith(b"HTTP/1.1 413") and bad.startswith(b"HTTP/1.1 400"), (got, bad)
    assert not [r for r in caplog.records if "Fatal error" in r.getMessage()]


# --- refusals a client that sends its whole body first can read (413, and 503 over the byte budget)

import http.client  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402


@contextmanager
def serving(limits: ServerLimits, handler=_handler):
    """The HTTPServer on its own loop in a thread, for blocking clients (http.client) in the test."""
    started = threading.Event()
    box: dict = {}

    def run():
        async def main():
            server = HTTPServer(handler, limits)
            box["port"] = await server.start("127.0.0.1", 0)
            box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
            box["server"] = server
            started.set()
            await box["stop"].wait()
            await server.stop(1)

        asyncio.run(main())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(10)
    try:
        yield box["port"], box["server"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        t.join(10)


def _post(port: int, path: str, body, headers: dict | None = None, timeout: float = 20.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_http_client_reads_the_413_for_a_body_over_the_limit_sent_without_expect():
    # http.client sends the whole body before it reads: closing at once (with unread bytes, so a
    # reset) made it see ConnectionResetError instead of the 413
    limits = ServerLimits(max_body_bytes=64 * 1024)
    with serving(limits) as (port, _):
        for size in (200 * 1024, 8 * 1024 * 1024):
            status, headers, body = _post(port, "/x", b"x" * size)
            assert status == 413, body
            assert b"exceeds the limit of 65536 bytes" in body
            assert headers.get("connection") == "close"
        # a chunked body (no Content-Length) over the limit: refused once its chunks pass it
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("POST", "/x", iter([b"y" * 65536] * 64), encode_chunked=True)
        resp = conn.getresponse()
        status, body = resp.status, resp.read()
        conn.close()
        assert status == 413 and b"exceeds the limit" in body
        # and the server still serves
        assert _post(port, "/ok", b"{}")[0] == 200


def test_a_refused_body_is_drained_only_within_its_bounds():
    limits = ServerLimits(max_body_bytes=1024, max_drain_bytes=1024 * 1024, drain_idle_s=0.5)
    # a declared length above the drain bound: answered and closed at once, never read
    got = _exchange(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n", limits, timeout=5)
    assert got.startswith(b"HTTP/1.1 413"), got
    # a client that declares a body and sends nothing: answered at once, closed when it stays idle
    started = time.monotonic()
    got = _exchange(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n", limits, timeout=10)
    assert got.startswith(b"HTTP/1.1 413") and time.monotonic() - started < 5, got


def _holding_handler():
    """(release, entered, handler): /hold waits (its body held) until `release` is set; each answer says the
    body's length."""
    release = threading.Event()
    entered = threading.Event()

    async def handler(req):
        if req.path == "/hold":
            entered.set()
            while not release.is_set():
                await asyncio.sleep(0.01)
        return Response(200, b'{"n":%d}' % len(req.body))

    return release, entered, handler


def test_bodies_past_the_in_flight_byte_budget_get_503_with_retry_after_before_they_are_read():
    release, entered, handler = _holding_handler()

    limits = ServerLimits(max_body_bytes=4 * 1024 * 1024, max_inflight_bytes=1024 * 1024)
    with serving(limits, handler) as (port, server):
        held: dict = {}
        t = threading.Thread(target=lambda: held.update(r=_post(port, "/hold", b"a" * 800_000)))
        t.start()
        try:
            assert entered.wait(20)
            # a second large body does not fit beside the first: 503 + Retry-After, and the client reads it
            status, headers, body = _post(port, "/x", b"b" * 800_000)
            assert status == 503 and headers.get("Retry-After") == "1", (status, headers)
            assert b"maxInflightBytes" in body
            # small requests and probes still fit
            assert _post(port, "/small", b"c" * 1000)[0] == 200
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/live")
            assert conn.getresponse().status == 200
            conn.close()
        finally:
            release.set()
            t.join(20)
        assert held["r"][0] == 200
        # the budget came back: the same large body now fits
        assert _post(port, "/x", b"b" * 800_000)[:1] == (200,)
        assert server.inflight_bytes == 0


# --- serving a request in the parser's callback (eager), and handing it to a task where it waits

_seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="")


async def _mixed(req):
    """/wait waits (a task takes it over), anything else answers at once; each says what the context held."""
    before = _seen.get()
    _seen.set(req.path)  # must not leak into the next request's context
    if req.path == "/wait":
        await asyncio.sleep(0.2)
    return Response(200, b'{"path":"%s","before":"%s"}' % (req.path.encode(), before.encode()))


def _requests(paths: list[bytes], close: bool = True) -> bytes:
    last = len(paths) - 1
    close_last = b"Connection: close\r\n" if close else b""
    return b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (p, close_last if i == last else b"")
                    for i, p in enumerate(paths))


def _answers(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(path, what the context held before) of each answer in `raw`."""
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in raw.split(b"HTTP/1.1 200 OK")[1:]]
    return [(b.split(b'"')[3], b.split(b'"')[7]) for b in bodies]


def test_pipelined_answers_keep_their_order_whether_a_handler_waits_or_answers_at_once():
    async def run():
        server = HTTPServer(_mixed, ServerLimits())
        port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(_requests([b"/a", b"/wait", b"/b", b"/c", b"/burst-end"], close=False))
            burst = b""
            while b"/burst-end" not in burst:
                burst += await asyncio.wait_for(reader.read(65536), 5)
            writer.write(_requests([b"/later"]))  # the same connection, once the burst is answered
            later = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
            await server.stop(1)
        return burst, later

    burst, later = asyncio.run(run())
    assert [path for path, _ in _answers(burst)] == [b"/a", b"/wait", b"/b", b"/c", b"/burst-end"], burst
    # what a handler set in its context is not there for the next request the connection reads later
    assert _answers(later) == [(b"/later", b"")], later


def test_a_client_that_goes_away_cancels_a_handler_that_waits(eager):
    cancelled = threading.Event()

    async def handler(req):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200, b"{}")

    async def run():
        server = HTTPServer(handler, ServerLimits(), cancel_on_disconnect=True)
        port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        for _ in range(100):
            if cancelled.is_set():
                break
            await asyncio.sleep(0.02)
        assert server.in_flight == 0
        await server.stop(1)

    asyncio.run(run())
    assert cancelled.is_set()


def test_a_connection_lost_before_the_handler_first_waits_cancels_it_at_once():
    """The connection is lost while the handler is still in its first step (here it aborts the socket itself,
    as a reset read in the same turn of the loop would): the handler must see the cancellation at its first
    wait and the server count it done, not when the garbage collector finds the coroutine."""
    cancelled = threading.Event()
    box: dict = {}

    async def handler(req):
        for conn in list(box["server"].connections):
            conn.transport.abort()  # connection_lost runs at the loop's next turn, before any later step
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200, b"{}")

    async def run():
        server = box["server"] = HTTPServer(handler, ServerLimits(), cancel_on_disconnect=True)
        port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not (cancelled.is_set() and server.in_flight == 0) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        writer.close()
        await server.stop(1)
        return server.in_flight

    assert asyncio.run(run()) == 0
    assert cancelled.is_set()


# --- a request whose head the connection saw before skips the parser (_Connection._learn)

async def _recorder(req):
    """Answers with what the server made of the request, then adds a header to it (as the access log adds a
    request id): the next request of the same head must not see it."""
    seen = {"m": req.method, "p": req.path, "q": req.query, "h": req.headers, "b": bytes(req.body).decode()}
    import json

    body = json.dumps(seen, sort_keys=True).encode()
    req.headers["x-added"] = "by the handler"
    return Response(200, body)


def _one_by_one(raws: list[bytes | list[bytes]]) -> list[dict]:
    """Send each request on one keep-alive connection after the answer to the one before (a list: its parts in
    separate writes), and return what the server made of each."""
    import json

    async def run():
        server = HTTPServer(_recorder, ServerLimits())
        port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        got = []
        try:
            for raw in raws:
                for part in raw if isinstance(raw, list) else [raw]:
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.05)
                answers: list[dict] = []
                while len(answers) < (raw.count(b"HTTP/1.1\r\n") if isinstance(raw, bytes) else 1):
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    assert head.startswith(b"HTTP/1.1 200"), head
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    answers.append(json.loads(await asyncio.wait_for(reader.readexactly(length), 5)))
                got.extend(answers)
        finally:
            writer.close()
            await server.stop(1)
        return got

    return asyncio.run(run())


def _post_raw(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nX-Model: a%s\r\nContent-Length: %d\r\n\r\n%s" % (
        path, extra, len(body), body)


def test_a_request_whose_head_was_seen_before_means_what_the_parser_would_make_of_it():
    first = _post_raw(b"/v2/models/a/infer?x=1", b"abc")
    expected_headers = {"host": "x", "x-model": "a", "content-length": "3"}
    got = _one_by_one([
        first,
        _post_raw(b"/v2/models/a/infer?x=1", b"xyz"),  # the same head: the parser is skipped
        _post_raw(b"/v2/models/a/infer?x=1", b"abcd"),  # another length
        _post_raw(b"/v2/models/a/infer?x=1", b"xyz", b"\r\nX-Other: 1"),  # another head
        [first[:20], first[20:]],  # the same bytes in two packets
        first + first.replace(b"abc", b"def"),  # two requests in one packet
        _post_raw(b"/v2/models/a/infer?x=1", b"qrs"),
        _post_raw(b"/v2/models/a/infer?x=1", b"tuv"),  # seen: what the handler added to the one before is not here
        _post_raw(b"/v2/models/a/infer?x=1", b"wxy"),
    ])
    want = [("abc", expected_headers), ("xyz", expected_headers),
            ("abcd", {**expected_headers, "content-length": "4"}),
            ("xyz", {**expected_headers, "x-other": "1"}),
            ("abc", expected_headers), ("abc", expected_headers), ("def", expected_headers),
            ("qrs", expected_headers), ("tuv", expected_headers), ("wxy", expected_headers)]
    assert [(g["b"], g["h"]) for g in got] == want, got
    assert {(g["m"], g["p"], g["q"]) for g in got} == {("POST", "/v2/models/a/infer", "x=1")}


def test_a_seen_head_with_its_own_request_id_means_what_the_parser_would_make_of_it():
    """A gateway sends a new X-Request-Id with each request: the rest of the head may still be the one seen.
    Ids that are not plain (blanks around or inside, other bytes) and a second X-Request-Id are the parser's."""
    def with_id(value: bytes, body: bytes = b"abc", more: bytes = b"") -> bytes:
        return _post_raw(b"/v2/models/a/infer", body, b"\r\nx-request-id: " + value + more)

    raws = [with_id(b"first"), with_id(b"2"), with_id(b"0123456789abcdef-3"), with_id(b"a b"), with_id(b"x" * 200),
            with_id(b"spaced  "), with_id(b"after-spaced"), with_id(b"twice", more=b"\r\nX-Request-Id: again"),
            with_id(b"caf\xe9"), with_id(b"last", b"abcd"), with_id(b"next", b"wxyz")]
    got = _one_by_one(raws)
    assert got == [_one_by_one([raw])[0] for raw in raws]  # each on a connection of its own: the parser's
    assert [g["h"]["x-request-id"] for g in got][:3] == ["first", "2", "0123456789abcdef-3"]
    assert [g["b"] for g in got] == ["abc"] * 9 + ["abcd", "wxyz"]


def test_a_seen_head_still_counts_its_body_against_the_in_flight_budget():
    release, entered, handler = _holding_handler()

    with serving(ServerLimits(max_inflight_bytes=1000), handler) as (port, server):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/x", b"a" * 500)  # its head is kept
        assert conn.getresponse().read() == b'{"n":500}'
        held: dict = {}
        t = threading.Thread(target=lambda: held.update(r=_post(port, "/hold", b"h" * 900)))
        t.start()
        try:
            assert entered.wait(20)
            conn.request("POST", "/x", b"b" * 500)  # the same head, but 900 + 500 bytes do not fit
            resp = conn.getresponse()
            assert resp.status == 503 and b"maxInflightBytes" in resp.read()
        finally:
            release.set()
            t.join(20)
            conn.close()
        assert held["r"][0] == 200
        assert server.inflight_bytes == 0

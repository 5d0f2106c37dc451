"""The access log, read as an operator reads it: one line per request on the server and the gateway,
every 4xx/5xx with its message, `--log-format json` for collectors, `--no-access-log` to quiet it."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest

from caffe_testing.gateway import GatewayProcess, digits_config, infer_payload, static
from caffe_testing.servers import ServerProcess, http

CFG = digits_config(limits={"maxRequestBytes": 64 * 1024})


def infer(url: str, payload=None, headers: dict | None = None):
    data = json.dumps(infer_payload(0) if payload is None else payload).encode()
    return http("POST", url + "/v2/models/digits/infer", data, {"Content-Type": "application/json", **(headers or {})})


def lines_with(proc, needle: str, timeout: float = 5.0) -> list[str]:
    """The output lines containing `needle`, waiting for the log thread to write them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in proc.output().splitlines() if needle in line]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(CFG, tmp_path_factory.mktemp("access")) as s:
        yield s


@pytest.fixture(scope="module")
def json_server(tmp_path_factory):
    with ServerProcess(CFG, tmp_path_factory.mktemp("access-json"), args=["--log-format", "json"]) as s:
        yield s


def test_one_line_per_request_with_who_what_and_how_long(server):
    status, headers, _ = infer(server.url, headers={"X-Request-Id": "req-ok-1"})
    assert status == 200 and headers["X-Request-Id"] == "req-ok-1"
    [line] = lines_with(server, "request_id=req-ok-1")
    m = re.search(r'INFO caffeserve\.access: 127\.0\.0\.1:\d+ "POST /v2/models/digits/infer" 200 (\d+)B '
                  r'([\d.]+)ms model=digits request_id=req-ok-1$', line)
    assert m, line
    assert int(m.group(1)) > 0 and float(m.group(2)) > 0


def test_every_error_is_logged_with_its_message(server):
    bad = {"inputs": [{"name": "data", "shape": [1, 1, 7, 7], "datatype": "FP32", "data": [0.0] * 49}]}
    status, _, answer = infer(server.url, bad, {"X-Request-Id": "req-bad-shape"})
    assert status == 400
    [line] = lines_with(server, "request_id=req-bad-shape")
    assert "WARNING caffeserve.access" in line and '"POST /v2/models/digits/infer" 400' in line
    assert json.dumps(json.loads(answer)["error"]) in line  # the client's own message, quoted
    # an unknown model (404), and a request id the server made up (answered in X-Request-Id)
    status, headers, _ = http("GET", server.url + "/v2/models/nope")
    [line] = lines_with(server, f"request_id={headers['X-Request-Id']}")
    assert status == 404 and '"GET /v2/models/nope" 404' in line and "model=nope" in line and "not served here" in line
    assert re.fullmatch(r"[0-9a-f]{16}", headers["X-Request-Id"])


def test_a_body_the_transport_refuses_is_logged_too(server):
    """413 by Content-Length is answered before any handler runs; it is still in the log."""
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
        assert b" 413 " in s.recv(4096)
    [line] = lines_with(server, '"POST /v2/models/digits/infer" 413')
    assert "exceeds the limit" in line


def test_json_log_format(json_server):
    infer(json_server.url, headers={"X-Request-Id": "req-json-1"})
    [line] = lines_with(json_server, '"req-json-1"')
    record = json.loads(line)
    assert record["logger"] == "caffeserve.access" and record["level"] == "INFO"
    assert {k: record[k] for k in ("method", "path", "model", "status", "request_id", "server")} == {
        "method": "POST", "path": "/v2/models/digits/infer", "model": "digits", "status": 200,
        "request_id": "req-json-1", "server": "server"}
    assert record["bytes"] > 0 and record["duration_ms"] > 0 and record["client"].startswith("127.0.0.1:")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    # every other line is JSON too (startup, model loading)
    for other in json_server.output().splitlines():
        assert json.loads(other)["message"] is not None, other


def test_no_access_log_keeps_only_the_errors(tmp_path):
    with ServerProcess(CFG, tmp_path, args=["--no-access-log"]) as s:
        infer(s.url, headers={"X-Request-Id": "quiet-ok"})
        http("GET", s.url + "/v2/models/digits/versions/9", headers={"X-Request-Id": "quiet-404"})
        assert lines_with(s, "request_id=quiet-404")
        assert not lines_with(s, "request_id=quiet-ok", timeout=0.5)


def test_gateway_and_server_lines_share_the_request_id(server):
    with GatewayProcess("--static", static("digits", server), "--log-format", "json") as g:
        status, headers, _ = infer(g.url)
        assert status == 200
        rid = headers["X-Request-Id"]  # made by the gateway, forwarded to the server, answered back
        [gw_line] = lines_with(g, rid)
        record = json.loads(gw_line)
        assert (record["server"], record["model"], record["status"]) == ("gateway", "digits", 200)
        [srv_line] = lines_with(server, f"request_id={rid}")
        assert '"POST /v2/models/digits/infer" 200' in srv_line
        # the gateway's own errors carry their message
        status, _, _ = http("POST", g.url + "/v2/models/unknown/infer", b"{}", {"X-Request-Id": "gw-404"})
        [line] = lines_with(g, '"gw-404"')
        record = json.loads(line)
        assert status == 404 and record["level"] == "WARNING" and "not known to the gateway" in record["error"]


def test_lines_are_the_same_whether_batched_or_records_of_their_own():
    """With logging as `configure_logging` sets it up the held lines go to the writer thread already formatted;
    with another handler on the access logger (an embedding program's) each line is a record with its fields.
    Both write the same text."""
    import io
    import logging

    from caffe_http.access_log import ACCESS_LOGGER, AccessLog, configure_logging

    root = logging.getLogger()
    saved = list(root.handlers), root.level
    out = io.StringIO()
    configure_logging("INFO", "text", out)
    access = AccessLog("server")
    records: list[logging.LogRecord] = []
    capture = logging.Handler()
    capture.emit = records.append  # type: ignore[method-assign]
    try:
        access.write("POST", "/v2/models/digits/infer", 200, 120, 0.0004, "batched-1", "127.0.0.1:1")
        logging.getLogger(ACCESS_LOGGER).addHandler(capture)
        access.write("POST", "/v2/models/digits/infer", 200, 120, 0.0004, "record-1", "127.0.0.1:1")
    finally:
        logging.getLogger(ACCESS_LOGGER).removeHandler(capture)
        for h in list(root.handlers):  # ours: closing it writes what is held and stops its thread
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    [record] = records
    assert record.access["request_id"] == "record-1" and record.access["model"] == "digits"  # type: ignore[attr-defined]
    lines = out.getvalue().splitlines()
    tails = [line.split(" INFO caffeserve.access: ", 1)[1] for line in lines if "caffeserve.access" in line]
    assert tails == [f'127.0.0.1:1 "POST /v2/models/digits/infer" 200 120B 0.400ms model=digits request_id={rid}'
                     for rid in ("batched-1", "record-1")]


def test_held_lines_read_exactly_as_the_record_formatter_writes_them():
    """The server formats held lines itself (AccessLog.flush), from text heads it remembers per client, request
    line and code: each must read as the record it replaces, the first time and from the remembered head."""
    from caffe_http.access_log import ACCESS_LOGGER, TextFormatter, access_record

    fmt = TextFormatter()
    now = time.time()
    lines = [
        (now, 20, "POST", "/v2/models/digits/infer", 200, 362, 0.000314, "00000000000000ab", "127.0.0.1:5555", ""),
        (now + 0.0012, 20, "POST", "/v2/models/digits/infer", 200, 361, 0.0021, "00000000000000ac", "127.0.0.1:5555",
         ""),
        (now + 1.5, 30, "POST", "/v2/models/nope/infer", 404, 60, 0.0001, "", "127.0.0.1:6", 'model "nope" is not'),
        (now + 2.0, 10, "GET", "/metrics", 200, 9000, 0.001, "r1", "10.0.0.2:1", ""),
    ]
    for line in lines + lines:  # the second time from the heads remembered
        assert fmt.access_lines("server", [line]) == [fmt.format(access_record(ACCESS_LOGGER, "server", line))]

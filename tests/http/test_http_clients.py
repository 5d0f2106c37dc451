"""The HTTP server under clients that misbehave or are unusual: no reading, pipelining, HEAD."""

from __future__ import annotations

import socket
import time

import psutil

from caffe_testing.digits import DIGITS_DIR
from caffe_testing.servers import ServerProcess, http


def test_pipelining_without_reading_keeps_memory_bounded_and_others_are_served():
    with ServerProcess(DIGITS_DIR / "server.yaml", env={"CAFFESERVE__BACKEND": "pycaffe"}) as server:
        proc = psutil.Process(server.proc.pid)
        before = proc.memory_info().rss
        greedy = socket.create_connection(("127.0.0.1", server.port))
        greedy.setblocking(False)
        burst = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 100  # each answer is several kB
        sent, end = 0, time.monotonic() + 3
        while time.monotonic() < end:
            try:
                sent += greedy.send(burst)
            except BlockingIOError:
                time.sleep(0.01)
        time.sleep(0.3)
        growth_mb = (proc.memory_info().rss - before) / 1e6
        # measured here: ~6 MB with flow control, ~190 MB without (every answer buffered for a client
        # that never reads); the server stops reading once its answers back up
        assert growth_mb < 50, f"server grew {growth_mb:.0f} MB for a client that never reads ({sent} bytes sent)"
        assert http("GET", server.url + "/v2/health/ready")[0] == 200
        greedy.close()


def test_head_gets_headers_without_a_body_and_the_connection_stays_in_step():
    import http.client

    with ServerProcess(DIGITS_DIR / "server.yaml", env={"CAFFESERVE__BACKEND": "pycaffe"}) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("HEAD", "/v2/models/digits/infer")
        head = conn.getresponse()
        assert head.status == 405 and head.read() == b""  # infer takes POST only; framing must still hold
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/digits/ready", "/v2"):
            conn.request("HEAD", path)  # probes and `curl -I` ask with HEAD: GET's answer, no body
            head = conn.getresponse()
            assert head.status == 200 and head.read() == b"", path
            assert int(head.getheader("Content-Length")) > 0, path
        conn.request("GET", "/v2/health/live")  # same keep-alive connection
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b'{"live":true}'
        conn.close()

"""Request and response compression, as Triton users send it: `tritonclient`'s
`request_compression_algorithm` / `response_compression_algorithm`, and curl-style requests with
`Content-Encoding` / `Accept-Encoding`; against the server and through the gateway. The size limit
applies to the decompressed body: a 1 GB gzip bomb is a 413 and never a memory spike."""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib

import numpy as np
import psutil
import pytest
import tritonclient.http as httpclient

from caffe_testing.compression import gzip_bomb
from caffe_testing.digits import digits_data
from caffe_testing.gateway import IMAGES, LABELS, GatewayProcess, digits_config, infer_payload, predicted, static
from caffe_testing.servers import ServerProcess, http

LIMIT = 4 * 1024 * 1024  # the server's maxRequestBytes here: a 1 GB bomb passes it 250 times over


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = digits_config(limits={"maxRequestBytes": LIMIT})
    with ServerProcess(cfg, tmp_path_factory.mktemp("compression")) as s:
        yield s


@pytest.fixture(scope="module")
def gateway(server):
    with GatewayProcess("--static", static("digits", server)) as g:
        yield g


def body(i: int = 0) -> bytes:
    return json.dumps(infer_payload(i)).encode()


@pytest.mark.parametrize("request_coding", ["gzip", "deflate"])
@pytest.mark.parametrize("response_coding", [None, "gzip", "deflate"])
@pytest.mark.parametrize("where", ["server", "gateway"])
def test_tritonclient_compressed_requests_and_answers(server, gateway, where, request_coding, response_coding):
    url = (server if where == "server" else gateway).url
    client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
    n = 4
    x = httpclient.InferInput("data", [n, 1, 8, 8], "FP32")
    x.set_data_from_numpy(digits_data.to_blob(IMAGES[:n]).astype(np.float32))
    for binary in (False, True):
        x.set_data_from_numpy(digits_data.to_blob(IMAGES[:n]).astype(np.float32), binary_data=binary)
        result = client.infer("digits", [x], outputs=[httpclient.InferRequestedOutput("prob", binary_data=binary)],
                               request_compression_algorithm=request_coding,
                               response_compression_algorithm=response_coding)
        assert list(result.as_numpy("prob").argmax(axis=1)) == list(LABELS[:n])


@pytest.mark.parametrize("where", ["server", "gateway"])
@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_a_gzip_request_with_curl_headers(server, gateway, where, coding):
    url = (server if where == "server" else gateway).url
    data = gzip.compress(body(3)) if coding == "gzip" else zlib.compress(body(3))
    status, headers, answer = http("POST", url + "/v2/models/digits/infer", data, {
        "Content-Type": "application/json", "Content-Encoding": coding, "Accept-Encoding": f"{coding}, identity;q=0.5"})
    assert status == 200, answer
    assert headers["Content-Encoding"] == coding and "Accept-Encoding" in headers.get("Vary", "")
    plain = gzip.decompress(answer) if coding == "gzip" else zlib.decompress(answer)
    assert predicted(json.loads(plain)) == LABELS[3]
    # no Accept-Encoding: a plain answer
    status, headers, answer = http("POST", url + "/v2/models/digits/infer", data,
                                   {"Content-Type": "application/json", "Content-Encoding": coding})
    assert status == 200 and "Content-Encoding" not in headers and predicted(json.loads(answer)) == LABELS[3]


@pytest.mark.parametrize("where", ["server", "gateway"])
def test_unknown_coding_is_415_and_corrupt_data_is_400(server, gateway, where):
    url = (server if where == "server" else gateway).url
    status, headers, answer = http("POST", url + "/v2/models/digits/infer", b"(brotli bytes)",
                                   {"Content-Type": "application/json", "Content-Encoding": "br"})
    assert status == 415, answer
    assert "unsupported Content-Encoding 'br'" in json.loads(answer)["error"]
    assert headers["Accept-Encoding"] == "gzip, deflate"
    status, _, answer = http("POST", url + "/v2/models/digits/infer", b"\x1f\x8b\x08 not gzip",
                             {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert status == 400 and "not valid gzip data" in json.loads(answer)["error"]


def test_the_gateway_compresses_its_own_answers(gateway):
    status, headers, answer = http("GET", gateway.url + "/v2/models", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(answer)) == {"models": ["digits"]}


class PeakRSS:
    """The largest resident size a process reaches while the block runs (sampled every 5 ms)."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = self.before = self.proc.memory_info().rss
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        time.sleep(0.05)
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.before) / 2**20


@pytest.mark.parametrize("where", ["server", "gateway"])
def test_a_gzip_bomb_is_413_without_a_memory_spike(server, gateway, where):
    bomb = gzip_bomb()  # 1 GiB of zeros in about 1 MB
    assert len(bomb) < LIMIT
    url = (server if where == "server" else gateway).url
    with PeakRSS(server.proc.pid) as srv, PeakRSS(gateway.proc.pid) as gw:
        status, _, answer = http("POST", url + "/v2/models/digits/infer", bomb,
                                 {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert status == 413, answer
    assert f"exceeds the limit of {LIMIT} bytes once decompressed" in json.loads(answer)["error"]
    # at most the limit (4 MiB) and a chunk held, never the gigabyte; the gateway never inflates it
    assert srv.growth_mb < 48, srv.growth_mb
    assert gw.growth_mb < 32, gw.growth_mb
    # and the server goes on serving
    status, _, answer = http("POST", url + "/v2/models/digits/infer", body(7), {"Content-Type": "application/json"})
    assert status == 200 and predicted(json.loads(answer)) == LABELS[7]

"""`caffeserve gateway` as a process for tests and benchmarks, and what is asked of it: metrics,
the digits payloads and server configs (a "slow" server is the real digits server with batching
that waits for a batch to fill), many requests at once.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from caffe_testing import REPO
from caffe_testing.digits import DIGITS_DIR, digits_data
from caffe_testing.servers import CAFFESERVE, ServerProcess, free_port, http

IMAGES, LABELS = digits_data.held_out()


class GatewayProcess:
    """`caffeserve gateway ARGS...` on free loopback ports (REST `url`, gRPC `grpc_port`) once ready.
    `tls_ca`: the CA file that signed the certificate of its `--tls-dir` (`url` is then https)."""

    def __init__(self, *args: str, env: dict | None = None, tls_ca: Path | None = None):
        self.port = free_port()
        self.context = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else None
        self.url = f"{'https' if tls_ca else 'http'}://127.0.0.1:{self.port}"
        self.args = list(args)
        self.grpc_port = None
        if "--no-grpc" not in self.args and "--grpc-port" not in self.args:
            self.grpc_port = free_port()
            self.args += ["--grpc-port", str(self.grpc_port)]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log = b""
        self.log_path: Path | None = None

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        # to a file, not a pipe that nobody reads (it would fill up with access-log lines and block)
        fd, log_path = tempfile.mkstemp(prefix="caffeserve-gateway-", suffix=".log")
        self.log_path = Path(log_path)
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                CAFFESERVE + ["gateway", "--host", "127.0.0.1", "--port", str(self.port), *self.args],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if http("GET", self.url + "/v2/health/ready", timeout=2, context=self.context)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError("gateway not ready")

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log = self.output().encode()
        return self.proc.returncode if self.proc else None

    def output(self) -> str:
        """Everything the gateway has written so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes().decode(errors="replace")

    def rss(self) -> int:
        assert self.proc is not None, "the gateway was not started"
        return psutil.Process(self.proc.pid).memory_info().rss

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` (exact sample name) whose labels include `labels`."""
    text = http("GET", url + "/metrics")[2].decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def served(server: ServerProcess) -> float:
    """Inference requests a server has answered (any code)."""
    return metric(server.url, "caffeserve_inference_requests_total")


def infer_payload(i: int) -> dict:
    blob = digits_data.to_blob(IMAGES[i:i + 1])
    return {"inputs": [{"name": "data", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": blob.ravel().tolist()}]}


def predicted(body: dict) -> int:
    return int(np.argmax(body["outputs"][0]["data"]))


def digits_config(**overrides) -> dict:
    """The digits server config with absolute model paths (so it can be written anywhere)."""
    cfg = yaml.safe_load((DIGITS_DIR / "server.yaml").read_text())
    for key in ("prototxt", "weights", "labels"):
        cfg["model"][key] = str(DIGITS_DIR / cfg["model"][key])
    cfg.update(overrides)
    return cfg


def slow_config(delay_ms: float) -> dict:
    """Each lone request waits `delay_ms` for a batch to fill: a server that stays busy."""
    return digits_config(batching={"enabled": True, "maxBatchSize": 8, "maxQueueDelayMs": delay_ms})


def static(model: str, *servers: ServerProcess) -> str:
    """A --static argument; a server started with a gRPC port (`grpc_port`) is given with it."""
    urls = []
    for s in servers:
        port = getattr(s, "grpc_port", None)
        urls.append(s.url + (f"?grpc={port}" if port else ""))
    return f"{model}=" + ",".join(urls)


async def _one_request(port: int, body: bytes, path: str = "/v2/models/digits/infer"):
    """One POST on its own connection: (status, headers, body, seconds)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body
    )
    data = await reader.read()
    writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, payload, time.monotonic() - t0


def burst(port: int, n: int, body: bytes) -> list[tuple[int, dict, bytes, float]]:
    """`n` requests at once, each on its own connection."""

    async def run():
        return await asyncio.gather(*(_one_request(port, body) for _ in range(n)))

    return asyncio.run(run())

"""Start real `caffeserve serve` processes on loopback for tests (and benchmarks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from caffe_testing import REPO

CAFFESERVE = [sys.executable, "-m", "caffeserve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, grace_s: float, sig=signal.SIGTERM) -> int | None:
    """`sig` (SIGTERM), then SIGKILL once `grace_s` has passed, as the kubelet stops a container."""
    if proc and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode if proc else None


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30,
         context=None):
    """(status, headers, body bytes) of one request (`context`: an ssl.SSLContext for https); never
    raises for an HTTP error code."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def http_json(method: str, url: str, payload=None, **kw):
    body = None if payload is None else json.dumps(payload).encode()
    status, headers, data = http(method, url, body, {"Content-Type": "application/json"}, **kw)
    return status, (json.loads(data) if data else None)


class ServerProcess:
    """A `caffeserve serve` subprocess; `url` once started. Use as a context manager. `config` None and
    `repository` a folder: `serve --model-repository FOLDER`. `tls_ca` and `tls_name`: the server runs with
    `--tls-dir` (in `args`), its certificate signed by that CA for that name; `url` is then https and
    `context` checks it (the name instead of 127.0.0.1, as a client of a pod by its address does)."""

    def __init__(self, config: dict | str | Path | None, tmp_dir: Path | None = None, env: dict | None = None,
                 wait_ready: bool = True, args: list[str] | None = None, root: Path = REPO,
                 repository: Path | None = None, tls_ca: Path | None = None, tls_name: str = "127.0.0.1"):
        config_dict = config
        if isinstance(config, dict):
            tmp_dir = Path(tmp_dir or ".")
            path = tmp_dir / f"server-{os.getpid()}-{id(self)}.yaml"
            path.write_text(yaml.safe_dump(config))
            config = path
        self.config_path = None if config is None else Path(config)
        self.source = ["--model-repository", str(repository)] if config is None else ["--config", str(config)]
        self.port = free_port()
        self.url = f"{'https' if tls_ca else 'http'}://127.0.0.1:{self.port}"
        self.context = None
        if tls_ca:
            self.context = ssl.create_default_context(cafile=str(tls_ca))
            if tls_name != "127.0.0.1":
                self.context.check_hostname = False  # urllib cannot name another host: the chain is still checked
        self.env = {**os.environ, **(env or {})}
        self.wait_ready = wait_ready
        self.args = list(args or [])
        if "--grpc-port" not in self.args and not (isinstance(config_dict, dict) and "grpc" in config_dict):
            # gRPC is on by default (port 8081): several servers on one host need a port each
            self.args += ["--grpc-port", "0"]
        self.proc: subprocess.Popen | None = None
        self.grpc_port: int | None = None  # set by caffe_testing.grpc.grpc_server for a server that serves gRPC
        self.log_path: Path | None = None
        self.root = root  # the checkout whose code runs (a benchmark's baseline may be another)

    def start(self, timeout: float = 60.0) -> ServerProcess:
        """Start and wait until ready (or live). The port free_port() chose can be taken before the server binds
        it (by its own gRPC listener on port 0, say): then once more on another port."""
        for attempt in range(3):
            try:
                return self._start(timeout)
            except RuntimeError as e:
                if "address already in use" not in str(e) or attempt == 2:
                    raise
                self.port = free_port()
                self.url = f"{self.url.rsplit(':', 1)[0]}:{self.port}"
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> ServerProcess:
        # Output goes to a file, not a pipe: a pipe nobody reads fills up (64 KiB of access-log lines)
        # and blocks the server's logging.
        fd, log_path = tempfile.mkstemp(prefix="caffeserve-server-", suffix=".log")
        self.log_path = Path(log_path)
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                CAFFESERVE + ["serve", *self.source, "--port", str(self.port), *self.args],
                cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        path = "/v2/health/ready" if self.wait_ready else "/v2/health/live"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if http("GET", self.url + path, timeout=2, context=self.context)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"server not {'ready' if self.wait_ready else 'live'} in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        """Everything the server has written so far (stdout and stderr)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes().decode(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int | None:
        return stop_process(self.proc, timeout, sig)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def settled_backend(url: str, model: str, timeout: float = 240.0) -> dict:
    """The model metadata's parameters once `backend: auto`'s onnxruntime check beside serving has ended
    (serving/switch.py): until then it serves with pycaffe and `backend_check` says "running"."""
    deadline = time.monotonic() + timeout
    while True:
        params = http_json("GET", f"{url}/v2/models/{model}")[1]["parameters"]
        if params.get("backend_check") != "running" or time.monotonic() > deadline:
            return params
        time.sleep(0.1)

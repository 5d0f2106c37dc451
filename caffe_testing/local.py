"""`caffeserve up` as a process for tests, with its output collected."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import psutil

from caffe_testing import REPO
from caffe_testing.servers import CAFFESERVE, free_port


class UpProcess:
    """`caffeserve up ...` with its output collected; `url` is the gateway, `grpc_port` its gRPC port."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"{'https' if '--tls-dir' in args else 'http'}://127.0.0.1:{self.port}"
        self.grpc_port = None if "--no-grpc" in args else free_port()
        grpc = [] if self.grpc_port is None else ["--grpc-port", str(self.grpc_port)]
        self.proc = subprocess.Popen(CAFFESERVE + ["up", *args, "--port", str(self.port), *grpc], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        assert self.proc.stdout is not None  # Popen(stdout=PIPE)
        for line in self.proc.stdout:
            self.lines.append(line.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 60) -> UpProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"caffeserve up exited with {self.proc.returncode}:\n{self.output}")
            if "gateway: http://" in self.output or "gateway: https://" in self.output:
                return self
            time.sleep(0.05)
        raise AssertionError(f"caffeserve up not ready:\n{self.output}")

    def servers(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def kill(self):
        if self.proc.poll() is None:
            for child in self.servers():
                child.kill()
            self.proc.kill()
            self.proc.wait()

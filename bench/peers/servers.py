"""Start one server under test (ours, KServe's ModelServer, or MLServer) as a process on loopback.

Each runs in its own process and venv so their dependencies never mix: ours from the project venv,
the peers from the venvs bench/setup_peers.sh makes, with the cached pycaffe build on PYTHONPATH.
All three get the same environment for Caffe (OpenBLAS threads, glog level) and serve one Net each,
in one process; every server's output goes to a log file (a pipe nobody reads would block it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from caffe_testing.servers import free_port, http

REPO = Path(__file__).resolve().parents[2]
PEERS_DIR = Path(__file__).resolve().parent

CACHE = Path(os.environ.get("CAFFE_SERVING_CACHE", Path.home() / ".cache/caffe-serving"))
BENCH_VENVS = Path(os.environ.get("BENCH_VENVS", CACHE / "bench-venvs"))


@dataclass(frozen=True)
class ServedModel:
    """A Caffe model as every server gets it: name, deploy prototxt, weights, and our server's config."""

    name: str
    prototxt: Path
    weights: Path
    config: Path  # caffeserve's server YAML for the same files


def pycaffe_dir() -> Path:
    """The folder holding the cached pycaffe build's `caffe` package (the newest, if several)."""
    builds = [p for p in CACHE.glob("pycaffe-brocolli-*py3.*") if (p / "caffe" / "_caffe.so").is_file()]
    if not builds:
        raise SystemExit(f"no pycaffe build under {CACHE}: run `make setup` (scripts/caffe/install_pycaffe.sh) first")
    return max(builds, key=lambda p: p.stat().st_mtime)


def peer_python(venv: str, exe: str = "python") -> Path:
    path = BENCH_VENVS / venv / "bin" / exe
    if not path.exists():
        raise SystemExit(f"{path} is missing: run bench/setup_peers.sh first")
    return path


class ServerUnderTest:
    """A server process; a context manager that starts it, waits until the model is ready, and stops it."""

    label = "server"

    def __init__(self, model: ServedModel, env: dict[str, str]):
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.infer_url = f"{self.url}/v2/models/{model.name}/infer"
        self.env = {**os.environ, **env}
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-{self.label}-"))
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 120.0) -> ServerUnderTest:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ready = f"{self.url}/v2/models/{self.model.name}/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}:\n{tail}")
            try:
                if http("GET", ready, timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        tail = self.log_tail()
        self.stop()
        raise TimeoutError(f"{self.label} not ready in {timeout:.0f}s:\n{tail}")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (and its child processes) and remove its work folder."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: MLServer's worker processes go too
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def backend(self) -> str:
        """What runs the Net, as the server's model metadata says (the peers always run pycaffe)."""
        return "pycaffe"

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far, its child processes included."""
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Ours(ServerUnderTest):
    """`caffeserve serve` with the model's server YAML; `backend` (when given) overrides the file's."""

    label = "caffe-serving"

    def __init__(self, model: ServedModel, env: dict[str, str], backend: str | None = None):
        super().__init__(model, env)
        if backend is not None:
            self.env["CAFFESERVE__BACKEND"] = backend

    def backend(self) -> str:
        status, _, body = http("GET", f"{self.url}/v2/models/{self.model.name}")
        return json.loads(body).get("parameters", {}).get("backend", "unknown") if status == 200 else "unknown"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "caffeserve", "serve", "--config", str(self.model.config),
                "--port", str(self.port), "--grpc-port", "0", "--log-level", "WARNING"]

    def start(self, timeout: float = 120.0):
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        return super().start(timeout)


class KServe(ServerUnderTest):
    """KServe's `ModelServer` with bench/peers/kserve_model.py; gRPC and per-request log lines off."""

    label = "kserve"

    def command(self) -> list[str]:
        m = self.model
        return [str(peer_python("kserve")), str(PEERS_DIR / "kserve_model.py"),
                "--model_name", m.name, "--prototxt", str(m.prototxt), "--weights", str(m.weights),
                "--http_port", str(self.port), "--grpc_port", str(free_port()), "--enable_grpc", "false",
                "--workers", "1", "--enable_latency_logging", "false", "--configure_logging", "false"]

    def start(self, timeout: float = 120.0):
        self.env["PYTHONPATH"] = str(pycaffe_dir())
        return super().start(timeout)


class MLServer(ServerUnderTest):
    """`mlserver start` on a model repository written here: bench/peers/mlserver_runtime.py as the runtime.

    `parallel_workers` 0 runs inference in the server process, like the other two (MLServer's default,
    1, hands every request to a worker process); `debug` false turns off its per-request access log.
    """

    label = "mlserver"

    def __init__(self, model: ServedModel, env: dict[str, str], parallel_workers: int = 0):
        super().__init__(model, env)
        self.parallel_workers = parallel_workers

    def command(self) -> list[str]:
        return [str(peer_python("mlserver", "mlserver")), "start", str(self.workdir / "repo")]

    def write_settings(self) -> None:
        repo = self.workdir / "repo"
        (repo / self.model.name).mkdir(parents=True)
        settings = {"host": "127.0.0.1", "http_port": self.port, "grpc_port": free_port(),
                    "metrics_port": free_port(), "parallel_workers": self.parallel_workers, "debug": False,
                    "metrics_dir": str(self.workdir / "metrics")}
        model_settings = {"name": self.model.name, "implementation": "mlserver_runtime.CaffeRuntime",
                          "parameters": {"uri": str(self.model.weights),
                                         "extra": {"prototxt": str(self.model.prototxt)}}}
        (repo / "settings.json").write_text(json.dumps(settings, indent=2))
        (repo / self.model.name / "model-settings.json").write_text(json.dumps(model_settings, indent=2))

    def start(self, timeout: float = 120.0):
        self.write_settings()
        self.env["PYTHONPATH"] = os.pathsep.join([str(PEERS_DIR), str(pycaffe_dir())])
        return super().start(timeout)


SERVERS = {"caffe-serving": Ours, "kserve": KServe, "mlserver": MLServer}


def write_our_config(directory: Path, name: str, prototxt: Path, weights: Path) -> Path:
    """A minimal `caffeserve serve` config for a net: defaults everywhere (one Net, no batching)."""
    path = directory / f"{name}.server.yaml"
    path.write_text(yaml.safe_dump({"name": name, "model": {"prototxt": str(prototxt), "weights": str(weights)}}))
    return path

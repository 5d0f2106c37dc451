"""Local mode's processes: a `caffeserve serve` per replica, supervised, behind a gateway.

`LocalService` starts every replica of every model, waits until each is ready, starts the
gateway (caffe_gateway) with a static endpoint list it keeps equal to the ready replicas (what
EndpointSlices do in a cluster), restarts a replica that dies (with backoff, as the kubelet does),
and stops the gateway first, then the servers.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from caffe_gateway.app import GatewayApp
from caffe_gateway.discovery import StaticDiscovery
from caffe_gateway.settings import GatewaySettings
from caffe_http.upstream import EndpointPool, UpstreamError

from .models import LocalError, LocalModel

log = logging.getLogger("caffeserve.up")

PROBE_PERIOD_S = 0.25  # each replica's readiness probe (the kubelet's periodSeconds, scaled down)
PROBE_TIMEOUT_S = 2.0  # the pods' readiness probe timeoutSeconds
# Unanswered probes in a row before a replica is not ready (hung), as the kubelet's failureThreshold:
# one slow answer on a loaded machine must not take a healthy replica (or all of them) out.
# An answer (503: shutting down, loading) counts at once.
PROBE_FAILURES = 2
# A replica told to stop keeps its listener open this long after its readiness turns 503, so that
# the gateway (which sees that within PROBE_PERIOD_S) stops sending before it closes.
DRAIN_DELAY_S = 1.0


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """Linux: the server gets SIGTERM if `caffeserve up` itself dies without cleaning up."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Replica:
    model: str
    index: int
    config_path: Path
    host: str
    port: int
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    draining: bool = False  # answered its readiness probe with "shutting down"
    restarts: int = 0
    output: list[str] = field(default_factory=list)  # the last lines, for error messages

    @property
    def label(self) -> str:
        return f"{self.model}-{self.index}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self.ready = self.draining = False
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "inference_server", "serve", "--config", str(self.config_path),
            "--host", self.host, "--port", str(self.port), "--drain-delay", str(DRAIN_DELAY_S),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches `up` only; it stops the servers in order
            preexec_fn=_die_with_parent,
        )
        asyncio.create_task(self._relay(self.proc))

    async def _relay(self, proc) -> None:
        """Print the server's output prefixed with its replica name (as docker compose does)."""
        while line := await proc.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            self.output = (self.output + [text])[-20:]
            print(f"[{self.label}] {text}", flush=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def readiness(self, timeout_s: float = 2.0) -> tuple[bool, str, bool]:
        """(ready, why not, whether it answered at all) from the server's /v2/health/ready."""
        pool = EndpointPool(self.host, self.port, connect_timeout_s=min(1.0, timeout_s))
        try:
            loop = asyncio.get_running_loop()
            resp = await pool.request("GET", "/v2/health/ready", [], b"", loop.time() + timeout_s)
        except UpstreamError as e:
            return False, str(e), False
        finally:
            pool.close()
        if resp.status == 200:
            return True, "", True
        try:
            import orjson

            return False, orjson.loads(resp.body).get("error") or f"HTTP {resp.status}", True
        except Exception:
            return False, f"HTTP {resp.status}", True

    async def stop(self, grace_s: float) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), grace_s)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class LocalService:
    """The replicas of every model plus the gateway, started and stopped together."""

    def __init__(self, models: list[LocalModel], workdir: Path, gateway_settings: GatewaySettings, host: str = "127.0.0.1",
                 port: int = 8080, grace_s: float = 30.0):
        self.models = models
        self.host = host
        self.port = port
        self.grace_s = grace_s
        self.replicas: list[Replica] = []
        for m in models:
            cfg_path = workdir / f"{m.name}.yaml"
            cfg_path.write_text(m.config_yaml)
            for i in range(m.replicas):
                self.replicas.append(Replica(m.name, i, cfg_path, "127.0.0.1", _free_port("127.0.0.1")))
        balancer, proxy, limits = gateway_settings
        self.app = GatewayApp(StaticDiscovery({m.name: set() for m in models}), balancer, proxy, limits)
        self._supervisor: asyncio.Task | None = None
        self.stopping = False

    def _publish(self, model: str) -> None:
        """The gateway sends only to ready replicas (what EndpointSlices do in a cluster)."""
        ready = {(r.host, r.port) for r in self.replicas if r.model == model and r.ready}
        draining = {(r.host, r.port) for r in self.replicas if r.model == model and r.draining}
        self.app.balancer.set_model(model, ready, draining)

    async def start(self) -> int:
        """Start every replica, wait until all are ready, start the gateway; returns its port."""
        await asyncio.gather(*(r.start() for r in self.replicas))
        timeout = {m.name: m.startup_timeout_s for m in self.models}
        await asyncio.gather(*(self._wait_ready(r, timeout[r.model]) for r in self.replicas))
        try:
            port = await self.app.start(self.host, self.port)
        except OSError as e:
            raise LocalError(f"the gateway cannot listen on {self.host}:{self.port}: {e.strerror or e}; "
                             "choose another --port") from None
        for m in self.models:
            self._publish(m.name)
        self._supervisor = asyncio.create_task(self._supervise())
        return port

    async def _wait_ready(self, r: Replica, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        why = ""
        while time.monotonic() < deadline:
            if not r.alive():
                await asyncio.sleep(0.1)  # let the relay print its last lines
                raise LocalError(f"{r.label} exited with code {r.proc.returncode} before it was ready"
                                 + (f": {r.output[-1]}" if r.output else ""))
            ok, why, _ = await r.readiness()
            if ok:
                r.ready = True
                return
            if "failed to load" in why:  # permanent: the server does not try again
                hint = ("; to run this manifest on this machine's CPU: caffeserve up --device cpu ..."
                        if "device kind 'gpu'" in why else "")
                raise LocalError(f"{r.label}: {why}{hint}")
            await asyncio.sleep(0.1)
        raise LocalError(f"{r.label} not ready within {timeout_s:g} s (runtime.startupTimeoutSeconds): {why}")

    async def _supervise(self) -> None:
        """One watcher per replica (a slow probe or a restart backoff holds up no other)."""
        await asyncio.gather(*(self._watch(r) for r in self.replicas))

    async def _watch(self, r: Replica) -> None:
        """Restart the replica when it dies (with backoff, as the kubelet does); track its readiness.

        Its readiness decides where the gateway sends requests, as EndpointSlices do in a cluster:
        a replica that answers 503 (shutting down: it drains) finishes what it holds; one that does
        not answer PROBE_FAILURES probes in a row within PROBE_TIMEOUT_S each (hung) has its
        requests taken back by the gateway and sent to another.
        """
        backoff = 1.0
        unanswered = 0
        while not self.stopping:
            await asyncio.sleep(PROBE_PERIOD_S)
            if self.stopping:
                return
            if not r.alive():
                if r.ready or r.draining:
                    r.ready = r.draining = False
                    self._publish(r.model)
                    log.warning("%s exited with code %s; restarting", r.label, r.proc.returncode)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                if self.stopping:
                    return
                r.restarts += 1
                await r.start()
                continue
            ok, why, answered = await r.readiness(PROBE_TIMEOUT_S)
            unanswered = 0 if answered else unanswered + 1
            if not answered and unanswered < PROBE_FAILURES:
                continue
            draining = not ok and answered and "shutting down" in why
            if ok != r.ready or draining != r.draining:
                r.ready, r.draining = ok, draining
                self._publish(r.model)
                if ok:
                    backoff = 1.0
                elif not answered:
                    log.warning("%s did not answer its readiness probe: %s", r.label, why)

    async def stop(self) -> None:
        """Gateway first (refuse new requests, finish those in flight), then every server."""
        self.stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except asyncio.CancelledError:
                pass
        if self.app.port is not None:
            await self.app.stop(self.grace_s)
        await asyncio.gather(*(r.stop(self.grace_s) for r in self.replicas))

    def banner(self, port: int) -> str:
        url = f"http://{self.host if self.host not in ('0.0.0.0', '') else '127.0.0.1'}:{port}"
        lines = []
        for m in self.models:
            servers = ", ".join(r.url for r in self.replicas if r.model == m.name)
            lines.append(f"{m.name}: {m.replicas} replica(s) ready ({servers})")
        lines.append(f"gateway: {url}   (Ctrl-C or SIGTERM stops everything)")
        for m in self.models:
            lines.append(f"  curl {url}/v2/models/{m.name}")
            lines.append(f"  POST {url}/v2/models/{m.name}/infer")
        return "\n".join(lines)

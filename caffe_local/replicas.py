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
    grpc_port: int | None = None  # its own, so that replicas on one machine do not all claim 8081
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    restarts: int = 0
    output: list[str] = field(default_factory=list)  # the last lines, for error messages

    @property
    def label(self) -> str:
        return f"{self.model}-{self.index}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self.ready = False
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "inference_server", "serve", "--config", str(self.config_path),
            "--host", self.host, "--port", str(self.port),
            *(["--grpc-port", str(self.grpc_port)] if self.grpc_port is not None else []),
            "--no-access-log",  # the gateway's access line names every request; errors are still logged
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

    async def readiness(self) -> tuple[bool, str]:
        """(ready, why not) from the server's /v2/health/ready."""
        pool = EndpointPool(self.host, self.port, connect_timeout_s=1.0)
        try:
            loop = asyncio.get_running_loop()
            resp = await pool.request("GET", "/v2/health/ready", [], b"", loop.time() + 2.0)
        except UpstreamError as e:
            return False, str(e)
        finally:
            pool.close()
        if resp.status == 200:
            return True, ""
        try:
            import orjson

            return False, orjson.loads(resp.body).get("error") or f"HTTP {resp.status}"
        except Exception:
            return False, f"HTTP {resp.status}"

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
                 port: int = 8080, grace_s: float = 30.0, grpc_port: int | None = None):
        self.models = models
        self.host = host
        self.port = port
        self.grpc_port = grpc_port  # the gateway's; None: REST only
        self.grace_s = grace_s
        self.replicas: list[Replica] = []
        for m in models:
            cfg_path = workdir / f"{m.name}.yaml"
            cfg_path.write_text(m.config_yaml)
            for i in range(m.replicas):
                self.replicas.append(Replica(m.name, i, cfg_path, "127.0.0.1", _free_port("127.0.0.1"),
                                             _free_port("127.0.0.1") if m.grpc else None))
        balancer, proxy, limits = gateway_settings
        self.app = GatewayApp(StaticDiscovery({m.name: set() for m in models}), balancer, proxy, limits)
        self._supervisor: asyncio.Task | None = None
        self.stopping = False

    def _publish(self, model: str) -> None:
        """The gateway sends only to ready replicas (what EndpointSlices do in a cluster)."""
        ready = {(r.host, r.port, r.grpc_port) for r in self.replicas if r.model == model and r.ready}
        self.app.balancer.set_model(model, ready)

    async def start(self) -> int:
        """Start every replica, wait until all are ready, start the gateway; returns its port."""
        await asyncio.gather(*(r.start() for r in self.replicas))
        timeout = {m.name: m.startup_timeout_s for m in self.models}
        await asyncio.gather(*(self._wait_ready(r, timeout[r.model]) for r in self.replicas))
        try:
            port = await self.app.start(self.host, self.port, grpc_port=self.grpc_port)
        except OSError as e:
            raise LocalError(f"the gateway cannot listen on {self.host} (port {self.port}, gRPC {self.grpc_port}): "
                             f"{e.strerror or e}; choose another --port / --grpc-port") from None
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
            ok, why = await r.readiness()
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
        """Restart replicas that die (with backoff, as the kubelet does); track readiness."""
        backoff: dict[str, float] = {}
        while not self.stopping:
            await asyncio.sleep(0.5)
            for r in self.replicas:
                if self.stopping:
                    return
                if not r.alive():
                    if r.ready:
                        r.ready = False
                        self._publish(r.model)
                        log.warning("%s exited with code %s; restarting", r.label, r.proc.returncode)
                    delay = backoff.get(r.label, 1.0)
                    backoff[r.label] = min(delay * 2, 30.0)
                    await asyncio.sleep(delay)
                    if self.stopping:
                        return
                    r.restarts += 1
                    await r.start()
                    continue
                ok, _ = await r.readiness()
                if ok != r.ready:
                    r.ready = ok
                    self._publish(r.model)
                    if ok:
                        backoff.pop(r.label, None)

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
            servers = ", ".join(r.url + (f" (gRPC :{r.grpc_port})" if r.grpc_port else "")
                                for r in self.replicas if r.model == m.name)
            lines.append(f"{m.name}: {m.replicas} replica(s) ready ({servers})")
        host = self.host if self.host not in ("0.0.0.0", "") else "127.0.0.1"
        if self.app.grpc_port is not None:
            lines.append(f"gateway gRPC: {host}:{self.app.grpc_port}   (tritonclient.grpc.InferenceServerClient"
                         f"(\"{host}:{self.app.grpc_port}\"))")
        lines.append(f"gateway: {url}   (Ctrl-C or SIGTERM stops everything)")
        for m in self.models:
            lines.append(f"  curl {url}/v2/models/{m.name}")
            lines.append(f"  POST {url}/v2/models/{m.name}/infer")
        return "\n".join(lines)

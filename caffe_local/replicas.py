"""Local mode's processes: a `caffeserve serve` per replica, supervised, behind a gateway.

`LocalService` starts every replica of every model variant (the primary, and a canary when the
manifest has one), waits until each is ready, starts the gateway (caffe_gateway) with a static
endpoint list it keeps equal to the ready replicas (what EndpointSlices do in a cluster),
restarts a replica that dies (with backoff, as the kubelet does), and stops the gateway first,
then the servers.

With `spec.autoscaling` a variant's replica count follows the gateway's load signal
(autoscale.py) between minReplicas and maxReplicas, down to zero: the gateway holds requests
while no replica is ready (up to coldStartTimeoutSeconds) and a held request starts one. A
replica leaves the gateway's list first, finishes its requests, then gets SIGTERM: none is lost.

`apply` takes a new manifest (main.py watches the file): a variant whose server config changed is
rolled (new replicas ready first, then the old ones retired as above), a new variant (a canary)
is started, a removed one retired after the others settled; weights and autoscaling bounds
change in place. So promoting or rolling back a canary loses no request.
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
from typing import TYPE_CHECKING

from caffe_gateway.app import GatewayApp
from caffe_gateway.balancer import Address
from caffe_gateway.discovery import StaticDiscovery
from caffe_gateway.settings import GatewaySettings
from caffe_gateway.tracing import start_tracing
from caffe_http.access_log import AccessLog
from caffe_http.tracing import TracingUnavailable
from caffe_http.upstream import EndpointPool, UpstreamError

from .autoscale import Autoscaler
from .models import LocalError, LocalModel

if TYPE_CHECKING:
    from caffe_gateway.auth import Guard
    from caffe_http.tls import ReloadingTLS

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
    grpc_port: int | None = None  # its own, so that replicas on one machine do not all claim 8081
    log_level: str = "INFO"  # `up --log-level`, passed on
    repository: bool = False  # config_path is a model repository folder: a pool's many-model server
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    draining: bool = False  # answered its readiness probe with "shutting down"
    restarts: int = 0
    starting: bool = False  # being brought up by a scaling step (the supervisor leaves it alone)
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
            sys.executable, "-m", "inference_server", "serve", *self._source(),
            "--host", self.host, "--port", str(self.port), "--drain-delay", str(DRAIN_DELAY_S),
            *(["--grpc-port", str(self.grpc_port)] if self.grpc_port is not None else []),
            "--no-access-log",  # the gateway's access line names every request; errors are still logged
            "--log-level", self.log_level,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches `up` only; it stops the servers in order
            preexec_fn=_die_with_parent,
        )
        asyncio.create_task(self._relay(self.proc))

    def _source(self) -> list[str]:
        if self.repository:  # every model loaded at start; load and unload calls taken (through the gateway too)
            return ["--model-repository", str(self.config_path), "--model-control-mode", "explicit",
                    "--load-model", "*"]
        return ["--config", str(self.config_path)]

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
        proc = self.proc
        if proc is None or proc.returncode is not None:  # not alive()
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()


class Group:
    """The replicas of one model variant."""

    def __init__(self, model: LocalModel, cfg_path: Path):
        self.model = model
        self.serves = model.serves or (model.name,)  # the models its replicas serve (a pool: many)
        self.cfg_path = cfg_path
        self.replicas: list[Replica] = []
        self.next_index = 0
        self.lock = asyncio.Lock()  # one scaling step or rollout at a time
        self.scaler = Autoscaler(model.autoscaling) if model.autoscaling else None
        self.scale_ups = 0
        self.scale_downs = 0

    def initial_count(self) -> int:
        return self.model.autoscaling.min_replicas if self.model.autoscaling else self.model.replicas


class LocalService:
    """The replicas of every model plus the gateway, started and stopped together."""

    def __init__(
        self,
        models: list[LocalModel],
        workdir: Path,
        gateway_settings: GatewaySettings,
        host: str = "127.0.0.1",
        port: int = 8080,
        grace_s: float = 30.0,
        grpc_port: int | None = None,
        scale_interval_s: float = 0.25,
        log_level: str = "INFO",
        access_log: bool = True,
        guard: Guard | None = None,
        tls: ReloadingTLS | None = None,
    ):
        self.log_level = log_level
        self.models = models
        self.workdir = workdir
        self.host = host
        self.port = port
        self.grpc_port = grpc_port  # the gateway's; None: REST only
        self.grace_s = grace_s
        self.scale_interval_s = scale_interval_s
        self.groups: dict[tuple[str, str], Group] = {}
        self._retiring: set[tuple[str, int]] = set()  # addresses being retired by the scaler
        self._configs = 0
        for m in models:
            g = self.groups[m.key] = Group(m, m.repository or self._write_config(m))
            for _ in range(g.initial_count()):
                self._new_replica(g)
        balancer, proxy, limits = gateway_settings
        primaries: dict[str, set[Address]] = {
            name: set() for g in self.groups.values() if g.model.variant == "primary" for name in g.serves}
        try:  # traced as `caffeserve gateway` is, when the environment names an OTLP endpoint (docs/tracing.md)
            tracing = start_tracing(None, 1.0)
        except TracingUnavailable as e:
            raise LocalError(str(e)) from None
        self.app = GatewayApp(StaticDiscovery(primaries), balancer, proxy, limits, AccessLog("gateway", access_log),
                              tracing, guard, tls)
        self._supervisor: asyncio.Task | None = None
        self._scaler: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.stopping = False
        self.events: list[tuple[float, str, str, int]] = []  # (time, variant label, "up"/"down"/"ready", replicas)

    @property
    def replicas(self) -> list[Replica]:
        return [r for g in self.groups.values() for r in g.replicas]

    def _write_config(self, m: LocalModel) -> Path:
        self._configs += 1
        path = self.workdir / f"{m.label}-{self._configs}.yaml"
        path.write_text(m.config_yaml)
        return path

    def _new_replica(self, g: Group) -> Replica:
        r = Replica(g.model.label, g.next_index, g.cfg_path, "127.0.0.1", _free_port("127.0.0.1"),
                    _free_port("127.0.0.1") if g.model.grpc else None, log_level=self.log_level,
                    repository=g.model.repository is not None)
        g.next_index += 1
        g.replicas.append(r)
        return r

    def _route(self, g: Group):
        b = self.app.balancer
        return b.models.get(g.model.name) if g.model.variant == "primary" else b.canaries.get(g.model.name)

    def _publish(self, g: Group) -> None:
        """The gateway sends only to ready replicas (what EndpointSlices do in a cluster)."""
        m = g.model
        ready = {(r.host, r.port, r.grpc_port) for r in g.replicas if r.ready}
        # a replica draining itself, or one the scaler is retiring: it finishes what it holds
        draining = {(r.host, r.port) for r in g.replicas if r.draining} | self._retiring
        auto = m.autoscaling
        hold = auto.cold_start_s if auto is not None and auto.min_replicas == 0 else 0.0
        if m.variant == "primary":
            for name in g.serves:
                self.app.balancer.set_model(name, ready, draining)
                self.app.balancer.configure(name, version=m.version, cold_start_s=hold)
        else:
            self.app.balancer.set_canary(m.name, ready, m.traffic_percent, m.version, hold)

    def _group_of(self, r: Replica) -> Group | None:
        return next((g for g in self.groups.values() if r in g.replicas), None)

    async def start(self) -> int:
        """Start every replica, wait until all are ready, start the gateway; returns its port."""
        await asyncio.gather(*(r.start() for r in self.replicas))
        await asyncio.gather(*(self._wait_ready(r, g.model.startup_timeout_s)
                               for g in self.groups.values() for r in g.replicas))
        try:
            port = await self.app.start(self.host, self.port, grpc_port=self.grpc_port)
        except OSError as e:
            raise LocalError(f"the gateway cannot listen on {self.host} (port {self.port}, gRPC {self.grpc_port}): "
                             f"{e.strerror or e}; choose another --port / --grpc-port") from None
        for g in self.groups.values():
            self._publish(g)
        self._supervisor = asyncio.create_task(self._supervise())
        self._scaler = asyncio.create_task(self._autoscale())
        return port

    async def _wait_ready(self, r: Replica, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        why = ""
        while time.monotonic() < deadline:
            if not r.alive():
                await asyncio.sleep(0.1)  # let the relay print its last lines
                code = r.proc.returncode if r.proc is not None else None
                raise LocalError(f"{r.label} exited with code {code} before it was ready"
                                 + (f": {r.output[-1]}" if r.output else ""), exit_code=1)
            ok, why, _ = await r.readiness()
            if ok:
                r.ready = True
                return
            if "failed to load" in why:  # permanent: the server does not try again
                hint = ("; to run this manifest on this machine's CPU: caffeserve up --device cpu ..."
                        if "device kind 'gpu'" in why else "")
                raise LocalError(f"{r.label}: {why}{hint}", exit_code=1)
            await asyncio.sleep(0.05)
        raise LocalError(f"{r.label} not ready within {timeout_s:g} s (runtime.startupTimeoutSeconds): {why}",
                         exit_code=1)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _supervise(self) -> None:
        """One watcher per replica (a slow probe or a restart backoff holds up no other); a replica the
        autoscaler adds gets its watcher on the next pass, one it retires ends its own."""
        watched: dict[str, asyncio.Task] = {}
        while not self.stopping:
            for r in self.replicas:
                task = watched.get(r.label)
                if task is None or task.done():
                    watched[r.label] = asyncio.create_task(self._watch(r))
                    self._tasks.add(watched[r.label])
                    watched[r.label].add_done_callback(self._tasks.discard)
            await asyncio.sleep(PROBE_PERIOD_S)

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
            g = self._group_of(r)
            if self.stopping or g is None:
                return  # stopping, or retired by the autoscaler
            if r.starting or r.proc is None:
                continue  # still being brought up by its scaler
            if not r.alive():
                if r.ready or r.draining:
                    r.ready = r.draining = False
                    self._publish(g)
                    log.warning("%s exited with code %s; restarting", r.label, r.proc.returncode)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                if self.stopping or self._group_of(r) is None:
                    return
                r.restarts += 1
                await r.start()
                continue
            ok, why, answered = await r.readiness(PROBE_TIMEOUT_S)
            unanswered = 0 if answered else unanswered + 1
            if not answered and unanswered < PROBE_FAILURES:
                continue
            draining = not ok and answered and "shutting down" in why
            if (ok != r.ready or draining != r.draining) and self._group_of(r) is g:
                r.ready, r.draining = ok, draining
                self._publish(g)
                if ok:
                    backoff = 1.0
                elif not answered:
                    log.warning("%s did not answer its readiness probe: %s", r.label, why)
    # --- autoscaling
    async def _autoscale(self) -> None:
        """Every tick, each autoscaled variant's replicas follow the gateway's load signal."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            await asyncio.sleep(self.scale_interval_s)
            for g in list(self.groups.values()):
                if g.scaler is None or g.lock.locked() or self.stopping:
                    continue
                route = self._route(g)
                load = route.concurrency() if route is not None else 0
                current = len(g.replicas)
                want = g.scaler.desired(load, current, loop.time())
                if want != current:
                    self._spawn(self._scale(g, want))

    async def _scale(self, g: Group, want: int) -> None:
        async with g.lock:
            current = len(g.replicas)
            if want > current:
                g.scale_ups += 1
                self._note(g, "up", want)
                print(f"{g.model.label}: scaling up {current} -> {want} replica(s) "
                      f"(load {self._load(g)}, target {g.model.autoscaling.target if g.model.autoscaling else '-'})",
                      flush=True)
                await asyncio.gather(*(self._bring_up(g, self._new_replica(g)) for _ in range(want - current)))
            elif want < current:
                g.scale_downs += 1
                self._note(g, "down", want)
                print(f"{g.model.label}: scaling down {current} -> {want} replica(s)", flush=True)
                # not-ready ones first, then the newest
                victims = sorted(g.replicas, key=lambda r: (r.ready, r.index))[:current - want]
                await self._retire(g, victims)

    def _load(self, g: Group) -> int:
        route = self._route(g)
        return route.concurrency() if route is not None else 0

    def _note(self, g: Group, what: str, replicas: int) -> None:
        self.events.append((time.monotonic(), g.model.label, what, replicas))

    async def _bring_up(self, g: Group, r: Replica) -> None:
        """Start a replica and publish it as soon as it is ready (the supervisor takes over then)."""
        r.starting = True
        try:
            await r.start()
            await self._wait_ready(r, g.model.startup_timeout_s)
        except LocalError as e:
            log.warning("%s", e)
            r.starting = False
            return
        r.starting = False
        if self._group_of(r) is g:
            self._publish(g)
            self._note(g, "ready", sum(1 for x in g.replicas if x.ready))
            print(f"{r.label} ready ({sum(1 for x in g.replicas if x.ready)} of {len(g.replicas)})", flush=True)

    async def _retire(self, g: Group | None, victims: list[Replica], route=None) -> None:
        """Out of the gateway's list first; once their requests there are answered, SIGTERM."""
        route = route if route is not None else (self._route(g) if g is not None else None)
        addresses = {(r.host, r.port) for r in victims}
        endpoints = [e for e in (route.endpoints if route is not None else [])
                     if (e.pool.host, e.pool.port) in addresses]
        self._retiring |= addresses  # not hung: the gateway leaves their requests to finish there
        try:
            if g is not None:
                g.replicas = [r for r in g.replicas if r not in victims]
                self._publish(g)
            deadline = time.monotonic() + self.grace_s
            while any(e.active for e in endpoints) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.gather(*(r.stop(self.grace_s) for r in victims))
        finally:
            self._retiring -= addresses

    # --- a changed manifest
    async def apply(self, models: list[LocalModel]) -> None:
        """Bring the running variants to `models` (see the module docstring), losing no request."""
        new = {m.key: m for m in models}
        for key, m in new.items():
            g = self.groups.get(key)
            if g is None:
                g = self.groups[key] = Group(m, self._write_config(m))
                if m.variant == "primary":
                    self.app.balancer.set_model(m.name, set())
                self._publish(g)
                print(f"{m.label}: starting {g.initial_count()} replica(s)", flush=True)
                await asyncio.gather(*(self._bring_up(g, self._new_replica(g)) for _ in range(g.initial_count())))
                continue
            async with g.lock:
                old = g.model
                g.model = m
                if m.autoscaling != old.autoscaling:
                    g.scaler = Autoscaler(m.autoscaling) if m.autoscaling else None
                if m.config_yaml != old.config_yaml:
                    await self._roll(g, m)
                self._publish(g)
            if g.scaler is None and len(g.replicas) != m.replicas:
                async with g.lock:
                    if m.replicas > len(g.replicas):
                        await asyncio.gather(*(self._bring_up(g, self._new_replica(g))
                                               for _ in range(m.replicas - len(g.replicas))))
                    else:
                        await self._retire(
                            g, sorted(g.replicas, key=lambda r: (r.ready, r.index))[: len(g.replicas) - m.replicas]
                        )
        for key in [k for k in self.groups if k not in new]:
            g = self.groups.pop(key)
            print(f"{g.model.label}: removed from the manifest; retiring {len(g.replicas)} replica(s)", flush=True)
            route = self._route(g)
            if g.model.variant == "canary":
                self.app.balancer.set_canary(g.model.name, None)
            else:
                self.app.balancer.remove_model(g.model.name)
            await self._retire(None, g.replicas, route)
        self.models = models

    async def _roll(self, g: Group, m: LocalModel) -> None:
        """New replicas with the new config, ready first; then the old ones retire."""
        count = len(g.replicas) if g.scaler is None or g.replicas else 0
        g.cfg_path = self._write_config(m)
        old = list(g.replicas)
        fresh = [Replica(m.label, g.next_index + i, g.cfg_path, "127.0.0.1", _free_port("127.0.0.1"),
                         _free_port("127.0.0.1") if m.grpc else None, log_level=self.log_level)
                 for i in range(count)]
        g.next_index += count
        print(f"{m.label}: config changed; rolling {count} replica(s)", flush=True)
        await asyncio.gather(*(r.start() for r in fresh))
        try:
            await asyncio.gather(*(self._wait_ready(r, m.startup_timeout_s) for r in fresh))
        except LocalError as e:
            print(f"{m.label}: the new config does not serve ({e}); keeping the old replicas", flush=True)
            await asyncio.gather(*(r.stop(self.grace_s) for r in fresh))
            return
        route = self._route(g)
        g.replicas = fresh
        self._publish(g)
        await self._retire(None, old, route)

    async def stop(self) -> None:
        """Gateway first (refuse new requests, finish those in flight), then every server."""
        self.stopping = True
        for task in (self._supervisor, self._scaler, *self._tasks):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        if self.app.port is not None:
            await self.app.stop(self.grace_s)
        await asyncio.gather(*(r.stop(self.grace_s) for r in self.replicas))
        if self.app.gateway.tracing is not None:
            self.app.gateway.tracing.shutdown()  # the gateway's last spans go out

    def banner(self, port: int) -> str:
        scheme = "https" if self.app.tls is not None else "http"
        url = f"{scheme}://{self.host if self.host not in ('0.0.0.0', '') else '127.0.0.1'}:{port}"
        lines = []
        for g in self.groups.values():
            m = g.model
            servers = ", ".join(r.url + (f" (gRPC :{r.grpc_port})" if r.grpc_port else "") for r in g.replicas)
            extra = ""
            if m.autoscaling:
                a = m.autoscaling
                extra = f"; autoscaling {a.min_replicas}-{a.max_replicas}, target {a.target} requests per replica"
            if m.variant != "primary" or any(x.variant != "primary" for x in self.models if x.name == m.name):
                extra += f"; {m.variant} version {m.version}, {m.traffic_percent}% of requests"
            if m.repository is not None:
                extra += f"; serving {', '.join(g.serves)}"
            lines.append(f"{m.label}: {len(g.replicas)} replica(s) ready ({servers}){extra}")
        host = self.host if self.host not in ("0.0.0.0", "") else "127.0.0.1"
        if self.app.grpc_port is not None:
            lines.append(f"gateway gRPC: {host}:{self.app.grpc_port}   (tritonclient.grpc.InferenceServerClient"
                         f"(\"{host}:{self.app.grpc_port}\"))")
        lines.append(f"gateway: {url}   (Ctrl-C or SIGTERM stops everything)")
        for name in dict.fromkeys(n for g in self.groups.values() for n in g.serves):
            lines.append(f"  curl {url}/v2/models/{name}")
            lines.append(f"  POST {url}/v2/models/{name}/infer")
        return "\n".join(lines)

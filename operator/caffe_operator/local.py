"""`caffeserve up MANIFEST [--port P]`: a CaffeModelService manifest on this machine, no cluster.

It reads the same manifest a user would `kubectl apply` (validated by the operator's own types),
starts `spec.replicas` `caffeserve serve` processes on loopback per model with the very server
config the operator would put in the pod (manifests.server_config), puts the gateway in front,
prints where to send requests, and on Ctrl-C or SIGTERM stops the gateway (finishing requests in
flight), then the servers, and exits. Like a Deployment, it restarts a replica that dies, and
the gateway only sends to replicas that are ready.

Where the model files come from, per `spec.source`:
- `pvc: {claimName: C, path: P}`: the files are in `ROOT/C/P` when the folder `ROOT/C` exists,
  else in `ROOT/P`; ROOT is `--pvc-root` (default: the manifest's folder). So a manifest kept
  beside its model files (examples/digits/service.yaml) runs as it is.
- `url`: each file is downloaded by `caffeserve fetch` (sha256 checked) into
  `--cache-dir/NAME/` (default `$XDG_CACHE_HOME/caffeserve` or `~/.cache/caffeserve`); a file
  already there with the expected sha256 is not downloaded again (one without a sha256 in the
  manifest, e.g. labels, is downloaded at every start).
- `configMap: {name: N}`: the ConfigMap `N` must be in the same file (`---`-separated); its
  `data` and `binaryData` keys are written to a temporary folder.

Runtime fields that only make sense in a cluster (image, GPU resource names, node selection) are
ignored. `--device cpu` runs a `device: gpu` manifest on this machine's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from caffe_operator.api import API_VERSION, KIND, InvalidSpec, local_name, parse_spec
from caffe_operator.fetch import FetchError, fetch
from caffe_operator.gateway.app import GatewayApp
from caffe_operator.gateway.discovery import StaticDiscovery
from caffe_operator.gateway.main import add_balancing_arguments, settings_from
from caffe_operator.gateway.upstream import EndpointPool, UpstreamError
from caffe_operator.manifests import MODEL_DIR, file_url, server_config
from inference_server.httpserver import install_uvloop

log = logging.getLogger("caffeserve.up")


class LocalError(Exception):
    """Something local mode cannot run; the message says what and how to fix it."""


# --------------------------------------------------------------------------- the manifest


@dataclass
class LocalModel:
    name: str
    replicas: int
    config_yaml: str  # the `caffeserve serve` config, with this machine's file paths
    startup_timeout_s: float


def load_manifest(path: Path) -> list[dict]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except OSError as e:
        raise LocalError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise LocalError(f"{path} is not valid YAML: {e}") from None
    if not all(isinstance(d, dict) for d in docs):
        raise LocalError(f"{path}: every document must be a Kubernetes object (a mapping)")
    return docs


def _files_dir(name: str, spec, manifest: Path, docs: list[dict], pvc_root: Path | None, cache_dir: Path,
               tmp: Path) -> Path:
    """The local folder that plays /models for this model (see the module docstring)."""
    src = spec.source
    if src.pvc is not None:
        root = (pvc_root or manifest.parent).resolve()
        claim = root / src.pvc.claim_name
        base = claim if claim.is_dir() else root
        return base / src.pvc.path.strip("/") if src.pvc.path.strip("/") else base
    if src.url is not None:
        dest = cache_dir / name
        sha = spec.model.sha256s()
        for role, file in spec.model.files().items():
            url = file_url(spec, file)
            try:
                got = fetch(url, dest / local_name(file), sha.get(role))
            except FetchError as e:
                raise LocalError(f"{name}: model.{role}: {e}") from None
            print(f"{name}: {local_name(file)} {'downloaded' if got.downloaded else 'cached'} "
                  f"({got.size} bytes, sha256 {got.sha256[:12]}…)", flush=True)
        return dest
    cm_name = src.config_map.name
    cm = next((d for d in docs if d.get("kind") == "ConfigMap" and (d.get("metadata") or {}).get("name") == cm_name),
              None)
    if cm is None:
        raise LocalError(f"{name}: source.configMap {cm_name!r} is not in {manifest}; "
                         "add the ConfigMap to the same file (separated by ---)")
    dest = tmp / f"configmap-{cm_name}"
    dest.mkdir(parents=True, exist_ok=True)
    for key, text in (cm.get("data") or {}).items():
        (dest / key).write_text(text)
    for key, b64 in (cm.get("binaryData") or {}).items():
        (dest / key).write_bytes(base64.b64decode(b64))
    return dest


def _rebase(path: str | None, files: Path) -> str | None:
    """/models/x (the pod's path) → FILES/x."""
    if path is None:
        return None
    rel = Path(path).relative_to(MODEL_DIR)
    return str(files / rel)


def local_models(manifest: Path, pvc_root: Path | None, cache_dir: Path, tmp: Path,
                 device: str | None = None, replicas: int | None = None) -> list[LocalModel]:
    """Every CaffeModelService in the file, as server configs for this machine."""
    docs = load_manifest(manifest)
    services = [d for d in docs if d.get("kind") == KIND]
    if not services:
        raise LocalError(f"{manifest} has no {KIND} (apiVersion {API_VERSION})")
    out = []
    for doc in services:
        if doc.get("apiVersion") != API_VERSION:
            raise LocalError(f"{manifest}: apiVersion {doc.get('apiVersion')!r}; expected {API_VERSION}")
        name = (doc.get("metadata") or {}).get("name") or ""
        try:
            spec = parse_spec(name, doc.get("spec"))
        except InvalidSpec as e:
            raise LocalError(f"{manifest}: {KIND} {name!r}: {e}") from None
        files = _files_dir(name, spec, manifest, docs, pvc_root, cache_dir, tmp)
        for role, file in spec.model.files().items():
            if not (files / local_name(file)).is_file():
                hint = " (the pvc rule: see `caffeserve up --help`)" if spec.source.pvc is not None else ""
                raise LocalError(f"{name}: model.{role} {local_name(file)!r} not found in {files}{hint}")
        cfg = server_config(name, spec)
        model = cfg.model.model_copy(update={k: _rebase(getattr(cfg.model, k), files)
                                             for k in ("prototxt", "weights", "labels")})
        update = {"model": model}
        if cfg.preprocessing is not None and cfg.preprocessing.mean_file:
            update["preprocessing"] = cfg.preprocessing.model_copy(
                update={"mean_file": _rebase(cfg.preprocessing.mean_file, files)})
        if device is not None:
            update["device"] = cfg.device.model_copy(update={"kind": device})
        cfg = cfg.model_copy(update=update)
        data = cfg.model_dump(by_alias=True, exclude_none=True, mode="json")
        out.append(LocalModel(name, spec.replicas if replicas is None else replicas,
                              yaml.safe_dump(data, sort_keys=False), float(spec.runtime.startup_timeout_seconds)))
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise LocalError(f"{manifest}: two {KIND}s share a name")
    return out


# --------------------------------------------------------------------------- server processes


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
            sys.executable, "-m", "inference_server.cli", "serve", "--config", str(self.config_path),
            "--host", self.host, "--port", str(self.port),
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

    def __init__(self, models: list[LocalModel], workdir: Path, gateway_settings, host: str = "127.0.0.1",
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
        self.app.balancer.set_model(model, ready)

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
            servers = ", ".join(r.url for r in self.replicas if r.model == m.name)
            lines.append(f"{m.name}: {m.replicas} replica(s) ready ({servers})")
        lines.append(f"gateway: {url}   (Ctrl-C or SIGTERM stops everything)")
        for m in self.models:
            lines.append(f"  curl {url}/v2/models/{m.name}")
            lines.append(f"  POST {url}/v2/models/{m.name}/infer")
        return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caffeserve"


def parser(prog: str = "caffeserve up") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", type=Path, help="a CaffeModelService manifest (YAML; several documents allowed)")
    p.add_argument("--host", default="127.0.0.1", help="gateway address (default %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="gateway port (default %(default)s; 0: any free port)")
    p.add_argument("--pvc-root", type=Path, help="folder that holds PVC claims (default: the manifest's folder)")
    p.add_argument("--cache-dir", type=Path, default=None, help="where source.url files are downloaded")
    p.add_argument("--device", choices=["cpu", "gpu"], help="override runtime.device (e.g. cpu on a laptop)")
    p.add_argument("--replicas", type=int, help="override spec.replicas")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to finish requests in flight on stop")
    add_balancing_arguments(p)
    return p


async def run(args, on_ready=None) -> int:
    """Run until SIGTERM/SIGINT (or until `on_ready(port)` returns, when given); 0 on a clean stop."""
    tmp = Path(tempfile.mkdtemp(prefix="caffeserve-up-"))
    service = None
    try:
        models = local_models(args.manifest, args.pvc_root, args.cache_dir or default_cache_dir(), tmp,
                              args.device, args.replicas)
        service = LocalService(models, tmp, settings_from(args), args.host, args.port, args.grace)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        starting = asyncio.create_task(service.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while starting
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            print("stopping", flush=True)
            return 0
        port = starting.result()
        print(service.banner(port), flush=True)
        if on_ready is not None:
            result = await on_ready(port)
            stopped.cancel()
            return result
        await stopped
        print("stopping: finishing requests in flight, then the servers", flush=True)
        return 0
    except LocalError as e:
        print(f"caffeserve up: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if service is not None:
            await service.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_uvloop()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())

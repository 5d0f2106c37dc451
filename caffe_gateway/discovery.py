"""Where each model's servers are: a static list (local mode) or Kubernetes EndpointSlices.

Cluster contract (what the operator creates): each CaffeModelService `m` has a Service
`m-predictor` labelled `caffeserving.io/model: m` with a port named `http` (and `grpc` when the
pods serve gRPC); Kubernetes copies the Service's labels onto its EndpointSlices. The watcher lists and watches
`discovery.k8s.io/v1` EndpointSlices with the label selector `caffeserving.io/model` and keeps the
balancer's endpoint sets equal to the ready endpoints, so pods coming and going need no restart.

Traffic labels (slices.py) on the Services, hence on their slices: a slice labelled
`caffeserving.io/variant: canary` holds the model's canary pods, with its share in
`caffeserving.io/traffic-percent`; `caffeserving.io/version` names each variant's model version
(URL pinning) and `caffeserving.io/cold-start-timeout-seconds` turns on holding requests while a
variant has no ready pod (scale to zero).

API verbs used (for least-privilege RBAC): `list` and `watch` on `endpointslices` in the
`discovery.k8s.io` group, in the watched namespace (a Role) or cluster-wide with
`--all-namespaces` (a ClusterRole). Nothing else is read or written.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import orjson
import yaml

from inference_server.slices import (
    CANARY,
    MODEL_LABEL,
    SliceTraffic,
    slice_endpoints as pod_endpoints,
    slice_labels,
    slice_traffic,
)

from .balancer import Address, Balancer

log = logging.getLogger(__name__)

USER_AGENT = "caffeserve-gateway"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


# --------------------------------------------------------------------------- static


def parse_static(spec: str) -> tuple[str, set[Address]]:
    """`MODEL=URL[,URL...]` → (model, {(host, port, gRPC port or None)}).

    URL: `http://host:port` or `host:port`, with `?grpc=PORT` when that server also serves gRPC
    (on the same host), e.g. `digits=http://127.0.0.1:8001?grpc=8002`; `https://` for a server reached over
    TLS (the gateway's --upstream-ca: then every server is).
    """
    model, sep, urls = spec.partition("=")
    model = model.strip()
    if not sep or not model or not urls.strip():
        raise ValueError(f"expected MODEL=URL[,URL...], got {spec!r}")
    out: set[Address] = set()
    for url in _static_urls(urls):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):  # https: reached over TLS (--upstream-ca)
            raise ValueError(f"{url}: only http:// and https:// servers are supported")
        if not parts.hostname or not parts.port:
            raise ValueError(f"{url}: expected host:port")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        grpc_port = None
        if "grpc" in query:
            if not query["grpc"].isdigit() or not 0 < int(query["grpc"]) < 65536:
                raise ValueError(f"{url}: grpc= must be a port number")
            grpc_port = int(query["grpc"])
        if set(query) - {"grpc"} or parts.path.strip("/"):
            raise ValueError(f"{url}: expected http://host:port, optionally with ?grpc=PORT")
        out.add((parts.hostname, parts.port, grpc_port))
    return model, out


def _static_urls(urls: str) -> list[str]:
    """A --static spec's comma-separated URLs, each with its scheme (`host:port` is http://host:port)."""
    return [u if "://" in u else "http://" + u for u in (u.strip() for u in urls.split(",")) if u]


def static_schemes(specs: list[str]) -> set[str]:
    """The URL schemes the --static specs name (http for a bare host:port)."""
    return {urlsplit(u).scheme for spec in specs for u in _static_urls(spec.partition("=")[2])}


class StaticDiscovery:
    """A fixed set of servers per model, known from the start."""

    def __init__(self, models: dict[str, set[Address]]):
        self.models = models
        self.synced = asyncio.Event()

    async def run(self, balancer: Balancer) -> None:
        balancer.replace_all(self.models)
        self.synced.set()

    async def stop(self) -> None:
        pass


# --------------------------------------------------------------------------- EndpointSlices


def slice_endpoints(obj: dict[str, Any]) -> tuple[str, set[Address]] | None:
    """The model and ready (address, port, gRPC port)s of one EndpointSlice; None if it is not a model's.
    The gRPC port is the slice's port named `grpc` (None without one: the pods serve REST only).

    Readiness follows the EndpointSlice API: an endpoint whose `conditions.ready` is false is
    skipped (terminating pods are not ready); an absent `ready` means ready, as the API documents.
    """
    model = slice_labels(obj).get(MODEL_LABEL)
    if not model:
        return None
    if obj.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
        return None
    return model, {(ep.address, ep.port, ep.grpc_port) for ep in pod_endpoints(obj) if ep.ready}


def slice_draining(obj: dict[str, Any]) -> set[Address]:
    """The endpoints of a slice that are terminating: their pods drain the requests they hold (the
    gateway leaves those to finish); a not-ready endpoint that is not terminating failed its
    readiness probe (hung), and the gateway takes its requests back."""
    return {(ep.address, ep.port) for ep in pod_endpoints(obj) if ep.terminating and not ep.ready}


@dataclass
class KubeConfig:
    """How to reach the API server: URL, TLS and credentials."""

    server: str
    namespace: str = "default"
    token: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    insecure: bool = False
    client_cert: tuple[str, str] | None = None  # (cert file, key file)
    basic_auth: tuple[str, str] | None = None
    _tmp: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def in_cluster(cls) -> KubeConfig:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise RuntimeError("not running in a cluster (KUBERNETES_SERVICE_HOST is not set)")
        if ":" in host:
            host = f"[{host}]"
        ns_file = SERVICE_ACCOUNT_DIR / "namespace"
        return cls(
            server=f"https://{host}:{port}",
            namespace=ns_file.read_text().strip() if ns_file.exists() else "default",
            token_file=str(SERVICE_ACCOUNT_DIR / "token"),
            ca_file=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
        )

    @classmethod
    def from_kubeconfig(cls, path: str, context: str | None = None) -> KubeConfig:
        """The subset of kubeconfig a gateway needs: token, token file, client cert, basic auth, CA.

        Exec and auth-provider plugins are not supported (use a service-account token).
        """
        p = Path(path).expanduser()
        data = yaml.safe_load(p.read_text()) or {}
        base = p.resolve().parent

        def named(kind: str, name: str) -> dict:
            for item in data.get(kind) or []:
                if item.get("name") == name:
                    return item.get(kind[:-1]) or {}
            raise ValueError(f"{p}: no {kind[:-1]} named {name!r}")

        ctx_name = context or data.get("current-context")
        if not ctx_name:
            raise ValueError(f"{p}: no current-context and no --context given")
        ctx = named("contexts", ctx_name)
        cluster = named("clusters", ctx["cluster"])
        user = named("users", ctx["user"]) if ctx.get("user") else {}
        cfg = cls(server=cluster["server"].rstrip("/"), namespace=ctx.get("namespace") or "default",
                  insecure=bool(cluster.get("insecure-skip-tls-verify")))

        def file_of(key: str, where: dict) -> str | None:
            if where.get(f"{key}-data"):
                f = tempfile.NamedTemporaryFile("wb", delete=False, prefix="caffeserve-kube-")
                f.write(base64.b64decode(where[f"{key}-data"]))
                f.close()
                cfg._tmp.append(f.name)
                return f.name
            if where.get(key):
                return str((base / where[key]).resolve())
            return None

        cfg.ca_file = file_of("certificate-authority", cluster)
        cert, key = file_of("client-certificate", user), file_of("client-key", user)
        if cert and key:
            cfg.client_cert = (cert, key)
        cfg.token = user.get("token")
        cfg.token_file = str((base / user["tokenFile"]).resolve()) if user.get("tokenFile") else None
        if user.get("username") and user.get("password"):
            cfg.basic_auth = (user["username"], user["password"])
        if user.get("exec") or user.get("auth-provider"):
            log.warning("kubeconfig user %r uses an exec/auth-provider plugin, which the gateway does not run",
                        ctx.get("user"))
        return cfg

    def headers(self) -> dict[str, str]:
        """Request headers; the token file is re-read each time (bound tokens rotate)."""
        token = self.token
        if self.token_file:
            token = Path(self.token_file).read_text().strip()
        if token:
            return {"Authorization": f"Bearer {token}"}
        if self.basic_auth:
            raw = f"{self.basic_auth[0]}:{self.basic_auth[1]}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {}

    def ssl_context(self) -> ssl.SSLContext | bool | None:
        if not self.server.startswith("https"):
            return None
        if self.insecure:
            return False
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.client_cert:
            ctx.load_cert_chain(*self.client_cert)
        return ctx

    def cleanup(self) -> None:
        for name in self._tmp:
            try:
                os.unlink(name)
            except OSError:
                pass
        self._tmp.clear()


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class EndpointSliceWatcher:
    """List + watch EndpointSlices labelled with a model; keep the balancer in step."""

    def __init__(self, kube: KubeConfig, namespace: str | None, watch_timeout_s: int = 300):
        self.kube = kube
        self.namespace = namespace  # None: all namespaces
        self.watch_timeout_s = watch_timeout_s
        self.synced = asyncio.Event()
        self.slices: dict[tuple[str, str], tuple[str, set[Address]]] = {}
        self.traffic: dict[tuple[str, str], SliceTraffic] = {}  # each slice's traffic labels
        self.draining_slices: dict[tuple[str, str], set[Address]] = {}
        self._balancer: Balancer | None = None
        self._session: Any = None  # an aiohttp.ClientSession while run() runs (aiohttp is imported there)
        self._warned: set[str] = set()

    @property
    def url(self) -> str:
        base = f"{self.kube.server}/apis/discovery.k8s.io/v1"
        if self.namespace:
            return f"{base}/namespaces/{quote(self.namespace, safe='')}/endpointslices"
        return f"{base}/endpointslices"

    async def run(self, balancer: Balancer) -> None:
        """Runs until cancelled; reconnects with backoff on any error."""
        import aiohttp

        self._balancer = balancer
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=self.watch_timeout_s + 30)
        backoff = 0.5
        async with aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": USER_AGENT}) as session:
            self._session = session
            while True:
                try:
                    rv = await self._list()
                    backoff = 0.5
                    while True:
                        started = time.monotonic()
                        rv = await self._watch(rv)
                        if time.monotonic() - started < 1.0:
                            await asyncio.sleep(1.0)  # the API server ended the watch at once: don't spin
                except asyncio.CancelledError:
                    raise
                except _Gone:
                    log.info("endpointslice watch expired (410); listing again")
                    continue
                except Exception as e:  # the API server restarts, a network blip, RBAC not yet granted
                    log.warning("endpointslice discovery: %s; retrying in %.1f s", e, backoff)
                    await asyncio.sleep(backoff * (1 + random.random() * 0.2))
                    backoff = min(backoff * 2, 30.0)

    async def stop(self) -> None:
        self.kube.cleanup()

    def _params(self, **extra) -> dict[str, str]:
        return {"labelSelector": MODEL_LABEL, **{k: str(v) for k, v in extra.items()}}

    async def _list(self) -> str:
        async with self._session.get(self.url, params=self._params(), headers=self.kube.headers(),
                                     ssl=self.kube.ssl_context()) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"list endpointslices: HTTP {resp.status}: {body[:300]!r}")
        doc = orjson.loads(body)
        self.slices = {}
        self.draining_slices = {}
        for obj in doc.get("items") or []:
            self._upsert(obj)
        self._publish()
        self.synced.set()
        return (doc.get("metadata") or {}).get("resourceVersion") or ""

    async def _watch(self, rv: str) -> str:
        """One watch request; returns the last resourceVersion seen when the server ends it."""
        params = self._params(watch="true", allowWatchBookmarks="true", timeoutSeconds=self.watch_timeout_s)
        if rv:
            params["resourceVersion"] = rv
        async with self._session.get(self.url, params=params, headers=self.kube.headers(),
                                     ssl=self.kube.ssl_context()) as resp:
            if resp.status == 410:
                raise _Gone()
            if resp.status != 200:
                raise RuntimeError(f"watch endpointslices: HTTP {resp.status}: {(await resp.read())[:300]!r}")
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        rv = self._on_event(orjson.loads(line), rv)
        return rv

    def _on_event(self, event: dict, rv: str) -> str:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise RuntimeError(f"watch error: {obj.get('message') or obj}")
        new_rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
        if kind == "BOOKMARK":
            return new_rv
        if kind in ("ADDED", "MODIFIED"):
            self._upsert(obj)
        elif kind == "DELETED":
            meta = obj.get("metadata") or {}
            self.slices.pop((meta.get("namespace", ""), meta.get("name", "")), None)
            self.traffic.pop((meta.get("namespace", ""), meta.get("name", "")), None)
            self.draining_slices.pop((meta.get("namespace", ""), meta.get("name", "")), None)
        self._publish()
        return new_rv

    def _upsert(self, obj: dict) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        parsed = slice_endpoints(obj)
        if parsed is None:
            self.slices.pop(key, None)
            self.traffic.pop(key, None)
            self.draining_slices.pop(key, None)
        else:
            self.slices[key] = parsed
            self.traffic[key] = slice_traffic(obj)
            self.draining_slices[key] = slice_draining(obj)

    def models(self) -> dict[str, set[Address]]:
        """Model → ready endpoints, the union over its slices.

        A model name is one URL path: if two namespaces hold a model of the same name (possible
        only with --all-namespaces), the first namespace in sort order serves it and a warning
        says so.
        """
        return self._variant_models(canary=False)

    def _variant_models(self, canary: bool) -> dict[str, set[Address]]:
        by_model: dict[str, dict[str, set[Address]]] = {}
        for key, (model, addrs) in self.slices.items():
            if (self.traffic.get(key, SliceTraffic()).variant == CANARY) != canary:
                continue
            by_model.setdefault(model, {}).setdefault(key[0], set()).update(addrs)
        out: dict[str, set[Address]] = {}
        for model, per_ns in by_model.items():
            chosen = sorted(per_ns)[0]
            if len(per_ns) > 1 and model not in self._warned and not canary:
                self._warned.add(model)
                log.warning("model %r exists in namespaces %s; serving the one in %r",
                            model, sorted(per_ns), chosen)
            out[model] = per_ns[chosen]
        return out

    def draining(self) -> dict[str, set[Address]]:
        """Model → its terminating endpoints (any namespace: an address is one pod)."""
        out: dict[str, set[Address]] = {}
        for key, (model, _) in self.slices.items():
            out.setdefault(model, set()).update(self.draining_slices.get(key, ()))
        return out

    def traffic_by_variant(self) -> dict[tuple[str, bool], SliceTraffic]:
        """(model, is canary) → the traffic labels of that variant's first slice in sort order.

        One pass over the sorted slices for every model: a publish happens on each EndpointSlice event, and
        a lookup per model that sorted all slices made each event cost O(N² log N) (1,000 models starved the
        gateway's health probes: bench/operator_scale.py)."""
        first: dict[tuple[str, bool], SliceTraffic] = {}
        for key in sorted(self.traffic):
            t = self.traffic[key]
            first.setdefault((self.slices[key][0], t.variant == CANARY), t)
        return first

    def _publish(self) -> None:
        if self._balancer is None:
            return
        primaries = self.models()
        self._balancer.replace_all(primaries, self.draining())
        canaries = self._variant_models(canary=True)
        traffic = self.traffic_by_variant()
        for model in primaries:
            t = traffic.get((model, False)) or SliceTraffic()
            self._balancer.configure(model, version=t.version, cold_start_s=t.cold_start_s)
            c = traffic.get((model, True)) if model in canaries else None
            if c is None:
                self._balancer.set_canary(model, None)
            else:
                self._balancer.set_canary(model, canaries[model], c.percent or 0.0, c.version, c.cold_start_s)

"""Why a model's pods are not ready, in the inference server's own words.

A `caffeserve serve` whose model fails to load stays alive and answers `GET /v2/health/ready`
with 503 `{"ready": false, "error": "model 'm' failed to load: <the loader's message>"}` (or
`model 'm' is loading` while it loads). The Deployment status only counts ready pods; this module
asks the pods: it lists the EndpointSlices of the model's Service (label
`kubernetes.io/service-name`), picks up to MAX_PROBES not-ready endpoints and probes them
concurrently, each within PROBE_TIMEOUT_S, so a reconcile never waits long. The answers become
`status.EndpointHealth` for `status.with_load_errors`, which decides the condition.

The probes go out on a session of their own: the operator's API credentials never reach a pod.
backend_report.py uses the same listing, endpoint walk (`endpoint_targets`, ready ones there)
and session to ask one ready pod which backend serves.
API access: `list` on discovery.k8s.io `endpointslices` in the model's namespace. Without it
(a 403) the status stays what the Deployment says, and the operator logs that once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from caffe_operator.kube import ApiError, KubeClient
from caffe_operator.status import EndpointHealth

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PORT_NAME = "http"
HEALTH_PATH = "/v2/health/ready"
MAX_PROBES = 3
PROBE_TIMEOUT_S = 2.0
MAX_BODY_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 1024  # a pycaffe parse error can be long; a condition message should not be

_FAILED = re.compile(r"^model '.*?' failed to load: ", re.DOTALL)


@dataclass(frozen=True)
class Target:
    """One not-ready endpoint to ask."""

    endpoint: str  # "pod NAME", or "ADDRESS:PORT" when the endpoint names no pod
    url: str


def _port(slice_: Mapping[str, Any], default: int) -> int:
    ports = slice_.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") == PORT_NAME), None)
    if port is None and len(ports) == 1:
        port = ports[0].get("port")
    return int(port) if port is not None else default


def endpoint_targets(slices: Iterable[Mapping[str, Any]], service_name: str, default_port: int, *,
                     ready: bool, path: str, limit: int) -> list[Target]:
    """Up to `limit` endpoints of `service_name` whose readiness is `ready` (`conditions.ready`;
    absent means ready, as the API documents) and that are not terminating (a pod on its way out
    says nothing about the model), as URLs ending in `path`, in a stable order (by pod name) so
    that what is reported is stable too."""
    found: dict[str, Target] = {}
    for slice_ in slices:
        labels = (slice_.get("metadata") or {}).get("labels") or {}
        if labels.get(SERVICE_NAME_LABEL) != service_name:
            continue  # a client-side check too: not every API server honours the selector
        if slice_.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
            continue
        port = _port(slice_, default_port)
        for ep in slice_.get("endpoints") or []:
            conditions = ep.get("conditions") or {}
            addresses = ep.get("addresses") or []
            if (conditions.get("ready") is not False) != ready or conditions.get("terminating") or not addresses:
                continue
            address = addresses[0]
            host = f"[{address}]" if ":" in address else address
            ref = ep.get("targetRef") or {}
            name = f"pod {ref['name']}" if ref.get("kind") == "Pod" and ref.get("name") else f"{host}:{port}"
            found.setdefault(name, Target(name, f"http://{host}:{port}{path}"))
    return [found[k] for k in sorted(found)][:limit]


def not_ready_targets(slices: Iterable[Mapping[str, Any]], service_name: str, default_port: int,
                      limit: int = MAX_PROBES) -> list[Target]:
    """Up to `limit` explicitly not-ready endpoints of `service_name`, to ask for their health."""
    return endpoint_targets(slices, service_name, default_port, ready=False, path=HEALTH_PATH, limit=limit)


async def fetch(session: aiohttp.ClientSession, url: str, max_bytes: int = MAX_BODY_BYTES) -> tuple[int, bytes]:
    """(status, at most `max_bytes` of the body) of a GET; raises aiohttp/timeout/OS errors."""
    async with session.get(url, allow_redirects=False) as response:
        body = b""
        async for chunk in response.content.iter_chunked(16 * 1024):
            body += chunk
            if len(body) >= max_bytes:
                break
        return response.status, body


def classify(endpoint: str, status: int, body: bytes) -> EndpointHealth:
    """A health answer as EndpointHealth: failed (the loader's message), loading, ready, or other."""
    if status == 200:
        return EndpointHealth(endpoint, "ready")
    try:
        payload = json.loads(body)
        error = str(payload.get("error") or "") if isinstance(payload, dict) else ""
    except ValueError:
        error = ""
    error = error[:MAX_MESSAGE_CHARS]
    if _FAILED.match(error):
        return EndpointHealth(endpoint, "failed", error)
    if error.endswith("is loading"):
        return EndpointHealth(endpoint, "loading", error)
    return EndpointHealth(endpoint, "other", error or f"HTTP {status}")


class LoadErrorProbe:
    """Asks a model's not-ready pods why (see the module docstring)."""

    def __init__(self, client: KubeClient, timeout_s: float = PROBE_TIMEOUT_S, limit: int = MAX_PROBES) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.limit = limit
        self._session: aiohttp.ClientSession | None = None
        self._forbidden_logged = False

    async def slices(self, namespace: str, service_name: str,
                     logger: logging.Logger | logging.LoggerAdapter) -> list[dict[str, Any]]:
        """The EndpointSlices of `service_name`; [] when they cannot be listed (logged)."""
        try:
            return await self.client.list("EndpointSlice", namespace, f"{SERVICE_NAME_LABEL}={service_name}")
        except ApiError as e:
            if e.status == 403 and not self._forbidden_logged:
                self._forbidden_logged = True
                logger.warning(f"cannot list endpointslices ({e}): grant list on discovery.k8s.io "
                               "endpointslices to see why model pods are not ready and which backend serves")
            elif e.status != 403:
                logger.warning(f"listing the endpointslices of {namespace}/{service_name} failed: {e}")
            return []

    async def health(self, namespace: str, service_name: str, default_port: int,
                     logger: logging.Logger | logging.LoggerAdapter) -> list[EndpointHealth]:
        """What the not-ready endpoints of `service_name` answer; [] when none can be listed."""
        slices = await self.slices(namespace, service_name, logger)
        targets = not_ready_targets(slices, service_name, default_port, self.limit)
        if not targets:
            return []
        session = self.session()
        return list(await asyncio.gather(*(self._probe(session, t) for t in targets)))

    def session(self) -> aiohttp.ClientSession:
        """The probes' own HTTP session (no API credentials), shared with backend_report.py."""
        return self._open()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                headers={"User-Agent": "caffe-serving-operator", "Accept": "application/json"},
            )
        return self._session

    async def _probe(self, session: aiohttp.ClientSession, target: Target) -> EndpointHealth:
        try:
            status, body = await fetch(session, target.url)
            return classify(target.endpoint, status, body)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            return EndpointHealth(target.endpoint, "unreachable", f"{type(e).__name__}: {e}"[:200])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

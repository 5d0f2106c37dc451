"""Why a model's pods are not ready, in the inference server's own words.

A `caffeserve serve` whose model fails to load stays alive and answers `GET /v2/health/ready`
with 503 `{"ready": false, "error": "model 'm' failed to load: <the loader's message>"}` (or
`model 'm' is loading` while it loads). This module asks up to MAX_PROBES not-ready endpoints
of the model's Service (found and reached through pods.py), concurrently, each within
PROBE_TIMEOUT_S, so a reconcile never waits long. The answers become `status.EndpointHealth`
for `status.with_load_errors`, which decides the condition.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp

from caffe_operator.kube import KubeClient
from caffe_operator.pods import MAX_MESSAGE_CHARS, TIMEOUT_S, Logger, Pods, Target, endpoint_targets, fetch
from caffe_operator.status import EndpointHealth

HEALTH_PATH = "/v2/health/ready"
MAX_PROBES = 3
PROBE_TIMEOUT_S = TIMEOUT_S

_FAILED = re.compile(r"^model '.*?' failed to load: ", re.DOTALL)


def not_ready_targets(slices: Iterable[Mapping[str, Any]], service_name: str, default_port: int,
                      limit: int = MAX_PROBES) -> list[Target]:
    """Up to `limit` explicitly not-ready endpoints of `service_name`, to ask for their health."""
    return endpoint_targets(slices, service_name, default_port, ready=False, path=HEALTH_PATH, limit=limit)


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
    """Asks a model's not-ready pods why (see the module docstring); `pods` may be shared."""

    def __init__(self, client: KubeClient | None = None, timeout_s: float = PROBE_TIMEOUT_S,
                 limit: int = MAX_PROBES, *, pods: Pods | None = None) -> None:
        self.pods = pods or Pods(client, timeout_s)
        self.limit = limit

    async def health(
        self, namespace: str, service_name: str, default_port: int, logger: Logger
    ) -> list[EndpointHealth]:
        """What the not-ready endpoints of `service_name` answer; [] when none can be listed."""
        slices = await self.pods.slices(namespace, service_name, logger)
        targets = not_ready_targets(slices, service_name, default_port, self.limit)
        if not targets:
            return []
        session = self._open()
        return list(await asyncio.gather(*(self._probe(session, t) for t in targets)))

    def _open(self) -> aiohttp.ClientSession:
        return self.pods.session()

    async def _probe(self, session: aiohttp.ClientSession, target: Target) -> EndpointHealth:
        try:
            status, body = await fetch(session, target.url, tls=self.pods.tls)
            return classify(target.endpoint, status, body)
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            return EndpointHealth(target.endpoint, "unreachable", f"{type(e).__name__}: {e}"[:200])

    async def close(self) -> None:
        await self.pods.close()

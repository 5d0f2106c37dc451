"""The repository API of one pool pod, as Triton's model repository extension defines it.

  POST /v2/repository/index                 → [{"name", "version", "state", "reason"}, ...]
  POST /v2/repository/models/{m}/load       body {"parameters": {"config": "<JSON of the model's server config>"}}
  POST /v2/repository/models/{m}/unload
  GET  /v2/models/{m}                       → metadata; parameters.memory_bytes / gpu_memory_bytes: what its load took

A session of its own, without the operator's API credentials; a load may take as long as the
model takes to load (LOAD_TIMEOUT_S), the rest are quick. Errors come back as (False, message): the
operator shows them in the model's status, it never raises on what a pod says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from caffe_operator.pods import PodTLS, pod_request

LOAD_TIMEOUT_S = 600.0
TIMEOUT_S = 5.0
MAX_MESSAGE_CHARS = 1024
READY = "READY"


@dataclass(frozen=True)
class IndexEntry:
    name: str
    state: str  # READY, UNAVAILABLE, LOADING, ... (Triton's states)
    reason: str = ""


def memory_of(metadata: dict[str, Any], gpu: bool) -> int | None:
    """The memory one model took at load, from its metadata `parameters` (the server measures it:
    `memory_bytes` host RSS growth, `gpu_memory_bytes` device memory on a GPU): the device figure
    for a GPU pool, else the host figure; None when the server does not say."""
    params = metadata.get("parameters")
    if not isinstance(params, dict):
        return None
    for key in (("gpu_memory_bytes", "memory_bytes") if gpu else ("memory_bytes",)):
        value = params.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _message(status: int, body: bytes) -> str:
    try:
        doc = json.loads(body)
        text = doc.get("error") if isinstance(doc, dict) else None
    except ValueError:
        text = None
    return f"HTTP {status}: {(text or body.decode('utf-8', 'replace')).strip()[:MAX_MESSAGE_CHARS]}"


class RepositoryClient:
    """Repository calls to pool pods at `http://ADDRESS:PORT`."""

    def __init__(self, tls: PodTLS | None = None) -> None:
        self._session: aiohttp.ClientSession | None = None
        self.tls = tls  # the pool pods serve over TLS (pods.PodTLS); None: plain HTTP

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
                headers={"User-Agent": "caffe-serving-operator", "Accept": "application/json"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, url: str, body: Any, timeout_s: float = TIMEOUT_S) -> tuple[int, bytes]:
        url, extra = pod_request(self.tls, url)
        async with self.session().post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s), **extra) as r:
            return r.status, await r.read()

    async def index(self, base: str) -> list[IndexEntry] | None:
        """The pod's models and their states; None when the pod does not answer."""
        try:
            status, body = await self._post(f"{base}/v2/repository/index", {})
            if status != 200:
                return None
            return [IndexEntry(str(e.get("name")), str(e.get("state") or ""), str(e.get("reason") or ""))
                    for e in json.loads(body) if isinstance(e, dict) and e.get("name")]
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
            return None

    async def load(self, base: str, model: str, config_json: str) -> tuple[bool, str]:
        """Load (or reload) `model` with its server config; (ok, the server's message when not)."""
        try:
            status, body = await self._post(f"{base}/v2/repository/models/{model}/load",
                                            {"parameters": {"config": config_json}}, LOAD_TIMEOUT_S)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return False, f"{type(e).__name__}: {e}"
        return (True, "") if status == 200 else (False, _message(status, body))

    async def unload(self, base: str, model: str) -> tuple[bool, str]:
        try:
            status, body = await self._post(f"{base}/v2/repository/models/{model}/unload", {}, LOAD_TIMEOUT_S)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return False, f"{type(e).__name__}: {e}"
        return (True, "") if status in (200, 404) else (False, _message(status, body))

    async def memory(self, base: str, model: str, gpu: bool) -> int | None:
        """The memory `model` took on this pod, from its metadata (memory_of); None when unknown."""
        try:
            url, extra = pod_request(self.tls, f"{base}/v2/models/{model}")
            async with self.session().get(url, **extra) as r:
                if r.status != 200:
                    return None
                doc = json.loads(await r.read())
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
            return None
        return memory_of(doc, gpu) if isinstance(doc, dict) else None

"""A small asyncio Kubernetes REST client for the operator's own calls (children, status).

kopf watches and dispatches, but it has no public client for creating or patching other objects.
This one reuses kopf's login result (`kopf.ConnectionInfo`: server, CA, token or client cert),
speaks JSON and JSON merge patch, retries what is worth retrying (connection errors, 429, 5xx)
a few times, and logs in again once on 401 (service-account tokens rotate).
"""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp
import kopf

from caffe_operator.api import API_VERSION, KIND, PLURAL

# kind → (apiVersion, plural) of everything the operator reads or writes.
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("v1", "configmaps"),
    "Service": ("v1", "services"),
    "Deployment": ("apps/v1", "deployments"),
    "EndpointSlice": ("discovery.k8s.io/v1", "endpointslices"),
    "Pod": ("v1", "pods"),
    "NetworkPolicy": ("networking.k8s.io/v1", "networkpolicies"),
    "ScaledObject": ("keda.sh/v1alpha1", "scaledobjects"),
    KIND: (API_VERSION, PLURAL),
    "CaffeServingPool": (API_VERSION, "caffeservingpools"),
}


def collection_path(api_version: str, plural: str, namespace: str) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{plural}"


def object_path(kind: str, namespace: str, name: str, subresource: str | None = None) -> str:
    api_version, plural = RESOURCES[kind]
    return collection_path(api_version, plural, namespace) + f"/{name}" + (f"/{subresource}" if subresource else "")


class ApiError(Exception):
    """A non-2xx answer; `status` is the HTTP code, the message the API server's."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason


class KubeClient:
    """Authenticated JSON requests against the API server."""

    def __init__(self, login: Callable[[], kopf.ConnectionInfo | None], retries: int = 3, backoff_s: float = 0.5,
                 timeout_s: float = 30.0) -> None:
        self._login = login
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._retries = retries
        self._backoff_s = backoff_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def _open(self, fresh: bool = False) -> aiohttp.ClientSession:
        if self._session is not None and not fresh:
            return self._session
        if self._session is not None:
            await self._session.close()
        info = self._login()
        if info is None:
            raise ApiError(401, "no Kubernetes credentials (no kubeconfig and not in a pod)")
        self._info = info
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            auth = info.as_aiohttp_basic_auth()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=info.as_ssl_context()),
            headers={**info.as_http_headers(), "User-Agent": "caffe-serving-operator", "Accept": "application/json"},
            auth=auth,
            timeout=self._timeout,
        )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, body: Any = None,
                      content_type: str = "application/json") -> Any:
        session = await self._open()
        assert self._info is not None
        url = self._info.server.rstrip("/") + path
        data = None if body is None else json.dumps(body)
        relogged = False
        for attempt in range(self._retries + 1):
            try:
                async with session.request(method, url, data=data, headers={"Content-Type": content_type}) as response:
                    text = await response.text()
                    if response.status < 300:
                        return json.loads(text) if text else None
                    try:
                        payload = json.loads(text)
                        message, reason = payload.get("message", text), payload.get("reason", "")
                    except ValueError:
                        message, reason = text, ""
                    error = ApiError(response.status, message[:1000], reason)
            except (TimeoutError, aiohttp.ClientConnectionError) as e:
                error = ApiError(503, f"{method} {path}: {e!r}", "ConnectionError")
            if error.status == 401 and not relogged:
                relogged = True
                session = await self._open(fresh=True)
                continue
            if error.status in (429, 500, 502, 503, 504) and attempt < self._retries:
                await asyncio.sleep(self._backoff_s * 2**attempt)
                continue
            raise error
        raise AssertionError("unreachable")

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object at `path`, or None when it does not exist."""
        try:
            return await self.request("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        """The items of `kind` in `namespace` (matching `label_selector`, when given)."""
        api_version, plural = RESOURCES[kind]
        query = f"?{urlencode({'labelSelector': label_selector})}" if label_selector else ""
        found = await self.request("GET", collection_path(api_version, plural, namespace) + query)
        return list((found or {}).get("items") or [])

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        api_version, plural = RESOURCES[obj["kind"]]
        return await self.request("POST", collection_path(api_version, plural, obj["metadata"]["namespace"]), obj)

    async def delete(self, path: str) -> bool:
        """Delete the object at `path` (its dependents in the background); False if it was not there."""
        try:
            await self.request("DELETE", path, {"kind": "DeleteOptions", "apiVersion": "v1",
                                                "propagationPolicy": "Background"})
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, patch, content_type="application/merge-patch+json")

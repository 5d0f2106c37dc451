"""A small synchronous client for a real API server (TLS, client certificate or bearer token).

The harness, the node agent and the tests talk to the API with it; the programs under test (kopf
in the operator, the gateway, kubectl, Helm) use their own clients. Its reading methods have the
shapes of `caffe_testing.cluster.Cluster`'s (get_object, list_objects, create, patch, delete), so
`kubelet.ContainerProcess` reads ConfigMaps and Secrets through either.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def resource_path(resource: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
    """`apps/v1/deployments`, ns, name → `/apis/apps/v1/namespaces/ns/deployments/name`."""
    parts = resource.split("/")
    group_version, plural = "/".join(parts[:-1]), parts[-1]
    path = f"/api/{group_version}" if group_version == "v1" else f"/apis/{group_version}"
    if namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


class ApiError(Exception):
    """The API server answered an error (status and body)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        try:  # a Status object's message, as kubectl prints it
            self.message = str(json.loads(body).get("message", body))
        except (ValueError, AttributeError):
            self.message = body


class KubeClient:
    def __init__(self, server: str, ca_file: Path, *, cert: tuple[Path, Path] | None = None,
                 token: str | None = None) -> None:
        self.server = server.rstrip("/")
        self.ca_file = Path(ca_file)
        self.cert = cert
        self.token = token
        self._ssl = ssl.create_default_context(cafile=str(ca_file))
        if cert:
            self._ssl.load_cert_chain(str(cert[0]), str(cert[1]))

    def _open(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
              timeout: float = 15):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.server + path, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=timeout, context=self._ssl)
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace")) from None

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                timeout: float = 15) -> Any:
        with self._open(method, path, body, content_type, timeout) as response:
            return json.loads(response.read() or b"null")

    def get_object(self, resource: str, namespace: str | None, name: str) -> dict | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", resource_path(resource, namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def list_objects(self, resource: str, namespace: str | None = None, **query: str) -> list[dict]:
        return self.list(resource, namespace, **query)["items"]

    def list(self, resource: str, namespace: str | None = None, **query: str) -> dict:
        qs = ("?" + urllib.parse.urlencode(query)) if query else ""
        return self.request("GET", resource_path(resource, namespace) + qs)

    def create(self, resource: str, namespace: str | None, body: dict, sub: str | None = None,
               name: str | None = None) -> dict:
        path = resource_path(resource, namespace, name, sub) if sub else resource_path(resource, namespace)
        return self.request("POST", path, body)

    def patch(self, resource: str, namespace: str | None, name: str, body: Any, sub: str | None = None,
              kind: str | None = None) -> dict:
        kind = kind or ("application/json-patch+json" if isinstance(body, list) else "application/merge-patch+json")
        return self.request("PATCH", resource_path(resource, namespace, name, sub), body, kind)

    def delete(self, resource: str, namespace: str | None, name: str, body: dict | None = None) -> dict:
        return self.request("DELETE", resource_path(resource, namespace, name), body)

    def watch(self, resource: str, namespace: str | None, resource_version: str, timeout_s: int = 60,
              **query: str) -> Iterator[dict]:
        """The events of one watch request ({"type", "object"}), until the server ends it. A 410 is
        raised as ApiError(410) (in the stream, as an ERROR event, or as the answer)."""
        q = dict(query, watch="true", resourceVersion=resource_version, timeoutSeconds=str(timeout_s),
                 allowWatchBookmarks="true")
        path = resource_path(resource, namespace) + "?" + urllib.parse.urlencode(q)
        with self._open("GET", path, timeout=timeout_s + 15) as response:
            for line in response:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise ApiError(int(status.get("code") or 500), json.dumps(status))
                yield event

    @staticmethod
    def wait_for(fn: Callable[[], T], timeout: float = 30.0, interval: float = 0.2, what: str = "") -> T:
        """Poll `fn` until it returns something truthy (returned) or raise after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = fn()
            except AssertionError as e:
                last = e
            else:
                if last:
                    return last
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}: last={last!r}")
            time.sleep(interval)

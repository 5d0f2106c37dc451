"""Asking a model's pods, the operator's one way to do it: which pods, and how to reach them.

The Deployment status only counts ready pods; what a pod's server says is better: why its model
failed to load (load_errors.py asks the not-ready pods' `/v2/health/ready`), which backend
serves (backend_report.py asks one ready pod's model metadata). Both go through `Pods`:
- which pods: the EndpointSlices of the model's Service (label `kubernetes.io/service-name`),
  read with the endpoint rules of inference_server/slices.py (the same the gateway follows), and
  walked by `endpoint_targets` in a stable order (by pod name), so that what is reported is stable;
- how: plain GETs on a session of their own, within TIMEOUT_S, bodies read up to a cap: the
  operator's API credentials never reach a pod. Where the pods serve over TLS (the chart's podTLS),
  over https, each pod's certificate checked against the CA and the one name every pod's carries
  (`PodTLS`; pool pods' repository calls go the same way, repository.py).

API access: `list` on discovery.k8s.io `endpointslices` in the model's namespace. Without it
(a 403) the status stays what the Deployment says, and the operator logs that once. The GETs go
to the pods' `http` port (8080): a NetworkPolicy on model pods must let the operator in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from caffe_http.tls import POD_SERVER_NAME, ClientTLS
from caffe_operator.kube import ApiError, KubeClient
from inference_server.slices import SERVICE_NAME_LABEL, slice_endpoints, slice_labels

TIMEOUT_S = 2.0
MAX_BODY_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 1024  # what a pod says is cut to this before it reaches the status (pycaffe errors can be long)

Logger = logging.Logger | logging.LoggerAdapter[Any]


class PodTLS:
    """How the operator reaches pods that serve over TLS (`caffeserve serve --tls-dir`): https, the pod's
    certificate checked against `ca_file` (re-read when it changes) and `server_name`, not the pod's address."""

    def __init__(self, ca_file: str, server_name: str = POD_SERVER_NAME) -> None:
        self.client = ClientTLS(ca_file, server_name)


def pod_request(tls: PodTLS | None, url: str) -> tuple[str, dict[str, Any]]:
    """`url` (http://ADDRESS:PORT/...) as the operator asks it, and aiohttp's extra arguments for it."""
    if tls is None:
        return url, {}
    return ("https://" + url.removeprefix("http://"),
            {"ssl": tls.client.context(), "server_hostname": tls.client.server_name})


@dataclass(frozen=True)
class Target:
    """One endpoint to ask."""

    endpoint: str  # "pod NAME", or "ADDRESS:PORT" when the endpoint names no pod
    url: str


def endpoint_targets(slices: Iterable[Mapping[str, Any]], service_name: str, default_port: int, *,
                     ready: bool, path: str, limit: int) -> list[Target]:
    """Up to `limit` endpoints of `service_name` whose readiness is `ready` and that are not
    terminating (a pod on its way out says nothing about the model), as URLs ending in `path`,
    in a stable order (by pod name)."""
    found: dict[str, Target] = {}
    for slice_ in slices:
        if slice_labels(slice_).get(SERVICE_NAME_LABEL) != service_name:
            continue  # a client-side check too: not every API server honours the selector
        for ep in slice_endpoints(slice_, default_port):
            if ep.ready != ready or ep.terminating:
                continue
            host = f"[{ep.address}]" if ":" in ep.address else ep.address
            name = f"pod {ep.pod}" if ep.pod else f"{host}:{ep.port}"
            found.setdefault(name, Target(name, f"http://{host}:{ep.port}{path}"))
    return [found[k] for k in sorted(found)][:limit]


async def fetch(session: aiohttp.ClientSession, url: str, max_bytes: int = MAX_BODY_BYTES,
                tls: PodTLS | None = None) -> tuple[int, bytes]:
    """(status, at most `max_bytes` of the body) of a GET; raises aiohttp/timeout/OS errors."""
    url, extra = pod_request(tls, url)
    async with session.get(url, allow_redirects=False, **extra) as response:
        body = b""
        async for chunk in response.content.iter_chunked(16 * 1024):
            body += chunk
            if len(body) >= max_bytes:
                break
        return response.status, body


class Pods:
    """The EndpointSlice listing and the credential-free session (see the module docstring)."""

    def __init__(self, client: KubeClient | None, timeout_s: float = TIMEOUT_S, tls: PodTLS | None = None) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.tls = tls  # None: the pods serve plain HTTP
        self._session: aiohttp.ClientSession | None = None
        self._forbidden_logged = False

    async def slices(self, namespace: str, service_name: str, logger: Logger) -> list[dict[str, Any]]:
        """The EndpointSlices of `service_name`; [] when they cannot be listed (logged)."""
        assert self.client is not None
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

    def session(self) -> aiohttp.ClientSession:
        """The GETs' own HTTP session (no API credentials)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                headers={"User-Agent": "caffe-serving-operator", "Accept": "application/json"},
            )
        return self._session

    async def get(self, url: str, max_bytes: int = MAX_BODY_BYTES) -> tuple[int, bytes]:
        """`fetch` on the session."""
        return await fetch(self.session(), url, max_bytes, self.tls)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

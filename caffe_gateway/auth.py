"""Who may call the gateway: bearer tokens, and the admin calls that change state.

- Authentication (`--auth tokens|tokenreview`): REST `Authorization: Bearer T`, gRPC metadata
  `authorization: Bearer T`. `tokens` reads a static token file in the API server's own format
  (`token,user,uid,"group1,group2"` per line; a mounted Secret, re-read when it changes);
  `tokenreview` asks the API server (TokenReview), so a workload's ServiceAccount token works.
  No token, or one nobody knows: 401 / UNAUTHENTICATED. A known caller outside `--auth-users` /
  `--auth-groups` (when given): 403 / PERMISSION_DENIED.
- Admin calls (`ADMIN_PATHS`, `ADMIN_METHODS`: repository load/unload, log and trace settings) are
  off unless `--admin-api` is on, as Triton's `--http-restricted-api` and `--grpc-restricted-protocol`;
  on, they need a caller in `--admin-users` / `--admin-groups`, a credential apart from the one
  that runs models. Off or not an admin: 403 / PERMISSION_DENIED.
- Always open: the health endpoints the kubelet probes (and gRPC ServerLive/ServerReady), and
  `/metrics` (Prometheus scrapes it without a token; it carries counts, not data).

Every refusal is counted in `caffeserve_gateway_auth_refusals_total{protocol,code}`.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import logging
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from caffe_http.server import Request, Response

log = logging.getLogger(__name__)

# Paths and RPCs that change the gateway's or the servers' state: the "admin" category. Matched by
# prefix, so that routes added later under these (the repository's per-model load/unload) are covered.
ADMIN_PATHS = ("/v2/repository/models/", "/v2/logging", "/v2/trace")
ADMIN_METHODS = frozenset({"RepositoryModelLoad", "RepositoryModelUnload", "LogSettings", "TraceSetting"})
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics"})
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})

# How long a TokenReview answer is reused. Short, because the API server's answer can change (a
# token revoked when its pod or ServiceAccount is deleted); long enough that a client's steady
# stream of calls costs the API server one review per token per interval, not one per request.
REVIEW_TTL_S = 10.0
DENIED_TTL_S = 2.0  # a token refused: remembered briefly, so a client retrying in a loop does not flood the API
REVIEW_CACHE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    groups: tuple[str, ...] = ()


class Denied(Exception):
    """A refusal: `status` 401 (who are you?) or 403 (not allowed), with a message for the caller."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def bearer(value: str | None) -> str:
    """The token of an `Authorization: Bearer T` value; Denied 401 when there is none."""
    if not value:
        raise Denied(401, "no credentials: send Authorization: Bearer <token>")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Denied(401, "unsupported credentials: send Authorization: Bearer <token>")
    return token.strip()


class StaticTokens:
    """A token file in the API server's `--token-auth-file` format, re-read when it changes (poll of its stat)."""

    def __init__(self, path: str | Path, poll_s: float = 2.0):
        self.path = Path(path)
        self.poll_s = poll_s
        self._stamp: tuple | None = None
        self._next_check = 0.0
        self.tokens: dict[str, Identity] = {}
        self._load()  # a file that is missing or malformed at start is a configuration error

    def _stat(self) -> tuple:
        st = os.stat(self.path)
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def _load(self) -> None:
        stamp = self._stat()
        tokens: dict[str, Identity] = {}
        for n, row in enumerate(csv.reader(io.StringIO(self.path.read_text())), 1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 2 or not row[0] or not row[1]:
                raise ValueError(f"{self.path}:{n}: expected token,user[,uid[,\"group1,group2\"]]")
            groups = tuple(g.strip() for g in row[3].split(",") if g.strip()) if len(row) > 3 else ()
            tokens[row[0].strip()] = Identity(row[1].strip(), groups)
        self.tokens, self._stamp = tokens, stamp

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.poll_s
        try:
            if self._stat() != self._stamp:
                self._load()
                log.info("auth: reloaded %d tokens from %s", len(self.tokens), self.path)
        except (OSError, ValueError) as e:
            log.warning("auth: %s changed but does not load (%s); keeping the previous tokens", self.path, e)

    async def identify(self, token: str) -> Identity:
        self._maybe_reload()
        who = self.tokens.get(token)
        if who is None:
            raise Denied(401, "invalid token")
        return who

    async def close(self) -> None:
        pass


class TokenReviewer:
    """Ask the API server who a token is (authentication.k8s.io/v1 TokenReview), answers cached briefly.

    The gateway's own identity needs `create` on tokenreviews (the ClusterRole system:auth-delegator).
    `audiences`: the audiences the token must be for (empty: the API server's own).
    """

    def __init__(self, kube, audiences: tuple[str, ...] = (), ttl_s: float = REVIEW_TTL_S,
                 denied_ttl_s: float = DENIED_TTL_S):
        self.kube = kube  # discovery.KubeConfig
        self.audiences = audiences
        self.ttl_s, self.denied_ttl_s = ttl_s, denied_ttl_s
        self._cache: dict[bytes, tuple[float, Identity | Denied]] = {}
        self._pending: dict[bytes, asyncio.Future] = {}
        self._session: Any = None  # an aiohttp.ClientSession once a token is reviewed (aiohttp imported then)

    async def identify(self, token: str) -> Identity:
        key = hashlib.sha256(token.encode()).digest()  # the cache holds no token itself
        now = time.monotonic()
        hit: tuple[float, Identity | Denied] | None = self._cache.get(key)
        if hit is None or hit[0] <= now:
            pending = self._pending.get(key)
            if pending is None:  # one review per token at a time: concurrent callers share it
                pending = self._pending[key] = asyncio.ensure_future(self._review(key, token))
                pending.add_done_callback(lambda _f: self._pending.pop(key, None))
            hit = await asyncio.shield(pending)
        assert hit is not None
        answer = hit[1]
        if isinstance(answer, Denied):
            raise answer
        return answer

    async def _review(self, key: bytes, token: str) -> tuple[float, Identity | Denied]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        spec: dict = {"token": token}
        if self.audiences:
            spec["audiences"] = list(self.audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        try:
            async with self._session.post(f"{self.kube.server}/apis/authentication.k8s.io/v1/tokenreviews",
                                          data=orjson.dumps(body), ssl=self.kube.ssl_context(),
                                          headers={**self.kube.headers(), "Content-Type": "application/json"}) as r:
                data = await r.read()
                if r.status != 201 and r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
        except Exception as e:  # the API server cannot answer: refuse now, ask again on the next call (no cache)
            log.warning("auth: TokenReview failed: %s", e)
            return 0.0, Denied(401, "the token cannot be checked now (TokenReview failed); retry")
        status = orjson.loads(data).get("status") or {}
        now = time.monotonic()
        if not status.get("authenticated"):
            answer: tuple[float, Identity | Denied] = (
                now + self.denied_ttl_s, Denied(401, f"invalid token: {status.get('error') or 'not authenticated'}"))
        else:
            user = status.get("user") or {}
            answer = now + self.ttl_s, Identity(user.get("username", ""), tuple(user.get("groups") or ()))
        if len(self._cache) >= REVIEW_CACHE_MAX:
            self._cache.clear()  # many distinct tokens (a scan): start over rather than grow
        self._cache[key] = answer
        return answer

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass(frozen=True)
class Allowed:
    """A caller is allowed when the lists are both empty, or it is one of `users` or in one of `groups`."""

    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    @property
    def anyone(self) -> bool:
        return not self.users and not self.groups

    def __contains__(self, who: Identity) -> bool:
        return self.anyone or who.user in self.users or not self.groups.isdisjoint(who.groups)


class Guard:
    """The one decision for REST and gRPC: `check(authorization, admin)` returns or raises Denied."""

    def __init__(self, identity: StaticTokens | TokenReviewer | None = None, callers: Allowed = Allowed(),
                 admin_api: bool = False, admins: Allowed = Allowed()):
        if admin_api and (identity is None or admins.anyone):
            raise ValueError("--admin-api needs authentication (--auth) and --admin-users or --admin-groups")
        self.identity = identity  # None: no authentication (only the admin calls are guarded)
        self.callers, self.admin_api, self.admins = callers, admin_api, admins
        self.refusals: dict[tuple[str, int], int] = {}

    @property
    def authenticates(self) -> bool:
        return self.identity is not None

    async def check(self, authorization: str | None, admin: bool) -> Identity | None:
        if admin and not self.admin_api:
            raise Denied(403, "the admin API is off on this gateway (--admin-api)")
        if self.identity is None:
            return None
        who = await self.identity.identify(bearer(authorization))
        if admin:
            if who not in self.admins:
                raise Denied(403, f"'{who.user}' may not call the admin API")
        elif who not in self.callers:
            raise Denied(403, f"'{who.user}' may not call this gateway")
        return who

    async def close(self) -> None:
        if self.identity is not None:
            await self.identity.close()

    def count(self, protocol: str, status: int) -> None:
        key = (protocol, status)
        self.refusals[key] = self.refusals.get(key, 0) + 1

    def collect(self):
        """The refusals as a Prometheus counter family (the gateway's registry calls this at scrape)."""
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("caffeserve_gateway_auth_refusals",
                                     "Calls refused by authentication (401/UNAUTHENTICATED) or authorization "
                                     "(403/PERMISSION_DENIED), by protocol.", labels=["protocol", "code"])
        for (protocol, status), n in sorted(self.refusals.items()):
            family.add_metric([protocol, str(status)], n)
        return [family]


def is_admin_path(path: str) -> bool:
    return path.startswith(ADMIN_PATHS)


def with_guard(handler, guard: Guard):
    """The REST handler behind the guard. Without authentication only admin paths pay anything (a prefix test)."""

    async def refused(e: Denied) -> Response:
        guard.count("http", e.status)
        headers = {"WWW-Authenticate": 'Bearer realm="caffe-serving"'} if e.status == 401 else {}
        return Response(e.status, orjson.dumps({"error": e.message}), headers=headers)

    if not guard.authenticates:
        async def admin_call(req: Request) -> Response:
            try:
                await guard.check(None, True)
            except Denied as e:
                return await refused(e)
            return await handler(req)

        def admin_only(req: Request) -> Awaitable[Response]:
            # a plain function handing back the handler's own coroutine: no extra coroutine per request
            return admin_call(req) if req.path.startswith(ADMIN_PATHS) else handler(req)

        return admin_only

    async def guarded(req: Request) -> Response:
        path = req.path
        if path not in OPEN_PATHS:
            try:
                await guard.check(req.headers.get("authorization"), path.startswith(ADMIN_PATHS))
            except Denied as e:
                return await refused(e)
        return await handler(req)

    return guarded

"""API faults for the operator tests: the emulator's own request handler, made to fail on cue.

`FaultyApiServer` is `caffe_testing.cluster.ApiServer` (kmock's emulator) with error injection in
its handler, rather than a proxy in front of it: the same real HTTP reaches the operator, and the
injection sees each request already parsed (its verb, resource and watch flag). While `start(…)`'s
window lasts, a `rate` share of the operator's requests (kopf's and its own client's User-Agents; kubectl and the
test's own client are left alone) fail before the emulator applies them: half 429 with
`Retry-After: 1`, half 500, each with a Kubernetes `Status` body; and one watch is cut mid-stream
(its connection aborted a second after it began). Every operator request is recorded, so that a
test can count them (a hot loop shows as a rate).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import aiohttp.web
import kmock

from caffe_testing.cluster import ApiServer


@dataclass(frozen=True)
class Seen:
    at: float  # time.monotonic()
    method: str
    path: str
    watch: bool
    injected: int | None  # the status injected, or None if served


class FaultyApiServer(ApiServer):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fault_until = 0.0
        self.fault_rate = 0.0
        self.drop_watches = 0
        self.dropped_watches = 0
        self.seen: list[Seen] = []
        self._rng = random.Random(15)

    def start_faults(self, seconds: float, rate: float = 0.3, drop_watches: int = 1) -> None:
        self.fault_until = time.monotonic() + seconds
        self.fault_rate = rate
        self.drop_watches = drop_watches

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        agent = next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "")
        if not agent.startswith(("kopf", "caffe-serving-operator")):
            return await super()._handle(request)
        now = time.monotonic()
        watch = request.action == kmock.action.WATCH
        method, path = str(request.method).rsplit(".", 1)[-1].upper(), request.url.path
        if now < self.fault_until:
            if watch and self.dropped_watches < self.drop_watches:
                self.dropped_watches += 1
                raw = request._raw_request
                if raw is not None and raw.transport is not None:
                    asyncio.get_running_loop().call_later(1.0, raw.transport.abort)
            elif self._rng.random() < self.fault_rate:
                status = 429 if self._rng.random() < 0.5 else 500
                self.seen.append(Seen(now, method, path, watch, status))
                reason = "TooManyRequests" if status == 429 else "InternalError"
                headers = {"Retry-After": "1"} if status == 429 else {}
                return aiohttp.web.json_response(
                    {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": status,
                     "message": f"injected fault: {reason}"}, status=status, headers=headers)
        self.seen.append(Seen(now, method, path, watch, None))
        return await super()._handle(request)

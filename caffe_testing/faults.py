"""API faults for the operator tests: the emulator's own request handler, made to fail on cue.

`FaultyApiServer` is `caffe_testing.cluster.ApiServer` (kmock's emulator) with error injection in
its handler, rather than a proxy in front of it: the same real HTTP reaches the operator, and the
injection sees each request already parsed (its verb, resource and watch flag). While `start_faults`'s
window lasts, a `rate` share of the operator's requests (kopf's and its own client's User-Agents; kubectl and the
test's own client are left alone) fail before the emulator applies them: half 429 with
`Retry-After: 1`, half 500, each with a Kubernetes `Status` body; and one watch is cut mid-stream
(its connection aborted). Every operator request is recorded, so that a
test can count them (a hot loop shows as a rate). The cut watch is one already open when the faults
begin (so that there is one whatever the operator's timing), aborted at the TCP level.
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
        self.watches: list[tuple[str, aiohttp.web.BaseRequest]] = []  # the operator's watch requests: (path, request)
        self.cut: list[str] = []  # the paths of the watches cut
        self.open_at_start: list[str] = []
        self._rng = random.Random(15)

    def start_faults(self, seconds: float, rate: float = 0.3, drop_watches: int = 1) -> None:
        """Faults for `seconds`; `drop_watches` watches are cut, the first one now (one that is
        open, the CaffeModelServices' if it is), the others as they are made during the window."""
        self.fault_until = time.monotonic() + seconds
        self.fault_rate = rate
        self.drop_watches = drop_watches
        open_ = [(p, raw) for p, raw in self.watches if raw.transport is not None and not raw.transport.is_closing()]
        open_.sort(key=lambda w: "caffemodelservices" not in w[0])
        self.open_at_start = [p for p, _ in open_]
        if open_ and self.dropped_watches < self.drop_watches:
            self._cut(*open_[0], after_s=0.0)

    def _cut(self, path: str, raw, after_s: float) -> None:
        self.dropped_watches += 1
        self.cut.append(path)
        asyncio.get_running_loop().call_later(after_s, raw.transport.abort)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        agent = next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "")
        if not agent.startswith(("kopf", "caffe-serving-operator")):
            return await super()._handle(request)
        now = time.monotonic()
        watch = request.action == kmock.action.WATCH
        method, path = str(request.method).rsplit(".", 1)[-1].upper(), request.url.path
        raw = request._raw_request
        if watch and raw is not None and raw.transport is not None:
            self.watches = [w for w in self.watches if not w[1].transport or not w[1].transport.is_closing()]
            self.watches.append((path, raw))
        if now < self.fault_until:
            if watch and self.dropped_watches < self.drop_watches and raw is not None and raw.transport is not None:
                self._cut(path, raw, after_s=1.0)
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

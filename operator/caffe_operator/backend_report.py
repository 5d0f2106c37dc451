"""Which backend serves a model and why, in the server's own words, for `status.backend`.

Each `caffeserve serve` decides at load time (runtime.backend: pycaffe, onnxruntime, or auto:
ONNX Runtime where the converted graph passes the parity check against pycaffe) and says so in
its model metadata, `GET /v2/models/NAME` → `parameters.backend`, `parameters.backend_reason`
and, where the parity check ran, `parameters.parity_max_abs_diff`. The operator asks one ready
endpoint of the model's Service (the first by pod name, so the choice is stable), found through
its EndpointSlices and asked on the credential-free session (pods.py, as load_errors.py does),
and writes what it answers to `status.backend`. During a rollout
the pods may disagree; the status says what the asked pod says.

It does not ask on every reconcile: `needs_probe` (pure) asks again only when there is no answer
for the current pod template (its config hash) and CR generation, when the answer was given
during a rollout and the pods have changed since, or, after a failed ask, once the ready pods
change or RETRY_FAILED_S has passed, or, while the pod's `auto` check runs beside serving (it serves
with pycaffe and may switch to onnxruntime), every RECHECK_CHECKING_S. A steady model costs nothing.

API access: the `list` on discovery.k8s.io endpointslices that pods.py needs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from caffe_operator.pods import MAX_MESSAGE_CHARS, Pods, Target, endpoint_targets

MAX_METADATA_BYTES = 256 * 1024  # model metadata carries the batching curve; larger than a health answer
RETRY_FAILED_S = 60.0
# A pod with `auto` serves with pycaffe while its onnxruntime check runs beside serving (parameters.backend_check
# "running"); then it may switch. Its answer is asked again this often until the check has ended.
RECHECK_CHECKING_S = 15.0


@dataclass(frozen=True)
class BackendReport:
    """What one pod said about its backend."""

    name: str
    reason: str
    max_abs_diff: float | None = None
    checking: bool = False  # `auto`'s onnxruntime check still runs on the pod: the answer may change

    def as_status(self) -> dict[str, Any]:
        """`status.backend` (camelCase, as the CRD's schema has it)."""
        out: dict[str, Any] = {"name": self.name, "reason": self.reason}
        if self.max_abs_diff is not None:
            out["maxAbsDiff"] = self.max_abs_diff
        return out


@dataclass(frozen=True)
class Answer:
    """The last ask for one model: what was learnt (or why nothing was), and under which state."""

    fingerprint: tuple[str | None, int | None]  # (pod template config hash, CR generation)
    report: BackendReport | None
    settled: bool  # asked while every replica ran the current template (Ready=True)
    ready_replicas: int
    asked_at: float  # a monotonic clock's reading
    error: str = ""


def needs_probe(cached: Answer | None, fingerprint: tuple[str | None, int | None], *, settled: bool,
                ready_replicas: int, now: float, retry_s: float = RETRY_FAILED_S) -> str | None:
    """Why a ready pod should be asked now, or None when the cached answer still holds."""
    if ready_replicas <= 0:
        return None  # no ready pod to ask; the last answer stays in the status
    if cached is None:
        return "no answer yet"
    if cached.fingerprint != fingerprint:
        return "the pod template or the spec changed"
    if cached.report is None:
        if cached.ready_replicas != ready_replicas:
            return "the ready pods changed since the last failed ask"
        if now - cached.asked_at >= retry_s:
            return f"the last ask failed {now - cached.asked_at:.0f} s ago"
        return None
    if not cached.settled:
        if settled:
            return "the rollout finished"
        if cached.ready_replicas != ready_replicas:
            return "the ready pods changed during the rollout"
    if cached.report.checking and now - cached.asked_at >= RECHECK_CHECKING_S:
        return "the pod's onnxruntime check was still running"
    return None


def ready_target(slices: Iterable[Mapping[str, Any]], service_name: str, default_port: int,
                 model_name: str) -> Target | None:
    """The ready endpoint to ask (the first by pod name), as its model metadata URL; None if none."""
    found = endpoint_targets(slices, service_name, default_port, ready=True,
                             path=f"/v2/models/{quote(model_name, safe='')}", limit=1)
    return found[0] if found else None


def parse_metadata(status: int, body: bytes) -> BackendReport | str:
    """The backend a model metadata answer names, or why it names none."""
    if status != 200:
        try:
            error = json.loads(body).get("error")
        except (ValueError, AttributeError):
            error = None
        return f"HTTP {status}" + (f": {str(error)[:200]}" if error else "")
    try:
        payload = json.loads(body)
    except ValueError:
        return "the model metadata is not JSON"
    params = payload.get("parameters") if isinstance(payload, dict) else None
    name = params.get("backend") if isinstance(params, dict) else None
    if not isinstance(params, dict) or not isinstance(name, str) or not name:
        return "the model metadata has no parameters.backend (a server older than the backend choice?)"
    reason = params.get("backend_reason")
    diff = params.get("parity_max_abs_diff")
    if isinstance(diff, bool) or not isinstance(diff, (int, float)) or not math.isfinite(diff):
        diff = None
    return BackendReport(name[:64], str(reason or "")[:MAX_MESSAGE_CHARS], None if diff is None else float(diff),
                         params.get("backend_check") == "running")


class BackendProbe:
    """Asks one ready pod which backend serves; remembers the answer per model (see the docstring)."""

    def __init__(self, pods: Pods, retry_s: float = RETRY_FAILED_S) -> None:
        self.pods = pods
        self.retry_s = retry_s
        self.answers: dict[tuple[str, str], Answer] = {}

    def forget(self, key: tuple[str, str]) -> None:
        self.answers.pop(key, None)

    def checking(self, key: tuple[str, str]) -> bool:
        """Whether the last answer came while `auto`'s check ran (ask again in RECHECK_CHECKING_S)."""
        answer = self.answers.get(key)
        return answer is not None and answer.report is not None and answer.report.checking

    async def report(self, key: tuple[str, str], service_name: str, port: int, *,
                     fingerprint: tuple[str | None, int | None], settled: bool, ready_replicas: int,
                     logger: logging.Logger | logging.LoggerAdapter[Any]) -> BackendReport | None:
        """A fresh report for model `key` (namespace, name) when one is due and a pod answers; else None
        (the status keeps what it says)."""
        now = asyncio.get_running_loop().time()
        cached = self.answers.get(key)
        why = needs_probe(cached, fingerprint, settled=settled, ready_replicas=ready_replicas, now=now,
                          retry_s=self.retry_s)
        if why is None:
            return None
        namespace, name = key
        slices = await self.pods.slices(namespace, service_name, logger)
        target = ready_target(slices, service_name, port, name)
        if target is None:
            result: BackendReport | str = "no ready endpoint is listed in the Service's EndpointSlices"
        else:
            try:
                status, body = await self.pods.get(target.url, MAX_METADATA_BYTES)
                result = parse_metadata(status, body)
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                result = f"{type(e).__name__}: {e}"[:200]
        if isinstance(result, BackendReport):
            self.answers[key] = Answer(fingerprint, result, settled, ready_replicas, now)
            return result
        if cached is None or cached.error != result:
            asked = f"{target.endpoint}'s model metadata" if target else "a ready pod"
            logger.info(f"cannot tell which backend serves {namespace}/{name} ({why}): asked {asked}: {result}")
        self.answers[key] = Answer(fingerprint, None, settled, ready_replicas, now, result)
        return None

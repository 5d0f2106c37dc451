"""Why a model's files did not arrive: the fetch init containers' own last words.

`source.url` and `source.s3` models download their files in init containers (`caffeserve fetch`,
one per file) before the server starts: a wrong sha256 or a missing object never reaches the
server, so its `/v2/health/ready` cannot tell (load_errors.py). The init containers end with
`fetch: <why>` on stderr, which the kubelet keeps as the container's termination message
(`terminationMessagePolicy: FallbackToLogsOnError`, manifests.py); this module reads it from the
model's pods (`list` on pods in the model's namespace) and the reconciler turns it into
`Ready=False, reason ModelFetchFailed` with that message and one Warning event.

The same list shows pods the scheduler could not place (no node with enough free
`nvidia.com/gpu`, a nodeSelector no node matches, ...): their `PodScheduled` condition is False
with reason Unschedulable and the scheduler's own message, which becomes `Ready=False, reason
Unschedulable` (`unschedulable`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from caffe_operator.kube import ApiError, KubeClient
from caffe_operator.pods import MAX_MESSAGE_CHARS, Logger

MODEL_FETCH_FAILED = "ModelFetchFailed"
UNSCHEDULABLE = "Unschedulable"
FETCH_PREFIX = "fetch-"
MAX_REPORTED = 2


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # the error is the last line; retries ("attempt 1 failed ...; retrying") come before it
    return lines[-1] if lines else ""


def fetch_failures(pods: Iterable[Mapping[str, Any]]) -> list[str]:
    """One message per pod whose fetch init container last ended in failure, by pod name."""
    out = []
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name") or ""):
        name = (pod.get("metadata") or {}).get("name") or "?"
        for st in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if not str(st.get("name", "")).startswith(FETCH_PREFIX):
                continue
            term = ((st.get("state") or {}).get("terminated") or (st.get("lastState") or {}).get("terminated"))
            if not term or int(term.get("exitCode") or 0) == 0:
                continue
            why = _last_line(str(term.get("message") or "")) or str(term.get("reason") or "")
            why = why or f"exit code {term.get('exitCode')}"
            out.append(f"pod {name}: init container {st['name']} failed: {why}"[:MAX_MESSAGE_CHARS])
            break  # one per pod: the first file that failed
    return out


def unschedulable(pods: Iterable[Mapping[str, Any]]) -> list[str]:
    """One message per pod the scheduler could not place, in its words (`0/4 nodes are available: ...`)."""
    out = []
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name") or ""):
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == UNSCHEDULABLE:
                name = (pod.get("metadata") or {}).get("name") or "?"
                out.append(f"pod {name}: {c.get('message') or 'no node fits'}"[:MAX_MESSAGE_CHARS])
    return out


def failure_message(failures: list[str]) -> str:
    shown = "; ".join(failures[:MAX_REPORTED])
    more = len(failures) - MAX_REPORTED
    return shown + (f" (and {more} more pod(s))" if more > 0 else "")


class FetchErrorProbe:
    """Lists a model's pods for failed fetch init containers (see the module docstring)."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self._forbidden_logged = False

    async def failures(self, namespace: str, selector: str, logger: Logger) -> list[str]:
        return fetch_failures(await self.pods(namespace, selector, logger))

    async def pods(self, namespace: str, selector: str, logger: Logger) -> list[Mapping[str, Any]]:
        """The model's pods ([] when they cannot be listed; a 403 is logged once)."""
        try:
            pods = await self.client.list("Pod", namespace, selector)
        except ApiError as e:
            if e.status == 403 and not self._forbidden_logged:
                self._forbidden_logged = True
                logger.warning(f"cannot list pods ({e}): grant list on pods to see why model files fail to download")
            elif e.status != 403:
                logger.warning(f"listing the pods of {namespace}/{selector} failed: {e}")
            return []
        return pods

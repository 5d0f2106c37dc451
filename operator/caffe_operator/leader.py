"""One operator reconciles at a time: leader election on a coordination.k8s.io Lease, as client-go's.

Why not kopf's peering: peering pauses an operator only for a peer of higher priority, and two
peers of the same priority both freeze ("the cluster becomes not served"); giving replicas of one
Deployment distinct priorities makes a restarted pod preempt the one working. A Lease gives the
usual contract: the holder renews every RETRY_PERIOD_S; a candidate takes the Lease once the
holder has not renewed for LEASE_DURATION_S (measured on the candidate's own clock from when it
last saw the record change, so clocks need not agree); a holder that cannot renew within
RENEW_DEADLINE_S stops reconciling (the process exits and restarts as a candidate) before anyone
else may take over. On SIGTERM the holder releases the Lease once kopf has stopped (its handlers
done), so a rollout hands over within kopf's shutdown plus a retry period, not a lease duration.
Writes are compare-and-swap on resourceVersion: two candidates that race get one 200 and one 409.

Hand-over bounds (docs/kubernetes.md has the measured figures): a leader that is killed outright,
LEASE_DURATION_S + RETRY_PERIOD_S at most; one that stops cleanly, kopf's shutdown + RETRY_PERIOD_S.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import Any

from caffe_operator.kube import ApiError, KubeClient

log = logging.getLogger(__name__)

LEASE_DURATION_S = 15  # client-go's defaults (kube-controller-manager, kube-scheduler)
RENEW_DEADLINE_S = 10
RETRY_PERIOD_S = 2


def _now_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    """Acquire, hold and release the Lease `namespace/name` as `identity` (the pod's name)."""

    def __init__(self, client: KubeClient, namespace: str, name: str, identity: str,
                 lease_duration_s: float = LEASE_DURATION_S, renew_deadline_s: float = RENEW_DEADLINE_S,
                 retry_period_s: float = RETRY_PERIOD_S) -> None:
        self.client = client
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration_s, self.renew_deadline_s, self.retry_period_s = (
            lease_duration_s, renew_deadline_s, retry_period_s)
        self._seen: tuple[Any, ...] | None = None  # the holder's record as last seen ...
        self._seen_at = 0.0  # ... and when (monotonic) it last changed
        self.leading = False

    def _spec(self, transitions: int, acquired: str) -> dict[str, Any]:
        return {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.lease_duration_s),
                "acquireTime": acquired, "renewTime": _now_micro(), "leaseTransitions": transitions}

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this process holds the Lease afterwards."""
        lease = await self.client.get(self.path)
        if lease is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(0, _now_micro())}
            try:
                await self.client.request("POST", self.path.rsplit("/", 1)[0], body)
            except ApiError as e:
                if e.status == 409:  # another candidate created it first
                    return False
                raise
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        now = time.monotonic()
        if record != self._seen:
            self._seen, self._seen_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration_s)
        if holder and holder != self.identity and now < self._seen_at + duration:
            return False  # held by another, and renewed recently enough
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            new_spec = self._spec(transitions, spec.get("acquireTime") or _now_micro())
        else:
            new_spec = self._spec(transitions + 1, _now_micro())
        lease["spec"] = new_spec  # metadata.resourceVersion stays: a concurrent writer makes this 409
        try:
            await self.client.request("PUT", self.path, lease)
        except ApiError as e:
            if e.status == 409:
                return False
            raise
        if holder != self.identity:
            log.info("leader election: %s took the Lease %s/%s from %r", self.identity, self.namespace, self.name,
                     holder or "nobody")
        return True

    async def acquire(self) -> None:
        """Return once this process holds the Lease."""
        while True:
            try:
                if await self.try_acquire_or_renew():
                    self.leading = True
                    return
            except (ApiError, OSError) as e:
                log.warning("leader election: cannot read or write the Lease (%s); retrying", e)
            await asyncio.sleep(self.retry_period_s)

    async def hold(self) -> None:
        """Renew every retry period; return when the Lease could not be renewed within the renew deadline."""
        last_renewed = time.monotonic()
        while True:
            await asyncio.sleep(self.retry_period_s)
            try:
                if await asyncio.wait_for(self.try_acquire_or_renew(), self.renew_deadline_s):
                    last_renewed = time.monotonic()
                    continue
                log.error("leader election: %s lost the Lease to another holder", self.identity)
                break
            except (ApiError, OSError, TimeoutError) as e:
                log.warning("leader election: renewing the Lease failed (%s)", e)
            if time.monotonic() - last_renewed > self.renew_deadline_s:
                log.error("leader election: no renewal for %.0f s; stepping down", self.renew_deadline_s)
                break
        self.leading = False

    async def release(self) -> None:
        """Give the Lease up now (a clean stop), so a candidate takes it at its next try."""
        if not self.leading:
            return
        self.leading = False
        try:
            lease = await self.client.get(self.path)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"] = {**lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1,
                                 "renewTime": _now_micro()}
                await self.client.request("PUT", self.path, lease)
                log.info("leader election: %s released the Lease", self.identity)
        except (ApiError, OSError) as e:
            log.warning("leader election: releasing the Lease failed (%s); it expires in %d s", e,
                        self.lease_duration_s)

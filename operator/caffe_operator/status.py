"""The CaffeModelService status, computed from what the cluster shows (pure functions).

`Ready` follows the child Deployment the way `kubectl rollout status` reads it: True only when
the Deployment controller has seen the current template, every desired replica runs it, no old
replica is left, and all of them are ready. Otherwise the reason says what is missing:

  InvalidSpec        the spec cannot be served (message: the field and why); no children made
  ScaledToZero       spec.replicas is 0
  Progressing        replicas are being created, updated or are loading the model
  RolloutStalled     the Deployment's progress deadline passed: pods do not become ready
                     (the model fails to load, an image cannot be pulled, no GPU node fits, ...)
  ReplicaFailure     the Deployment cannot create pods (quota, admission, ...)
  ModelLoadFailed    a pod's server answers that its model failed to load (message: the pod and
                     the loader's own words, e.g. a missing weights file or a sha256 mismatch);
                     see `with_load_errors` and load_errors.py, which asks the not-ready pods
  Unschedulable      a pod fits no node (message: the scheduler's, e.g. `Insufficient nvidia.com/gpu`);
                     read from the pods' PodScheduled condition by fetch_errors.py
  ReplicasReady      (True) every desired replica is ready
  IdleScaledToZero   (True) spec.autoscaling scaled the idle model to zero; the gateway holds a
                     request while a pod starts
  AutoscalerMissing  (True) serving, but spec.autoscaling needs KEDA, which the cluster lacks
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

READY = "Ready"
MODEL_LOAD_FAILED = "ModelLoadFailed"


@dataclass(frozen=True)
class Readiness:
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def readiness(desired: int, deployment: dict[str, Any] | None) -> Readiness:
    """Whether the model is servable, from the child Deployment (None: not created yet)."""
    if desired == 0:
        return Readiness("False", "ScaledToZero", "spec.replicas is 0: no server pods run")
    if deployment is None:
        return Readiness("False", "Progressing", "the Deployment is being created")
    st = deployment.get("status") or {}
    generation = (deployment.get("metadata") or {}).get("generation", 0)
    updated, ready = st.get("updatedReplicas", 0), st.get("readyReplicas", 0)
    total = st.get("replicas", 0)
    progressing = _condition(deployment, "Progressing")
    failure = _condition(deployment, "ReplicaFailure")
    if failure and failure.get("status") == "True":
        return Readiness("False", "ReplicaFailure", failure.get("message") or "the Deployment cannot create pods")
    if progressing and progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        return Readiness(
            "False", "RolloutStalled",
            f"{ready}/{desired} replicas ready; pods did not become ready within the progress deadline "
            "(model failing to load? image pull? no node with a free GPU?): see the pods' events and logs",
        )
    if st.get("observedGeneration", 0) < generation:
        return Readiness("False", "Progressing", "waiting for the Deployment controller to see the new spec")
    if updated < desired:
        return Readiness("False", "Progressing", f"{updated}/{desired} replicas run the current spec; {ready} ready")
    if total > updated:
        return Readiness("False", "Progressing", f"{total - updated} old replicas are being replaced")
    if ready < desired:
        return Readiness("False", "Progressing", f"{ready}/{desired} replicas ready (loading the model?)")
    return Readiness("True", "ReplicasReady", f"{ready}/{desired} replicas ready")


@dataclass(frozen=True)
class EndpointHealth:
    """What one not-ready model pod answered on `GET /v2/health/ready` (load_errors.py asks)."""

    endpoint: str  # who answered: "pod NAME", or "ADDRESS:PORT" when the endpoint names no pod
    state: Literal["failed", "loading", "ready", "other", "unreachable"]
    message: str = ""  # the server's error text, or why it could not be asked


def load_failure_message(failed: Sequence[EndpointHealth]) -> str:
    """E.g. `pod a, pod b: model 'm' failed to load: ...`; pods with the same error share one entry."""
    by_message: dict[str, list[str]] = {}
    for h in failed:
        by_message.setdefault(h.message, []).append(h.endpoint)
    return "; ".join(f"{', '.join(endpoints)}: {message}" for message, endpoints in by_message.items())


def with_load_errors(base: Readiness, health: Sequence[EndpointHealth],
                     previous: Mapping[str, Any] | None = None) -> Readiness:
    """`base` (what the Deployment says), unless the pods themselves say why they are not ready.

    - Ready, InvalidSpec or ScaledToZero: `base`; nothing to explain.
    - A pod answered that its model failed to load: ModelLoadFailed with the pods and the loader's
      messages. This outranks Progressing and RolloutStalled, which only guess at the cause.
    - Pods answered otherwise (still loading, ready by now, shutting down): `base`.
    - None could be reached this time (network) while the previous Ready condition (`previous`)
      already said ModelLoadFailed: that condition stays, so a blip neither flaps the status nor
      repeats the Warning event.
    """
    if base.status == "True" or base.reason in ("InvalidSpec", "ScaledToZero"):
        return base
    failed = [h for h in health if h.state == "failed"]
    if failed:
        return Readiness("False", MODEL_LOAD_FAILED, load_failure_message(failed))
    if (health and all(h.state == "unreachable" for h in health) and previous
            and previous.get("reason") == MODEL_LOAD_FAILED and previous.get("status") == "False"):
        return Readiness("False", MODEL_LOAD_FAILED, str(previous.get("message") or ""))
    return base


def ready_condition(r: Readiness, generation: int | None, previous: list[dict[str, Any]] | None,
                    now: str | None = None) -> dict[str, Any]:
    """The Ready condition; lastTransitionTime moves only when the status flips."""
    old = next((c for c in previous or [] if c.get("type") == READY), None)
    changed = old is None or old.get("status") != r.status
    kept = None if old is None else old.get("lastTransitionTime")
    cond = {
        "type": READY,
        "status": r.status,
        "reason": r.reason,
        "message": r.message,
        "lastTransitionTime": (now or now_rfc3339()) if changed else kept or now or now_rfc3339(),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def build_status(
    *,
    generation: int | None,
    readiness_: Readiness,
    deployment: dict[str, Any] | None,
    previous: dict[str, Any] | None,
    url: str | None,
    selector: str | None,
    backend: dict[str, Any] | None = None,
    now: str | None = None,
    grpc_address: str | None = None,
    variants: list[dict[str, Any]] | None = None,
    placement: dict[str, Any] | None = None,
    replicas: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The whole status object (the operator owns every field of it). `backend` is a fresh answer
    from a pod (backend_report.py); without one the previous answer stays."""
    prev_conditions = (previous or {}).get("conditions")
    others = [c for c in prev_conditions or [] if c.get("type") != READY]
    st = (deployment or {}).get("status") or {}
    if replicas is not None:  # a pool model: copies placed, copies on ready pods (pool_reconcile.py)
        st = {"replicas": replicas[0], "readyReplicas": replicas[1]}
    backend = backend if backend is not None else (previous or {}).get("backend")
    return {
        "observedGeneration": generation,
        "conditions": [ready_condition(readiness_, generation, prev_conditions, now), *others],
        "replicas": st.get("replicas", 0),
        "readyReplicas": st.get("readyReplicas", 0),
        "url": url,
        **({"grpcAddress": grpc_address} if grpc_address else {}),
        "selector": selector,
        **({"backend": backend} if backend is not None else {}),
        **({"variants": variants} if variants is not None else {}),
        **({"placement": placement} if placement is not None else {}),
    }


def same_status(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Equal apart from timestamps (so that an unchanged status is not written again)."""
    def strip(s: dict[str, Any] | None) -> Any:
        s = dict(s or {})
        s["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in s.get("conditions") or []]
        return {k: v for k, v in s.items() if v is not None}
    return strip(a) == strip(b)


def status_patch(previous: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch from `previous` to `new`: a merge patch keeps keys it does not name, so
    the keys `new.backend` no longer has (maxAbsDiff once pycaffe serves) are nulled, and so is
    grpcAddress once gRPC is turned off."""
    patch = dict(new)
    if (previous or {}).get("grpcAddress") and "grpcAddress" not in new:
        patch["grpcAddress"] = None
    if (previous or {}).get("variants") is not None and new.get("variants") is None:
        patch["variants"] = None  # the canary is gone
    if (previous or {}).get("placement") is not None and new.get("placement") is None:
        patch["placement"] = None  # the model left its pool
    old_backend, new_backend = (previous or {}).get("backend"), new.get("backend")
    if isinstance(old_backend, dict) and isinstance(new_backend, dict):
        patch["backend"] = {**{k: None for k in old_backend if k not in new_backend}, **new_backend}
    return patch

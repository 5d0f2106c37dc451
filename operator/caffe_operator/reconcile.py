"""Reconciliation: make the children match the spec, then make the status match the children.

Level-based and idempotent: whatever triggers it (the CR created, updated or resumed, a child
changed or deleted, the periodic resync), it reads the current CR, computes the desired children
of each variant (variants.py: the primary, and the canary while there is one; manifests.py and
traffic.py build them), creates the missing ones (a 409 means it already exists: adopt and patch
it), patches those that drifted, deletes the ones it owns that nothing asks for any more (a
removed canary's, a ScaledObject without spec.autoscaling, a NetworkPolicy without peers), and
writes the status only when it changed. One lock per model keeps two triggers for the same model
from interleaving inside this process.

Once a pod is ready, one ready pod is asked which backend serves the model and why (its model
metadata; backend_report.py) for status.backend, again only when the pod template or the
generation changed, or the answer came from a rollout since finished.

When the Deployment is not ready, the not-ready pods are asked why (load_errors.py: their
`/v2/health/ready`, found through the Service's EndpointSlices): a model that failed to load
turns Ready=False with reason ModelLoadFailed and the loader's message (status.with_load_errors),
with one Warning event when that reason appears. A model still loading, or pods not yet
answering, are looked at again soon (CAFFESERVE_LOAD_RECHECK_SECONDS, default 10, doubling up to
16 times that; 0: only on events and the resync), since a failing load changes nothing the
operator watches until the Deployment's progress deadline passes.

API access the operator needs (the Helm chart's RBAC; namespaced: a Role per watched namespace,
or a ClusterRole for --all-namespaces). kopf watches and annotates, this module reads and writes:
  caffeserving.io caffemodelservices:        get, list, watch, patch   (patch: kopf's annotations)
  caffeserving.io caffemodelservices/status: patch
  apps deployments, "" services, configmaps: get, list, watch, create, patch, delete   (delete: a canary
                                             removed, rolled back or promoted)
  "" events:                                 create
  discovery.k8s.io endpointslices:           list   (the pods to ask: pods.py)
  "" pods:                                   list   (failed fetch init containers, unschedulable pods:
                                             fetch_errors.py)
  networking.k8s.io networkpolicies:         get, list, watch, create, patch, delete   (with
                                             CAFFESERVE_NETWORK_POLICY_FROM); without it get, delete
                                             (those made while it was set are removed)
  keda.sh scaledobjects:                     get, create, patch, delete   (spec.autoscaling, where KEDA is installed)
The operator also sends plain HTTP GETs to model pods' /v2/health/ready (not-ready pods) and
/v2/models/NAME (one ready pod: which backend serves, for status.backend) on their `http` port
(8080), without credentials: a NetworkPolicy on model pods must let the operator in.
Deleting the CR needs no delete here (its children go by ownerReferences). No namespaces or CRD
access (kopf scanning is off; discovery of /apis/caffeserving.io/v1alpha1 is open to every
authenticated client).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import kopf

from caffe_http.tls import POD_SERVER_NAME
from caffe_operator import manifests, pool_manifests, traffic, variants
from caffe_operator.api import API_VERSION, KIND, CaffeModelServiceSpec, InvalidSpec, parse_spec
from caffe_operator.backend_report import RECHECK_CHECKING_S, BackendProbe, BackendReport
from caffe_operator.events import EventPoster
from caffe_operator.fetch_errors import (
    MODEL_FETCH_FAILED,
    UNSCHEDULABLE,
    FetchErrorProbe,
    failure_message,
    fetch_failures,
    unschedulable,
)
from caffe_operator.kube import ApiError, KubeClient, object_path
from caffe_operator.load_errors import LoadErrorProbe
from caffe_operator.pods import Pods, PodTLS
from caffe_operator.pool_reconcile import PoolReconciler
from caffe_operator.repository import RepositoryClient
from caffe_operator.status import (
    MODEL_LOAD_FAILED,
    READY,
    Readiness,
    build_status,
    readiness,
    same_status,
    status_patch,
    with_load_errors,
)
from inference_server.slices import PRIMARY

# (obj, type, reason, message) → an Event on obj; events.EventPoster unless a test brings its own.
PostEvent = Callable[[Mapping[str, Any], str, str, str], Awaitable[None]]


@dataclass(frozen=True)
class OperatorConfig:
    """Operator-wide settings, from the environment (the Helm chart sets them)."""

    server_image: str = manifests.DEFAULT_SERVER_IMAGE
    gateway_url: str | None = None
    gateway_grpc_address: str | None = None  # host:port of the gateway's gRPC
    load_recheck_s: float = 10.0  # first look again at a not-ready model; 0: never
    # NetworkPolicyPeers allowed into model pods (CAFFESERVE_NETWORK_POLICY_FROM, JSON); None: no policies
    network_peers: tuple[dict[str, Any], ...] | None = None
    gateway_metrics_url: str | None = None  # where KEDA reads the load signal (in-cluster gateway URL)
    prometheus_url: str | None = None  # with it, KEDA sums the signal over gateway replicas (traffic.py)
    otlp_endpoint: str | None = None  # model pods' traces, where a CR sets no spec.runtime.tracing.endpoint
    model_cache_claim: str | None = None  # a PVC mounted into model pods as the shared ONNX cache (manifests.py)
    # the model and pool pods serve over TLS with this kubernetes.io/tls Secret (in their namespace), and the
    # operator reaches them checking the CA file (the same Secret's ca.crt, mounted here) and the server name
    pod_tls_secret: str | None = None
    pod_tls_ca: str = manifests.POD_TLS_CA_FILE
    pod_tls_server_name: str = POD_SERVER_NAME

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if environ is None else environ
        return cls(
            server_image=env.get("CAFFESERVE_SERVER_IMAGE") or manifests.DEFAULT_SERVER_IMAGE,
            gateway_url=env.get("CAFFESERVE_GATEWAY_URL") or None,
            gateway_grpc_address=env.get("CAFFESERVE_GATEWAY_GRPC_ADDRESS") or None,
            load_recheck_s=float(env.get("CAFFESERVE_LOAD_RECHECK_SECONDS") or 10.0),
            network_peers=network_peers_from(env.get("CAFFESERVE_NETWORK_POLICY_FROM")),
            gateway_metrics_url=env.get("CAFFESERVE_GATEWAY_METRICS_URL") or env.get("CAFFESERVE_GATEWAY_URL") or None,
            prometheus_url=env.get("CAFFESERVE_PROMETHEUS_URL") or None,
            otlp_endpoint=env.get("CAFFESERVE_OTLP_ENDPOINT") or None,
            model_cache_claim=env.get("CAFFESERVE_MODEL_CACHE_CLAIM") or None,
            pod_tls_secret=env.get("CAFFESERVE_POD_TLS_SECRET") or None,
            pod_tls_ca=env.get("CAFFESERVE_POD_TLS_CA") or manifests.POD_TLS_CA_FILE,
            pod_tls_server_name=env.get("CAFFESERVE_POD_TLS_SERVER_NAME") or POD_SERVER_NAME,
        )

    def pod_tls(self) -> PodTLS | None:
        """How to reach the pods when they serve over TLS (the CA must load: an operator that cannot check
        the pods' certificates stops at start with why)."""
        return PodTLS(self.pod_tls_ca, self.pod_tls_server_name) if self.pod_tls_secret else None


def network_peers_from(raw: str | None) -> tuple[dict[str, Any], ...] | None:
    """CAFFESERVE_NETWORK_POLICY_FROM: a JSON list of NetworkPolicyPeers; unset or empty: no policies."""
    if not raw or not raw.strip():
        return None
    peers = json.loads(raw)
    if not isinstance(peers, list) or not all(isinstance(p, dict) for p in peers):
        raise ValueError("CAFFESERVE_NETWORK_POLICY_FROM must be a JSON list of NetworkPolicyPeer objects")
    return tuple(peers)


def recheck_delay(attempt: int, first_s: float) -> float:
    """Seconds before the `attempt`-th (0-based) follow-up look at a model that is not ready yet."""
    return first_s * min(2**attempt, 16)


def needs_recheck(ready: Readiness) -> bool:
    """Whether a not-ready model may have news the operator would not be told about: pods
    loading (a failure changes nothing it watches) or not answering yet. Not once the cause is known."""
    return ready.status != "True" and ready.reason not in ("InvalidSpec", "ScaledToZero", MODEL_LOAD_FAILED)


def variant_status(wanted: list[variants.Variant], applied: Mapping[str, Mapping[str, dict[str, Any]]],
                   primary_ready: Readiness) -> list[dict[str, Any]] | None:
    """status.variants: each variant's version, share, pods and readiness; None with one variant."""
    if len(wanted) < 2:
        return None
    out = []
    for v in wanted:
        deployment = applied[v.name]["Deployment"]
        st = deployment.get("status") or {}
        ready = primary_ready if v.name == PRIMARY else readiness(v.expected_replicas(deployment), deployment)
        out.append({"name": v.name, "version": v.spec.model.version, "trafficPercent": v.traffic_percent,
                    "replicas": st.get("replicas", 0), "readyReplicas": st.get("readyReplicas", 0),
                    "ready": ready.status == "True"})
    return out


@dataclass
class Outcome:
    """What one reconcile did (for handlers and logs)."""

    invalid: str | None = None
    actions: dict[str, str] = field(default_factory=dict)  # "Deployment/x-predictor" → created|patched|unchanged
    ready: Readiness | None = None


# --------------------------------------------------------------------------------------------
# drift detection (pure)
# --------------------------------------------------------------------------------------------
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX: dict[str | None, int | Decimal] = {
    None: 1,
    "m": Decimal("0.001"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_quantity(value: Any) -> Decimal | None:
    """A Kubernetes resource quantity ("500m", "2Gi", 1) as a number; None if it is not one."""
    m = _QUANTITY.match(str(value).strip())
    if not m:
        return None
    try:
        return Decimal(m.group(1)) * _SUFFIX[m.group(2)]
    except InvalidOperation:
        return None


def is_subset(desired: Any, current: Any, *, quantities: bool = False) -> bool:
    """Whether `current` already says everything `desired` says. Extra keys in `current` (defaults
    the API server filled in) are fine; lists must match item by item; resource quantities compare
    by value ("0.5" == "500m"), as the API server normalises them."""
    if isinstance(desired, dict):
        return isinstance(current, dict) and all(
            k in current and is_subset(v, current[k], quantities=quantities or k == "resources")
            for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (isinstance(current, list) and len(desired) == len(current)
                and all(is_subset(d, c, quantities=quantities) for d, c in zip(desired, current, strict=True)))
    if desired == current:
        return True
    if quantities:
        a, b = parse_quantity(desired), parse_quantity(current)
        return a is not None and a == b
    return False


def _owner_references(current: dict[str, Any], desired: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The ownerReferences `current` should have (ours, and no other controller), or None if fine."""
    ours = desired["metadata"]["ownerReferences"]
    uids = {r["uid"] for r in ours}
    refs = current.get("metadata", {}).get("ownerReferences") or []
    if all(any(r.get("uid") == u and r.get("controller") for r in refs) for u in uids) and \
            not any(r.get("controller") and r.get("uid") not in uids for r in refs):
        return None
    return [r for r in refs if r.get("uid") not in uids and not r.get("controller")] + ours


def drift_patch(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any] | None:
    """A JSON merge patch that brings `current` back to `desired` in the fields we own; None if in sync."""
    patch: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    if not is_subset(desired["metadata"].get("labels", {}), current.get("metadata", {}).get("labels") or {}):
        meta["labels"] = desired["metadata"]["labels"]
    if (refs := _owner_references(current, desired)) is not None:
        meta["ownerReferences"] = refs
    if meta:
        patch["metadata"] = meta
    kind = desired["kind"]
    if kind == "ConfigMap":
        data = current.get("data") or {}
        if data != desired["data"] or current.get("binaryData"):
            patch["data"] = {**{k: None for k in data if k not in desired["data"]}, **desired["data"]}
            if current.get("binaryData"):
                patch["binaryData"] = None
    else:
        spec_current = current.get("spec") or {}
        stale = []
        if kind == "Deployment":
            pod_current = (spec_current.get("template") or {}).get("spec") or {}
            pod_desired = desired["spec"]["template"]["spec"]
            # serviceAccountName is defaulted by the API server: absent from the CR is not drift.
            stale = [f for f in manifests.OPTIONAL_POD_FIELDS
                     if f in pod_current and f not in pod_desired and f != "serviceAccountName"]
        selector_keys_gone = kind == "Service" and bool(
            set(spec_current.get("selector") or {}) - set(desired["spec"].get("selector") or {}))
        if stale or selector_keys_gone or not is_subset(desired["spec"], spec_current):
            spec = dict(desired["spec"])
            if selector_keys_gone:  # a model moved into or out of a pool: a merge patch would keep the old keys
                spec["selector"] = {**{k: None for k in spec_current["selector"]}, **desired["spec"]["selector"]}
            if kind == "Deployment":
                template = dict(spec["template"])
                pod_current = (spec_current.get("template") or {}).get("spec") or {}
                removed = {
                    f: None for f in manifests.OPTIONAL_POD_FIELDS if f in pod_current and f not in template["spec"]
                }
                if "serviceAccountName" in removed and "serviceAccount" in pod_current:
                    removed["serviceAccount"] = None  # the deprecated alias would bring it back
                template["spec"] = {**removed, **template["spec"]}
                spec["template"] = template
            patch["spec"] = spec
    return patch or None


# --------------------------------------------------------------------------------------------
# the reconciler
# --------------------------------------------------------------------------------------------
class Reconciler:
    def __init__(self, client: KubeClient, config: OperatorConfig, post_event: PostEvent | None = None,
                 pods: Pods | None = None) -> None:
        self.client = client
        self.config = config
        # Our own poster, not kopf.event: the resync and follow-ups run outside kopf's handlers.
        self.post_event = post_event or EventPoster(client, manifests.MANAGED_BY)
        self.pods = pods or Pods(client, tls=config.pod_tls())  # asks the model pods, for both probes below
        self.probe = LoadErrorProbe(pods=self.pods)
        self.backends = BackendProbe(self.pods)
        self.fetches = FetchErrorProbe(client)
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self.known: set[tuple[str, str]] = set()  # models seen by this process, for the resync
        self._rechecks: dict[tuple[str, str], asyncio.Task[None]] = {}  # one pending follow-up per model
        self._recheck_attempts: dict[tuple[str, str], int] = {}
        # per model, the (kind, name)s of children it does not want that were found gone or not
        # its own: not looked up again until the spec (or this process's settings) wants them
        self._swept: defaultdict[tuple[str, str], set[tuple[str, str]]] = defaultdict(set)
        self.pools = PoolReconciler(client, self._apply, self.post_event, config.server_image, config.gateway_url,
                                    config.gateway_grpc_address, network_peers=config.network_peers,
                                    delete_owned=self._delete_owned, model_cache_claim=config.model_cache_claim,
                                    repository=RepositoryClient(self.pods.tls), pod_tls_secret=config.pod_tls_secret)

    async def close(self) -> None:
        await self.pools.close()
        for task in self._rechecks.values():
            task.cancel()
        self._rechecks.clear()
        await self.pods.close()

    async def reconcile_named(
        self, namespace: str, name: str, logger: logging.Logger | logging.LoggerAdapter[Any]
    ) -> Outcome | None:
        """Reconcile the CR `namespace/name` if it exists and is not being deleted."""
        key = (namespace, name)
        async with self._locks[key]:
            cr = await self.client.get(object_path(KIND, namespace, name))
            if cr is None or cr.get("metadata", {}).get("deletionTimestamp"):
                self.known.discard(key)
                self._recheck_attempts.pop(key, None)
                self._swept.pop(key, None)
                self.backends.forget(key)
                return None
            self.known.add(key)
            outcome = await self._reconcile(cr, logger)
            if outcome.ready is not None:
                self._follow_up(key, outcome.ready, logger)
            if key not in self._rechecks and self.backends.checking(key):  # it may switch backend: ask again
                self._rechecks[key] = asyncio.get_running_loop().create_task(
                    self._recheck_later(key, RECHECK_CHECKING_S, logger))
            return outcome

    def _follow_up(self, key: tuple[str, str], ready: Readiness, logger: Any) -> None:
        """Look at a not-ready model again soon (backing off), until its cause is known or it is ready."""
        if not needs_recheck(ready) or self.config.load_recheck_s <= 0:
            self._recheck_attempts.pop(key, None)
            return
        if key in self._rechecks:
            return
        attempt = self._recheck_attempts.get(key, 0)
        self._recheck_attempts[key] = attempt + 1
        delay = recheck_delay(attempt, self.config.load_recheck_s)
        self._rechecks[key] = asyncio.get_running_loop().create_task(self._recheck_later(key, delay, logger))

    async def _recheck_later(self, key: tuple[str, str], delay_s: float, logger: Any) -> None:
        await asyncio.sleep(delay_s)
        self._rechecks.pop(key, None)
        try:
            await self.reconcile_named(*key, logger)
        except Exception as e:  # logged; the next trigger tries again
            logger.warning(f"follow-up reconcile of {key[0]}/{key[1]} failed: {e}")

    async def resync_forever(self, interval_s: float, logger: Any) -> None:
        """Every `interval_s`, reconcile every model seen so far (a safety net for missed events)."""
        while True:
            await asyncio.sleep(interval_s)
            for namespace, name in sorted(self.known):
                try:
                    await self.reconcile_named(namespace, name, logger)
                except Exception as e:  # logged; the next trigger tries again
                    logger.warning(f"resync of {namespace}/{name} failed: {e}")
            for namespace, name in sorted(self.pools.known):
                try:
                    await self.pools.reconcile(namespace, name, logger)
                except Exception as e:  # logged; the next trigger tries again
                    logger.warning(f"resync of pool {namespace}/{name} failed: {e}")

    async def _reconcile(self, cr: dict[str, Any], logger: Any) -> Outcome:
        meta = cr["metadata"]
        name, namespace, generation = meta["name"], meta["namespace"], meta.get("generation")
        previous = cr.get("status") or {}
        outcome = Outcome()
        try:
            spec = parse_spec(name, cr.get("spec"))
        except InvalidSpec as e:
            outcome.invalid = str(e)
            # Children of an earlier, valid spec are left as they are: a typo must not take a
            # serving model down. Nothing new is created.
            deployment = await self.client.get(object_path("Deployment", namespace, manifests.predictor_name(name)))
            message = str(e) + ("" if deployment is None else "; the previous spec's pods keep running")
            outcome.ready = Readiness("False", "InvalidSpec", message)
            url = None if deployment is None else manifests.model_url(name, namespace, self.config.gateway_url,
                                                                 bool(self.config.pod_tls_secret))
            # the previous spec's pods keep serving gRPC as they did (or did not)
            grpc = None if deployment is None else previous.get("grpcAddress")
            await self._write_status(cr, outcome.ready, deployment, url, logger, grpc_address=grpc)
            return outcome

        peers = list(self.config.network_peers) if self.config.network_peers is not None else None
        wanted = variants.of(name, manifests.with_tracing_default(spec, self.config.otlp_endpoint))
        applied: dict[str, dict[str, dict[str, Any]]] = {}  # variant → kind → the object as applied
        for v in wanted:
            objs = ([pool_manifests.model_service(v, namespace, v.spec.pool)] if v.spec.pool is not None else
                    manifests.children(v, namespace, self.config.server_image, peers,
                                       self.config.model_cache_claim, self.config.pod_tls_secret).all())
            applied[v.name] = await self._apply_all(cr, previous, generation, objs, outcome, logger)
            await self._drop_stale_labels(applied[v.name]["Service"], v.traffic_labels)
        old_pool = (previous.get("placement") or {}).get("pool")
        if old_pool and old_pool != spec.pool:  # it left that pool: the pool unloads it
            await self.pools.reconcile(namespace, old_pool, logger)
        if spec.pool is not None:
            return await self._reconcile_pool_model(cr, spec, previous, generation, wanted, applied, outcome, logger)
        primary, deployment = wanted[0], applied[PRIMARY]["Deployment"]
        desired = primary.expected_replicas(deployment)
        outcome.ready = readiness(desired, deployment)
        if spec.autoscaling is not None and desired == 0:
            outcome.ready = Readiness("True", "IdleScaledToZero", "no pod runs while the model is idle; the gateway "
                                      "holds a request while one starts (up to "
                                      f"{spec.autoscaling.cold_start_timeout_seconds} s)")
        keda = await self._keda_installed()
        if keda and spec.autoscaling is not None:
            gateway = self.config.gateway_metrics_url or f"http://caffe-serving-gateway.{namespace}.svc:8080"
            for v in wanted:  # each variant its own, on its own share of the load
                so = traffic.scaled_object(v, namespace, gateway, self.config.prometheus_url)
                applied[v.name].update(await self._apply_all(cr, previous, generation, [so], outcome, logger))
        elif spec.autoscaling is not None and outcome.ready.status == "True":
            outcome.ready = Readiness("True", "AutoscalerMissing", "serving, but spec.autoscaling needs KEDA "
                                      "(keda.sh/v1alpha1 ScaledObject), which this cluster does not serve: "
                                      "the replica count stays where it is")
        await self._remove_unwanted(cr, spec, applied, keda, outcome, logger)
        if outcome.ready.status != "True" and desired > 0:
            health = await self.probe.health(namespace, manifests.predictor_name(name), manifests.PORT, logger)
            old_ready = next((c for c in previous.get("conditions") or [] if c.get("type") == READY), None)
            outcome.ready = with_load_errors(outcome.ready, health, old_ready)
            if outcome.ready.reason != MODEL_LOAD_FAILED:
                # pods that never started their server: did a fetch init container fail? (fetch_errors.py)
                # or pods that no node fits (the scheduler's message)
                pods = await self.fetches.pods(namespace, manifests.selector_string(name), logger)
                if failed := fetch_failures(pods):
                    outcome.ready = Readiness("False", MODEL_FETCH_FAILED, failure_message(failed))
                elif stuck := unschedulable(pods):
                    outcome.ready = Readiness("False", UNSCHEDULABLE, failure_message(stuck))
        backend = await self._backend(cr, deployment, outcome.ready, logger)
        await self._write_status(cr, outcome.ready, deployment,
                                 manifests.model_url(name, namespace, self.config.gateway_url,
                                                     bool(self.config.pod_tls_secret)), logger, backend,
                                 manifests.grpc_address(name, namespace, spec, self.config.gateway_grpc_address),
                                 variant_status(wanted, applied, outcome.ready))
        return outcome

    async def _reconcile_pool_model(self, cr: dict[str, Any], spec: CaffeModelServiceSpec, previous: dict[str, Any],
                                    generation: int | None, wanted: list[variants.Variant],
                                    applied: dict[str, dict[str, dict[str, Any]]], outcome: Outcome,
                                    logger: Any) -> Outcome:
        """A model in a pool: its Service (applied above) selects the pool pods that hold it; the pool's
        reconcile places and loads it and writes its status. spec.autoscaling scales the CR itself
        (its scale subresource: spec.replicas, the copies held), not a Deployment."""
        assert spec.pool is not None
        namespace, name = cr["metadata"]["namespace"], cr["metadata"]["name"]
        keda = await self._keda_installed()
        if keda and spec.autoscaling is not None:
            gateway = self.config.gateway_metrics_url or f"http://caffe-serving-gateway.{namespace}.svc:8080"
            for v in wanted:
                so = traffic.scaled_object(v, namespace, gateway, self.config.prometheus_url)
                if v.spec.pool is not None:
                    so["spec"]["scaleTargetRef"] = {"apiVersion": API_VERSION, "kind": KIND, "name": name}
                applied[v.name].update(await self._apply_all(cr, previous, generation, [so], outcome, logger))
        await self._remove_unwanted(cr, spec, applied, keda, outcome, logger)
        await self.pools.reconcile(namespace, spec.pool, logger)
        return outcome

    async def _apply_all(self, cr: dict[str, Any], previous: dict[str, Any], generation: int | None,
                         objs: list[dict[str, Any]], outcome: Outcome, logger: Any) -> dict[str, dict[str, Any]]:
        """Create or patch `objs` (owned by `cr`), in order; the objects as applied, by kind."""
        kopf.append_owner_reference(objs, owner=cr)  # type: ignore[arg-type]  # kopf reads any Mapping
        applied: dict[str, dict[str, Any]] = {}
        for obj in objs:
            applied[obj["kind"]], action = await self._apply(obj)
            outcome.actions[f"{obj['kind']}/{obj['metadata']['name']}"] = action
            await self._announce(cr, previous, generation, obj, action, logger)
        return applied

    async def _drop_stale_labels(self, service: dict[str, Any], wanted: dict[str, str]) -> None:
        """Remove traffic labels the spec no longer says (a merge patch keeps what it does not name)."""
        have = (service.get("metadata") or {}).get("labels") or {}
        stale = {k: None for k in traffic.OPTIONAL_TRAFFIC_LABELS if k in have and k not in wanted}
        if stale:
            meta = service["metadata"]
            await self.client.merge_patch(object_path("Service", meta["namespace"], meta["name"]),
                                          {"metadata": {"labels": stale}})

    async def _keda_installed(self) -> bool:
        found = await self.client.get(f"/apis/{traffic.KEDA_GROUP_VERSION}")
        if not found:
            return False
        return any(r.get("name") == "scaledobjects" for r in found.get("resources") or [])

    async def _remove_unwanted(self, cr: dict[str, Any], spec: CaffeModelServiceSpec,
                               applied: dict[str, dict[str, dict[str, Any]]], keda: bool, outcome: Outcome,
                               logger: Any) -> None:
        """Delete the children this CR owns that its spec and the operator's settings no longer ask
        for: a removed canary's, a ScaledObject once spec.autoscaling is gone, a NetworkPolicy once
        the operator is not given peers (the chart's networkPolicy.enabled turned off). Objects
        someone else controls are left alone; so is a kind the operator may not read (403).
        Each unwanted name is looked up once per process: only this operator makes them, and only
        while the spec and its settings want them (which clears the mark), so the resync stays cheap."""
        meta = cr["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        swept = self._swept[(namespace, name)]
        removed: dict[str, list[str]] = defaultdict(list)  # the event's reason → what went
        for variant in variants.VARIANT_NAMES:
            have = applied.get(variant, {})
            # the autoscaler and the Service first (no new pods, no new requests), the policy last
            for kind in (["ScaledObject"] if keda else []) + ["Service", "Deployment", "ConfigMap", "NetworkPolicy"]:
                child = (
                    variants.config_name(name, variant)
                    if kind == "ConfigMap"
                    else variants.resource_name(name, variant)
                )
                if kind in have:
                    swept.discard((kind, child))
                    continue
                if (kind, child) in swept:
                    continue
                deleted = await self._delete_owned(cr, kind, namespace, child)
                swept.add((kind, child))
                if not deleted:
                    continue
                outcome.actions[f"{kind}/{child}"] = "deleted"
                logger.info(f"deleted {kind} {child}")
                reason = ("CanaryRemoved" if variant not in applied else
                          "AutoscalingRemoved" if kind == "ScaledObject" else
                          "MovedToPool" if spec.pool is not None and variant == PRIMARY else "NetworkPolicyRemoved")
                removed[reason].append(f"{kind} {child}")
        for reason, what in removed.items():
            why = {"CanaryRemoved": f"the canary is removed; all requests go to version {spec.model.version}",
                   "AutoscalingRemoved": "spec.autoscaling is removed; the replica count is spec.replicas again",
                   "MovedToPool": f"the model is served from pool {spec.pool}",
                   "NetworkPolicyRemoved": "the operator makes no NetworkPolicies now (the chart's "
                                           "networkPolicy.enabled is off)"}[reason]
            await self.post_event(cr, "Normal", reason, f"deleted {', '.join(what)}: {why}")

    async def _delete_owned(self, cr: Mapping[str, Any], kind: str, namespace: str, name: str) -> bool:
        """Delete `kind/name` if `cr` is its controller; whether it was deleted."""
        path = object_path(kind, namespace, name)
        try:
            current = await self.client.get(path)
        except ApiError as e:
            if e.status == 403:  # not granted: the operator cannot have made it under these rules
                return False
            raise
        refs = ((current or {}).get("metadata") or {}).get("ownerReferences") or []
        uid = cr["metadata"].get("uid")
        if current is None or not uid or not any(r.get("uid") == uid and r.get("controller") for r in refs):
            return False
        return await self.client.delete(path)

    async def _backend(self, cr: dict[str, Any], deployment: dict[str, Any], ready: Readiness,
                       logger: Any) -> BackendReport | None:
        """A fresh answer from a ready pod on which backend serves, when one is due (backend_report.py)."""
        meta = cr["metadata"]
        template = ((deployment.get("spec") or {}).get("template") or {}).get("metadata") or {}
        fingerprint = (
            (template.get("annotations") or {}).get(manifests.CONFIG_HASH_ANNOTATION),
            meta.get("generation"),
        )
        return await self.backends.report(
            (meta["namespace"], meta["name"]), manifests.predictor_name(meta["name"]), manifests.PORT,
            fingerprint=fingerprint, settled=ready.status == "True",
            ready_replicas=int((deployment.get("status") or {}).get("readyReplicas") or 0), logger=logger)

    async def _apply(self, obj: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Create `obj`, or patch the existing one where it drifted. Returns (object, action)."""
        path = object_path(obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        current = await self.client.get(path)
        if current is None:
            try:
                return await self.client.create(obj), "created"
            except ApiError as e:
                if e.status != 409:
                    raise
                current = await self.client.get(path)  # it appeared meanwhile: adopt it below
                if current is None:
                    raise kopf.TemporaryError(f"{path} conflicted on create, then vanished", delay=1) from None
        patch = drift_patch(current, obj)
        if patch is None:
            return current, "unchanged"
        return await self.client.merge_patch(path, patch), "patched"

    async def _announce(self, cr: dict[str, Any], previous: dict[str, Any], generation: int | None,
                  obj: dict[str, Any], action: str, logger: Any) -> None:
        what = f"{obj['kind']} {obj['metadata']['name']}"
        old_ready: dict[str, Any] = next((c for c in previous.get("conditions") or [] if c.get("type") == READY), {})
        seen_before = previous.get("observedGeneration") is not None and old_ready.get("reason") != "InvalidSpec"
        if action == "created":
            if seen_before:
                await self.post_event(cr, "Warning", "Recreated", f"{what} was missing; recreated")
            else:
                await self.post_event(cr, "Normal", "Created", f"created {what}")
        elif action == "patched":
            if previous.get("observedGeneration") == generation:
                await self.post_event(
                    cr, "Warning", "Restored", f"{what} differed from the spec (edited by hand?); restored"
                )
            else:
                await self.post_event(cr, "Normal", "Updated", f"updated {what} for generation {generation}")
        if action != "unchanged":
            logger.info(f"{action} {what}")

    async def _write_status(
        self,
        cr: dict[str, Any],
        ready: Readiness,
        deployment: dict[str, Any] | None,
        url: str | None,
        logger: Any,
        backend: BackendReport | None = None,
        grpc_address: str | None = None,
        variant_states: list[dict[str, Any]] | None = None,
    ) -> None:
        meta = cr["metadata"]
        previous = cr.get("status") or {}
        new = build_status(
            generation=meta.get("generation"), readiness_=ready, deployment=deployment, previous=previous,
            url=url, grpc_address=grpc_address, selector=manifests.selector_string(meta["name"]),
            backend=backend.as_status() if backend is not None else None, variants=variant_states,
        )
        if same_status(previous, new):
            return
        await self.client.merge_patch(
            object_path(KIND, meta["namespace"], meta["name"], "status"), {"status": status_patch(previous, new)}
        )
        if new.get("backend") and new["backend"] != previous.get("backend"):
            logger.info(f"backend {new['backend']['name']}: {new['backend'].get('reason', '')}")
        old: dict[str, Any] = next((c for c in previous.get("conditions") or [] if c.get("type") == READY), {})
        if (old.get("status"), old.get("reason"), old.get("message")) != (ready.status, ready.reason, ready.message):
            logger.info(f"Ready={ready.status} {ready.reason}: {ready.message}")
        if ready.reason == "InvalidSpec":
            if (old.get("reason"), old.get("message")) != (ready.reason, ready.message):
                await self.post_event(cr, "Warning", "InvalidSpec", ready.message)
        elif ready.reason in (MODEL_LOAD_FAILED, MODEL_FETCH_FAILED, UNSCHEDULABLE):
            if old.get("reason") != ready.reason:  # once when it appears, not on every resync
                await self.post_event(cr, "Warning", ready.reason, ready.message)
        elif ready.status == "True" and old.get("status") != "True":
            grpc = f" and gRPC {grpc_address}" if grpc_address else ""
            await self.post_event(cr, "Normal", "Ready", f"{ready.message}; serving at {url}{grpc}")
        elif ready.status != "True" and old.get("status") == "True":
            await self.post_event(cr, "Warning", "NotReady", f"{ready.reason}: {ready.message}")
        elif ready.reason == "RolloutStalled" and old.get("reason") != "RolloutStalled":
            await self.post_event(cr, "Warning", "RolloutStalled", ready.message)

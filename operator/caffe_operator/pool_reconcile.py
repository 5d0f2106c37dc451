"""Reconciling a CaffeServingPool: its pods, which model each holds, and every pool model's status.

Level-based, like reconcile.py: whatever triggers it (the pool changed, a pool pod came, went or
turned (un)ready, a model joined, left or changed, the resync), one pass
1. applies the pool's NetworkPolicy when the operator is given peers (removes the one it made when
   not), then the pool's Deployment (pool_manifests.pool_deployment, owned by the pool);
2. reads the ready pool pods and asks each what it holds (`POST /v2/repository/index`);
3. places every model that names the pool (placement.place: copies = the model's spec.replicas,
   memory = what a pod measured at load, else the model's resources.requests.memory, else the
   pool's defaultModelMemory), keeping loaded copies where they are: a dead pod's models move;
4. per pod: takes the label `pool.caffeserving.io/MODEL` off for what it must drop (its Service
   stops sending there first), unloads, loads what it must hold (`parameters.config` = the
   model's server config), and labels it for each loaded model (its Service selects it);
5. writes each pool model's status (placement, Ready, replicas = copies held) and the pool's.

The pods record which config each model was loaded with (annotation CONFIGS_ANNOTATION, a hash
per model), so a changed model spec is reloaded in place.

API access beyond reconcile.py's: caffeservingpools get/list/watch/patch and /status patch; pods
list/watch/patch (labels and that annotation). HTTP to pool pods on port 8080: the repository API.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import kopf

from caffe_operator import manifests, pool_manifests
from caffe_operator.api import KIND, CaffeModelServiceSpec, InvalidSpec, parse_spec
from caffe_operator.kube import KubeClient, object_path
from caffe_operator.placement import ModelDemand, Placement, PodSlot, place
from caffe_operator.pool_api import POOL_KIND, CaffeServingPoolSpec, parse_pool_spec, quantity_bytes
from caffe_operator.repository import READY as STATE_READY, RepositoryClient
from caffe_operator.status import READY, Readiness, build_status, ready_condition, same_status, status_patch
from inference_server.slices import PORT

CONFIGS_ANNOTATION = "caffeserving.io/pool-configs"  # on a pool pod: {model: hash of its load config}
UNSCHEDULABLE = "Unschedulable"
MODEL_LOAD_FAILED = "ModelLoadFailed"

# (obj, type, reason, message) → an Event on obj
PostEvent = Callable[[Mapping[str, Any], str, str, str], Awaitable[None]]
Apply = Callable[[dict[str, Any]], Awaitable[tuple[dict[str, Any], str]]]
# (owner, kind, namespace, name) → whether it deleted kind/name, which it does only if owner controls it
DeleteOwned = Callable[[Mapping[str, Any], str, str, str], Awaitable[bool]]


def config_hash(config_json: str) -> str:
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Running, Ready, with an IP, and not on its way out."""
    meta, st = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or st.get("phase") != "Running" or not st.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


def pod_base(pod: Mapping[str, Any]) -> str:
    ip = (pod.get("status") or {})["podIP"]
    return f"http://[{ip}]:{PORT}" if ":" in ip else f"http://{ip}:{PORT}"


@dataclass
class PoolModel:
    """One CaffeModelService of the pool, as this pass sees it."""

    cr: dict[str, Any]
    spec: CaffeModelServiceSpec
    config_json: str
    memory_bytes: int
    measured: bool

    @property
    def name(self) -> str:
        return str(self.cr["metadata"]["name"])


@dataclass
class PoolPass:
    """What one pass found and did (for statuses, logs and tests)."""

    placement: Placement = field(default_factory=Placement)
    held: dict[str, set[str]] = field(default_factory=dict)  # pod → models it holds after the pass
    failures: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))  # model → pod → message
    measured: dict[str, int] = field(default_factory=dict)  # model → bytes a pod measured this pass


class PoolReconciler:
    def __init__(self, client: KubeClient, apply: Apply, post_event: PostEvent, server_image: str,
                 gateway_url: str | None = None, gateway_grpc_address: str | None = None,
                 repository: RepositoryClient | None = None, network_peers: Sequence[dict[str, Any]] | None = None,
                 delete_owned: DeleteOwned | None = None, model_cache_claim: str | None = None,
                 pod_tls_secret: str | None = None) -> None:
        self.client = client
        self.model_cache_claim = model_cache_claim  # the shared ONNX cache's PVC (pool_manifests.py), if any
        self.pod_tls_secret = pod_tls_secret  # the pool pods serve over TLS with it (the repository client knows)
        self.apply = apply
        self.post_event = post_event
        self.network_peers = network_peers  # None: the operator makes no NetworkPolicies
        self.delete_owned = delete_owned
        self._policy_swept: set[tuple[str, str]] = set()  # pools whose stale policy was looked for
        self.server_image = server_image
        self.gateway_url = gateway_url
        self.gateway_grpc_address = gateway_grpc_address
        self.repo = repository or RepositoryClient()
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._pending: set[tuple[str, str]] = set()
        self.known: set[tuple[str, str]] = set()

    async def close(self) -> None:
        await self.repo.close()

    async def reconcile(self, namespace: str, pool: str, logger: Any) -> PoolPass | None:
        """One pass over the pool (see the module docstring). Triggers that arrive while a pass runs
        coalesce into one more pass after it."""
        key = (namespace, pool)
        if self._locks[key].locked():
            self._pending.add(key)
            return None
        result = None
        while True:
            async with self._locks[key]:
                self._pending.discard(key)
                result = await self._pass(namespace, pool, logger)
            if key not in self._pending:
                return result

    # ----------------------------------------------------------------------------------------
    async def _pass(self, namespace: str, pool: str, logger: Any) -> PoolPass | None:
        cr = await self.client.get(object_path(POOL_KIND, namespace, pool))
        raw = (cr or {}).get("spec") or {}
        device = "cpu" if raw.get("device") == "cpu" else "gpu"
        models = await self._models(namespace, pool, device, str(raw.get("modelMountPath") or "/models"))
        if cr is None or cr["metadata"].get("deletionTimestamp"):
            self.known.discard((namespace, pool))
            for m in models:
                await self._write_model(m, pool, [], Readiness(
                    "False", "PoolNotFound", f"CaffeServingPool {pool} does not exist in namespace {namespace}"))
            return None
        self.known.add((namespace, pool))
        try:
            spec = parse_pool_spec(pool, cr.get("spec"))
        except InvalidSpec as e:
            await self._write_pool(cr, Readiness("False", "InvalidSpec", str(e)), None, [], models, PoolPass())
            for m in models:
                await self._write_model(m, pool, [], Readiness("False", "PoolInvalid", f"pool {pool}: {e}"))
            raise kopf.PermanentError(f"InvalidSpec: {e}") from None
        await self._network_policy(cr, namespace, pool, logger)
        deployment = pool_manifests.pool_deployment(pool, namespace, spec, self.server_image,
                                                    self.model_cache_claim, self.pod_tls_secret)
        kopf.append_owner_reference(deployment, owner=cr)  # type: ignore[arg-type]
        deployment, _ = await self.apply(deployment)
        pods = await self.client.list("Pod", namespace, pool_manifests.pool_selector_string(pool))
        live = sorted((p for p in pods if pod_ready(p)), key=lambda p: p["metadata"]["name"])
        result = PoolPass()

        # what each live pod holds now
        indexes = await asyncio.gather(*(self.repo.index(pod_base(p)) for p in live))
        holds: dict[str, set[str]] = {}
        answering = []
        for p, index in zip(live, indexes, strict=True):
            if index is None:
                logger.warning(f"pool pod {p['metadata']['name']} did not answer its repository index")
                continue
            answering.append(p)
            holds[p["metadata"]["name"]] = {e.name for e in index if e.state == STATE_READY}

        for m in models:
            m.memory_bytes = self._memory_estimate(m, spec)
        result.placement = place(
            [PodSlot(p["metadata"]["name"], spec.budget_bytes, frozenset(holds[p["metadata"]["name"]]))
             for p in answering],
            [ModelDemand(m.name, m.spec.replicas, m.memory_bytes) for m in models],
        )
        wanted = result.placement.by_pod()
        by_name = {m.name: m for m in models}
        await asyncio.gather(*(self._converge(p, holds[p["metadata"]["name"]],
                                              wanted.get(p["metadata"]["name"], set()), by_name, result,
                                              spec.device == "gpu", logger)
                               for p in answering))
        for m in models:
            pods_holding = sorted(p for p, held in result.held.items() if m.name in held)
            await self._write_model(m, pool, pods_holding, self._model_readiness(m, pods_holding, result, pool),
                                    result.measured.get(m.name))
        ready = self._pool_readiness(spec, deployment, live, result)
        await self._write_pool(cr, ready, deployment, live, models, result)
        return result

    async def _models(self, namespace: str, pool: str, device: str, mount_path: str) -> list[PoolModel]:
        """The valid CaffeModelServices that name this pool (an invalid one's own reconcile says why)."""
        out = []
        for cr in await self.client.list(KIND, namespace):
            if (cr.get("spec") or {}).get("pool") != pool or cr["metadata"].get("deletionTimestamp"):
                continue
            try:
                spec = parse_spec(cr["metadata"]["name"], cr.get("spec"))
            except InvalidSpec:
                continue
            placement = (cr.get("status") or {}).get("placement") or {}
            measured = bool(placement.get("measured")) and placement.get("pool") == pool
            out.append(PoolModel(cr, spec, pool_manifests.load_config(cr["metadata"]["name"], spec, device, mount_path,
                                                                 self.model_cache_claim),
                                 int(placement.get("memoryBytes") or 0) if measured else 0, measured))
        return out

    async def _network_policy(self, cr: dict[str, Any], namespace: str, pool: str, logger: Any) -> None:
        """The pool pods' NetworkPolicy before its pods, as for a model's own; with no peers, the one
        this operator made while it had them is deleted (looked for once per process, as reconcile.py does)."""
        if self.network_peers is not None:
            policy = pool_manifests.pool_network_policy(pool, namespace, list(self.network_peers))
            kopf.append_owner_reference(policy, owner=cr)  # type: ignore[arg-type]
            await self.apply(policy)
            self._policy_swept.discard((namespace, pool))
            return
        if self.delete_owned is None or (namespace, pool) in self._policy_swept:
            return
        name = pool_manifests.pool_name(pool)
        if await self.delete_owned(cr, "NetworkPolicy", namespace, name):
            logger.info(f"deleted NetworkPolicy {name}")
            await self.post_event(cr, "Normal", "NetworkPolicyRemoved", f"deleted NetworkPolicy {name}: the operator "
                                  "makes no NetworkPolicies now (the chart's networkPolicy.enabled is off)")
        self._policy_swept.add((namespace, pool))

    @staticmethod
    def _memory_estimate(m: PoolModel, spec: CaffeServingPoolSpec) -> int:
        if m.measured and m.memory_bytes > 0:
            return m.memory_bytes
        asked = ((m.spec.resources or {}).get("requests") or {}).get("memory")
        try:
            return quantity_bytes(str(asked)) if asked else quantity_bytes(spec.default_model_memory)
        except ValueError:
            return quantity_bytes(spec.default_model_memory)

    async def _converge(self, pod: dict[str, Any], held: set[str], wanted: set[str], models: dict[str, PoolModel],
                        result: PoolPass, gpu: bool, logger: Any) -> None:
        """Make one pod hold `wanted`: unlabel and unload the rest, (re)load what is missing or stale,
        label what it holds."""
        name, base = pod["metadata"]["name"], pod_base(pod)
        configs: dict[str, str] = json.loads(
            ((pod["metadata"].get("annotations") or {}).get(CONFIGS_ANNOTATION)) or "{}")
        drop = held - wanted
        stale = {m for m in held & wanted if configs.get(m) != config_hash(models[m].config_json)}
        labels_now = {k[len(pool_manifests.HOLDS_PREFIX):] for k, v in (pod["metadata"].get("labels") or {}).items()
                      if k.startswith(pool_manifests.HOLDS_PREFIX) and v == pool_manifests.LOADED}
        unlabel = (labels_now - held) | drop | stale
        if unlabel & labels_now:  # stop routing before unloading
            await self._label(pod, {m: None for m in unlabel & labels_now}, configs)
        for m in sorted(drop):
            ok, message = await self.repo.unload(base, m)
            logger.info(f"unloaded {m} from pool pod {name}" if ok else f"unloading {m} from {name}: {message}")
            configs.pop(m, None)
        now_held = held - drop - stale
        for m in sorted(wanted - now_held, key=lambda m: -models[m].memory_bytes):
            ok, message = await self.repo.load(base, m, models[m].config_json)
            if not ok:
                result.failures[m][name] = message
                logger.warning(f"loading {m} on pool pod {name} failed: {message}")
                configs.pop(m, None)
                continue
            logger.info(f"loaded {m} on pool pod {name}")
            configs[m] = config_hash(models[m].config_json)
            now_held.add(m)
            if (measured := await self.repo.memory(base, m, gpu)) is not None:
                result.measured[m] = measured
        result.held[name] = now_held
        add = {m: pool_manifests.LOADED for m in now_held if m not in labels_now or m in stale}
        if add or set(configs) != set(json.loads(
                ((pod["metadata"].get("annotations") or {}).get(CONFIGS_ANNOTATION)) or "{}")):
            await self._label(pod, add, configs)

    async def _label(self, pod: dict[str, Any], labels: Mapping[str, str | None], configs: dict[str, str]) -> None:
        meta = pod["metadata"]
        await self.client.merge_patch(object_path("Pod", meta["namespace"], meta["name"]), {"metadata": {
            "labels": {pool_manifests.holds_label(m): v for m, v in labels.items()},
            "annotations": {CONFIGS_ANNOTATION: json.dumps(configs, sort_keys=True)},
        }})

    @staticmethod
    def _model_readiness(m: PoolModel, pods: list[str], result: PoolPass, pool: str) -> Readiness:
        copies = m.spec.replicas
        if copies == 0:
            return Readiness("False", "ScaledToZero", "spec.replicas is 0: no pool pod holds the model")
        if failed := result.failures.get(m.name):
            text = "; ".join(f"pod {p}: {msg}" for p, msg in sorted(failed.items()))
            return Readiness("False", MODEL_LOAD_FAILED, f"{len(pods)}/{copies} copies loaded in pool {pool}; {text}")
        if why := result.placement.unschedulable.get(m.name):
            return Readiness("False", UNSCHEDULABLE, f"pool {pool}: {why}")
        if len(pods) < copies:
            return Readiness("False", "Progressing", f"{len(pods)}/{copies} copies loaded in pool {pool}")
        return Readiness("True", "Placed", f"{len(pods)}/{copies} copies loaded in pool {pool}")

    @staticmethod
    def _pool_readiness(spec: CaffeServingPoolSpec, deployment: dict[str, Any], live: list[dict[str, Any]],
                        result: PoolPass) -> Readiness:
        if result.placement.unschedulable:
            names = ", ".join(sorted(result.placement.unschedulable))
            return Readiness("False", UNSCHEDULABLE, f"models that fit on no pod: {names}")
        if failed := sorted(result.failures):
            return Readiness("False", MODEL_LOAD_FAILED, f"models that failed to load: {', '.join(failed)}")
        if len(live) < spec.replicas:
            return Readiness("False", "Progressing", f"{len(live)}/{spec.replicas} pods ready")
        return Readiness("True", "PodsReady", f"{len(live)}/{spec.replicas} pods ready")

    # ----------------------------------------------------------------------------------------
    async def _write_model(self, m: PoolModel, pool: str, pods: list[str], ready: Readiness,
                           measured: int | None = None) -> None:
        meta = m.cr["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        previous = m.cr.get("status") or {}
        memory = measured if measured is not None else (m.memory_bytes or None)
        placement = {"pool": pool, "pods": pods, "memoryBytes": memory,
                     "measured": measured is not None or (m.measured and bool(m.memory_bytes))}
        new = build_status(
            generation=meta.get("generation"), readiness_=ready, deployment=None, previous=previous,
            url=manifests.model_url(name, namespace, self.gateway_url, bool(self.pod_tls_secret)),
            grpc_address=manifests.grpc_address(name, namespace, m.spec, self.gateway_grpc_address),
            selector=pool_manifests.model_selector_string(pool, name), placement=placement,
            replicas=(len(pods), len(pods)),
        )
        if same_status(previous, new):
            return
        await self.client.merge_patch(object_path(KIND, namespace, name, "status"),
                                      {"status": status_patch(previous, new)})
        old: dict[str, Any] = next((c for c in previous.get("conditions") or [] if c.get("type") == READY), {})
        if (old.get("status"), old.get("reason")) != (ready.status, ready.reason):
            kind = "Normal" if ready.status == "True" else "Warning"
            await self.post_event(m.cr, kind, ready.reason, ready.message)

    async def _write_pool(self, cr: dict[str, Any], ready: Readiness, deployment: dict[str, Any] | None,
                          live: list[dict[str, Any]], models: list[PoolModel], result: PoolPass) -> None:
        meta = cr["metadata"]
        previous = cr.get("status") or {}
        memory = {m.name: result.measured.get(m.name, m.memory_bytes) for m in models}
        budget = 0
        try:
            budget = parse_pool_spec(meta["name"], cr.get("spec")).budget_bytes
        except InvalidSpec:
            pass
        st = (deployment or {}).get("status") or {}
        new = {
            "observedGeneration": meta.get("generation"),
            "conditions": [ready_condition(ready, meta.get("generation"), previous.get("conditions"))],
            "replicas": st.get("replicas", 0),
            "readyReplicas": len(live),
            "selector": pool_manifests.pool_selector_string(meta["name"]),
            "models": len(models),
            "unschedulable": sorted(result.placement.unschedulable) or None,
            "pods": [{"name": p["metadata"]["name"], "ready": True,
                      "models": sorted(result.held.get(p["metadata"]["name"], set())),
                      "memoryBytes": sum(memory.get(m, 0) for m in result.held.get(p["metadata"]["name"], set())),
                      "budgetBytes": budget} for p in live],
        }
        if same_status(previous, new):
            return
        patch = dict(new)
        await self.client.merge_patch(object_path(POOL_KIND, meta["namespace"], meta["name"], "status"),
                                      {"status": patch})

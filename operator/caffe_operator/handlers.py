"""The kopf handlers: thin wiring from events to `Reconciler` (reconcile.py).

Triggers, all ending in the same level-based reconcile of one CaffeModelService:
- the CR is created, updated (spec or metadata) or found at startup (resume);
- one of its children (labelled managed-by caffe-serving-operator) changes or disappears: a
  hand edit or deletion is undone, and the Deployment's ready replicas reach the CR status;
- a periodic resync of every model this process has seen (CAFFESERVE_RESYNC_SECONDS, default
  300), a safety net for missed events. (Not a kopf timer: kopf gives timers a finalizer.)
- for a CaffeServingPool (pool_reconcile.py): the pool created, updated, resumed or deleted, one of
  its pods changing (one that dies has its models placed again), a model of it deleted;
- a follow-up look at a model that is not ready for no known reason (its pods loading or not
  answering yet; reconcile.py), so that a model that fails to load says so without a spec change.

A spec the operator cannot serve ends in `kopf.PermanentError` (after the InvalidSpec status and
event are written): kopf does not retry it; the next spec change does. No delete handler, hence
no finalizer: deleting the CR leaves the children to Kubernetes' garbage collector (ownerReferences).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import kopf

from caffe_operator import manifests, pool_manifests
from caffe_operator.api import GROUP, PLURAL, VERSION
from caffe_operator.kube import ApiError, KubeClient
from caffe_operator.pool_api import POOL_PLURAL
from caffe_operator.reconcile import OperatorConfig, Reconciler

CR = (GROUP, VERSION, PLURAL)
POOL = (GROUP, VERSION, POOL_PLURAL)
CHILDREN = {"app.kubernetes.io/managed-by": manifests.MANAGED_BY}
RESYNC_SECONDS = float(os.environ.get("CAFFESERVE_RESYNC_SECONDS", "300"))
RETRY_BACKOFF_SECONDS = 10
CRD_WAIT_SECONDS = float(os.environ.get("CAFFESERVE_CRD_WAIT_SECONDS", "120"))


async def wait_for_crd(client: KubeClient, timeout_s: float, logger: kopf.Logger) -> None:
    """Until the API serves caffemodelservices (the CRD is installed and established)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        found = await client.get(f"/apis/{GROUP}/{VERSION}")
        if found and any(r.get("name") == PLURAL for r in found.get("resources", [])):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise kopf.PermanentError(f"the API does not serve {PLURAL}.{GROUP}/{VERSION}: install crds/ first")
        logger.warning(f"waiting for the {PLURAL}.{GROUP} CRD")
        await asyncio.sleep(2)


def login(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo | None:
    """A kubeconfig when one is given (KUBECONFIG / --kubeconfig), else the pod's service account."""
    if os.environ.get("KUBECONFIG"):
        return kopf.login_with_kubeconfig(settings=settings)
    return kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)


@kopf.on.login()
def on_login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    return login(settings)


@kopf.on.startup()
async def on_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    # Our own annotation prefix for kopf's bookkeeping on the CR; no finalizer is ever added.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.reporting_component = manifests.MANAGED_BY
    settings.posting.event_name_prefix = "caffe-serving-"
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 600  # re-list now and then, as client-go informers do
    # No cluster-wide watching of namespaces and CRDs (least privilege: a namespaced install needs
    # no cluster-scoped read); kopf serves the resources it finds at startup, so wait for ours.
    settings.scanning.disabled = True
    config = OperatorConfig.from_env()
    memo.client = KubeClient(login=lambda: login(settings))
    await wait_for_crd(memo.client, CRD_WAIT_SECONDS, logger)
    memo.reconciler = Reconciler(memo.client, config)
    memo.resync = asyncio.get_running_loop().create_task(memo.reconciler.resync_forever(RESYNC_SECONDS, logger))
    logger.info(f"server image {config.server_image}; model URLs via {config.gateway_url or 'the model Services'}"
                + (f"; pods serve over TLS with Secret {config.pod_tls_secret}" if config.pod_tls_secret else ""))


@kopf.on.cleanup()
async def on_cleanup(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "resync", None) is not None:
        memo.resync.cancel()
    if getattr(memo, "reconciler", None) is not None:
        await memo.reconciler.close()
    if getattr(memo, "client", None) is not None:
        await memo.client.close()


@contextlib.contextmanager
def api_weather_retried() -> Iterator[None]:
    """The API server failing (429, 5xx, a cut connection) is weather, not a bug: kopf retries a
    TemporaryError after the backoff with one log line, where any other exception logs a traceback."""
    try:
        yield
    except ApiError as e:
        raise kopf.TemporaryError(f"the API server answered {e}; retrying", delay=RETRY_BACKOFF_SECONDS) from None


@kopf.on.resume(*CR, backoff=RETRY_BACKOFF_SECONDS)
@kopf.on.create(*CR, backoff=RETRY_BACKOFF_SECONDS)
@kopf.on.update(*CR, backoff=RETRY_BACKOFF_SECONDS)
async def on_spec(name: str, namespace: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    assert namespace is not None  # CaffeModelServices are namespaced
    with api_weather_retried():
        outcome = await memo.reconciler.reconcile_named(namespace, name, logger)
    if outcome is not None and outcome.invalid:
        raise kopf.PermanentError(f"InvalidSpec: {outcome.invalid}")


@kopf.on.event("apps", "v1", "deployments", labels=CHILDREN)
@kopf.on.event("v1", "services", labels=CHILDREN)
@kopf.on.event("v1", "configmaps", labels=CHILDREN)
async def on_child(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    model = (body.metadata.labels or {}).get(manifests.MODEL_LABEL)
    if model and body.metadata.namespace:
        try:
            await memo.reconciler.reconcile_named(body.metadata.namespace, model, logger)
        except ApiError as e:
            # An event handler is not retried by kopf (it would log a traceback and drop it): the
            # API failing (429, 5xx) is expected weather, and the next event or the resync retries.
            logger.warning("reconcile of %s/%s after a change to %s failed: %s; the next event or the resync "
                           "(every %g s) tries again", body.metadata.namespace, model, body.metadata.name, e,
                           RESYNC_SECONDS)


# Model pods' NetworkPolicies are children only when the chart turns them on (networkPolicy.enabled);
# only then does the operator watch them (and need RBAC for them).
if os.environ.get("CAFFESERVE_NETWORK_POLICY_FROM", "").strip():
    kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=CHILDREN)(on_child)


@kopf.on.resume(*POOL, backoff=RETRY_BACKOFF_SECONDS)
@kopf.on.create(*POOL, backoff=RETRY_BACKOFF_SECONDS)
@kopf.on.update(*POOL, backoff=RETRY_BACKOFF_SECONDS)
async def on_pool(name: str, namespace: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    assert namespace is not None
    with api_weather_retried():
        await memo.reconciler.pools.reconcile(namespace, name, logger)


async def _pool_later(memo: kopf.Memo, namespace: str, pool: str, logger: kopf.Logger, why: str) -> None:
    """A pool pass from an event handler (kopf retries none of these): a failure is logged, the next
    event or the resync tries again."""
    try:
        await memo.reconciler.pools.reconcile(namespace, pool, logger)
    except (ApiError, kopf.PermanentError) as e:
        logger.warning("reconcile of pool %s/%s after %s failed: %s", namespace, pool, why, e)


@kopf.on.event("v1", "pods", labels={pool_manifests.POOL_LABEL: kopf.PRESENT})
async def on_pool_pod(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    pool = (body.metadata.labels or {}).get(pool_manifests.POOL_LABEL)
    if pool and body.metadata.namespace:
        await _pool_later(memo, body.metadata.namespace, pool, logger, f"a change to pod {body.metadata.name}")


@kopf.on.event(*POOL)
@kopf.on.event(*CR)
async def on_deleted(type: str, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """A pool deleted (its models say so), or a pool model deleted (the pool unloads it)."""
    if type != "DELETED" or not body.metadata.namespace:
        return
    pool = body.metadata.name if body.get("kind") == "CaffeServingPool" else (body.get("spec") or {}).get("pool")
    if pool:
        await _pool_later(memo, body.metadata.namespace, pool, logger, f"{body.get('kind')} {body.metadata.name} went")

"""The operator and the gateway against a real control plane under faults: an API server restart,
an etcd restart, expired watches (410 Gone, from the API server itself), and a minute of API errors
(429/500) with a cut watch. After each they converge, with no duplicate children, and then stay
quiet: their requests are counted over a quiet minute.

The stack (caffe_testing/kubestack.py): etcd, kube-apiserver, kube-controller-manager and
kube-scheduler built by scripts/kube/build.sh; the chart installed by real Helm for its RBAC; the
operator and the gateway as local processes with their ServiceAccounts' tokens, their kubeconfigs
pointing at a TLS proxy in front of the API server (caffe_testing/faults.py) that forwards every
request, counts them and injects what the test asks. Model pods are the node agent's fake pods
(scheduled, Running and Ready, no process): the gateway's discovery sees their real EndpointSlices.

How the 410 is made, the real way: the API server's watch cache starts at etcd's current revision
when the API server starts, so a watch from an older resourceVersion is answered "too old resource
version" (410). The proxy holds the clients' watches (cut, and new ones kept waiting) while the
test changes things and restarts the API server; released, they ask with their old
resourceVersions and the API server answers 410. (Compacting etcd alone does not do it with the
watch cache on, as a cluster runs it: the cache still serves the window; tried.)

No kmock here: every fault is the real control plane's or the proxy's in front of it.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from caffe_testing.cms import ready
from caffe_testing.kubeclient import ApiError
from caffe_testing.kubestack import KubeStack, model

pytestmark = pytest.mark.timeout(600)

CMS = "caffeserving.io/v1alpha1/caffemodelservices"
KIND_SUFFIX = {"v1/configmaps": "-config", "apps/v1/deployments": "-predictor", "v1/services": "-predictor"}
NS = "faults"
QUIET_S = 60.0
OPERATOR, GATEWAY = ("kopf", "caffe-serving-operator"), ("caffeserve-gateway",)


@pytest.fixture(scope="module")
def stack():
    with KubeStack() as s:
        s.cp.create_namespace(NS)
        s.want = {"alpha": 1, "beta": 1, "gamma": 1}
        for name, replicas in s.want.items():
            s.apply(model(name, NS, replicas=replicas))
        converge(s, "the first three models")
        yield s


def by(seen: list, agents: tuple[str, ...]) -> list:
    return [s for s in seen if s.agent.startswith(agents)]


def state(s: KubeStack) -> str:
    """'' when everything says what s.want says, else what does not (for the timeout message)."""
    try:
        crs = {c["metadata"]["name"]: c for c in s.cp.list_objects(CMS, NS)}
    except (ApiError, OSError) as e:  # e.g. 429 "storage is (re)initializing" just after a restart
        return f"listing the CRs: {e}"
    if sorted(crs) != sorted(s.want):
        return f"CRs {sorted(crs)}"
    for name, replicas in s.want.items():
        cr = crs[name]
        cr.setdefault("status", {})
        if ready(cr).get("status") != "True" or cr["status"].get("observedGeneration") != cr["metadata"]["generation"]:
            return f"{name}: {ready(cr)} observedGeneration {cr['status'].get('observedGeneration')}"
        if cr["status"].get("readyReplicas") != replicas:
            return f"{name}: status.readyReplicas {cr['status'].get('readyReplicas')} != {replicas}"
    routed = s.gateway_models()
    return "" if routed == sorted(s.want) else f"the gateway routes {routed}"


def converge(s: KubeStack, what: str, timeout: float = 180) -> float:
    start = time.monotonic()
    try:
        s.cp.wait_for(lambda: not state(s), timeout=timeout, interval=1.0, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}: {state(s)}\n{s.logs()[-8000:]}") from None
    return time.monotonic() - start


def assert_no_duplicates(s: KubeStack) -> None:
    """One ConfigMap, Deployment and Service per CR, owned by it; one ReplicaSet per Deployment (no
    rollout that nothing asked for); as many pods as replicas."""
    uids = {c["metadata"]["name"]: c["metadata"]["uid"] for c in s.cp.list_objects(CMS, NS)}
    for resource, suffix in KIND_SUFFIX.items():
        objs = [o for o in s.cp.list_objects(resource, NS) if o["metadata"].get("ownerReferences")]
        names = sorted(o["metadata"]["name"] for o in objs)
        assert names == sorted(n + suffix for n in s.want), (resource, names)
        for o in objs:
            (ref,) = o["metadata"]["ownerReferences"]
            assert ref["uid"] == uids[o["metadata"]["name"].rsplit("-", 1)[0]]
    replicasets = Counter(
        r["metadata"]["ownerReferences"][0]["name"] for r in s.cp.list_objects("apps/v1/replicasets", NS)
    )
    assert replicasets == Counter(f"{n}-predictor" for n in s.want), replicasets
    pods = Counter(p["metadata"]["labels"].get("caffeserving.io/model") for p in s.cp.list_objects("v1/pods", NS)
                   if not p["metadata"].get("deletionTimestamp"))
    assert pods == Counter(s.want), pods


def assert_quiet(s: KubeStack, fault: str) -> dict[str, Any]:
    """A quiet minute after recovery: the operator's and the gateway's requests stay those of idle
    controllers (a watch kept open; the operator's resync, every 300 s, reads each model once)."""
    start = time.monotonic()
    time.sleep(QUIET_S)
    seen = s.proxy.requests(since=start)
    op, gw = by(seen, OPERATOR), by(seen, GATEWAY)
    figures = {"fault": fault, "operator": len(op), "gateway": len(gw),
               "operator by request": Counter(f"{r.method} {r.path}" for r in op).most_common(4)}
    print(f"\nquiet {QUIET_S:.0f} s after {fault}: {figures}")
    assert len(op) <= 12 * len(s.want), figures  # the resync: ~8 reads per model
    assert len(gw) <= 3, figures
    failed = [r for r in op + gw if r.status is None or (r.status >= 400 and r.status != 404)]
    assert not failed, failed  # 404: the optional canary Deployment and KEDA's API, looked up on purpose
    assert not state(s), state(s)
    return figures


def rewatched(s: KubeStack, since: float) -> dict[str, set[str]]:
    """The watches opened (and answered 200, not 410) since `since`, by client."""
    seen = s.proxy.requests(since=since)
    return {who: {r.path for r in by(seen, agents) if r.watch and r.status == 200 and not r.gone}
            for who, agents in (("operator", OPERATOR), ("gateway", GATEWAY))}


WATCHED = {"operator": {"/apis/caffeserving.io/v1alpha1/caffemodelservices", "/apis/apps/v1/deployments",
                        "/api/v1/services", "/api/v1/configmaps",
                        # the pools (CaffeServingPool) and their pods (labelled with their pool)
                        "/apis/caffeserving.io/v1alpha1/caffeservingpools", "/api/v1/pods"},
           "gateway": {"/apis/discovery.k8s.io/v1/endpointslices"}}


def delete_a_pod(s: KubeStack, name: str) -> str:
    """Delete one of the model's pods: the ReplicaSet controller replaces it and its EndpointSlice
    changes (what the gateway must notice)."""
    pod = s.cp.list_objects("v1/pods", NS, labelSelector=f"caffeserving.io/model={name}")[0]["metadata"]["name"]
    s.cp.delete("v1/pods", NS, pod)
    return pod


def test_an_api_server_restart(stack):
    s = stack
    t = time.monotonic()
    s.cp.restart("kube-apiserver", down_s=5)
    back = time.monotonic()
    s.want["beta"] = 2
    s.apply(model("beta", NS, replicas=2))  # seen only through a watch opened after the restart
    took = converge(s, "convergence after an API server restart")
    # the gateway's reconnect backs off (up to 30 s), and nothing it routes by name changed: wait for it
    s.cp.wait_for(lambda: rewatched(s, t) == WATCHED, timeout=60, what="both watching again")
    assert_no_duplicates(s)
    print(f"\nAPI server restart: down {back - t:.1f} s, converged {took:.1f} s after it answered")
    assert_quiet(s, "an API server restart")


def test_an_etcd_restart(stack):
    s = stack
    t = time.monotonic()
    s.cp.restart("etcd", down_s=5)
    s.cp.wait_ready(60)
    back = time.monotonic()
    s.want["gamma"] = 2
    s.apply(model("gamma", NS, replicas=2))
    delete_a_pod(s, "alpha")
    took = converge(s, "convergence after an etcd restart")
    assert_no_duplicates(s)
    print(f"\netcd restart: API ready again after {back - t:.1f} s, converged {took:.1f} s after")
    assert_quiet(s, "an etcd restart")


def test_expired_watches_are_answered_410_and_the_clients_list_again(stack):
    s = stack
    t = time.monotonic()
    with s.proxy.holding_watches() as cut:
        assert set(cut) == WATCHED["operator"] | WATCHED["gateway"], cut
        s.want["beta"] = 3
        s.apply(model("beta", NS, replicas=3))  # while nobody watches
        gone_pod = delete_a_pod(s, "gamma")
        time.sleep(3)
        s.cp.restart("kube-apiserver", down_s=1)  # its watch cache now starts after their resourceVersions
        released = time.monotonic()
    took = converge(s, "convergence after expired watches")
    seen = s.proxy.requests(since=t)
    for who, agents in (("operator", OPERATOR), ("gateway", GATEWAY)):
        gone = {r.path for r in by(seen, agents) if r.watch and r.gone}
        assert gone == WATCHED[who], f"the API server answered 410 to the {who}'s watches of {gone}"
        listed = {r.path for r in by(seen, agents) if not r.watch and r.method == "GET" and r.at > released
                  and r.status == 200 and r.path in WATCHED[who]}
        assert listed == WATCHED[who], f"the {who} listed {listed} again after the 410s"
        assert rewatched(s, released)[who] == WATCHED[who]
    assert all(gone_pod != p["metadata"]["name"] for p in s.cp.list_objects("v1/pods", NS))
    assert_no_duplicates(s)
    print(f"\n410: converged {took:.1f} s after the watches were released")
    assert_quiet(s, "expired watches (410)")


def test_a_minute_of_api_errors_and_a_cut_watch(stack):
    """The API-fault injection of the emulator days, now in front of the real API server: 30% of
    the operator's and gateway's requests fail (429 + Retry-After, or 500) for a minute, and the
    CaffeModelServices watch is cut; meanwhile models are created and one is updated."""
    s = stack
    fault_s = 60.0
    t = time.monotonic()
    s.proxy.fail(fault_s, rate=0.3)
    cut = s.proxy.cut_watches("caffemodelservices")
    assert cut == ["/apis/caffeserving.io/v1alpha1/caffemodelservices"], cut
    for name in ("delta", "epsilon"):
        s.want[name] = 1
        s.apply(model(name, NS))
    time.sleep(15)
    s.want["delta"] = 2
    s.apply(model("delta", NS, replicas=2))  # an update during the faults
    time.sleep(max(0.0, fault_s - (time.monotonic() - t)))
    during = s.proxy.requests(since=t)
    injected = [r for r in during if r.injected]
    assert len(injected) >= 10 and {r.status for r in injected} == {429, 500}
    took = converge(s, "convergence after a minute of API errors")
    assert_no_duplicates(s)
    assert s.cp.get_object(CMS, NS, "delta")["metadata"]["generation"] == 2
    op = by(during, OPERATOR)
    per_second = Counter(int(r.at - t) for r in op)
    print(f"\nAPI errors: operator {len(op)} requests in {fault_s:.0f} s ({len(by(injected, OPERATOR))} failed), "
          f"busiest second {max(per_second.values())}; converged {took:.1f} s after the faults")
    assert len(op) < 20 * fault_s and max(per_second.values()) < 60  # a controller's pace, not a hot loop
    assert_quiet(s, "a minute of API errors")
    assert "Traceback" not in s.operator.logs(), s.operator.logs()[-3000:]


def test_a_create_refused_past_the_clients_retries_is_retried_by_kopf_in_one_line(stack):
    """The case a minute of random faults once hit (CI, 2026-12-07): the API server refuses a child's
    create more times than the operator's client retries, so the error reaches kopf's create handler.
    kopf retries it after the backoff, and the log says so in one line: no traceback for weather."""
    s = stack
    # the client tries 4 times (3 retries); 8 refusals fail the handler once even if the resync takes some
    s.proxy.refuse_next("POST", f"/namespaces/{NS}/configmaps", times=8)
    s.want["zeta"] = 1
    s.apply(model("zeta", NS))
    converge(s, "a model whose ConfigMap create was refused eight times")
    assert s.proxy.refused_left() == 0
    assert_no_duplicates(s)
    logs = s.operator.logs()
    assert "Handler 'on_spec' failed temporarily: the API server answered HTTP 500 InternalError" in logs, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]

"""The operator under API faults: for a minute 30% of its requests fail (429 + Retry-After, or
500) and one of its watches is cut; it converges all the same.

Faults are injected by the emulator's own handler (caffe_testing.faults.FaultyApiServer, which says
why not a proxy), and only into the operator's requests: kubectl and the test's reads pass.
What "converges" means here: the children exist once each and match the spec (including an
update made during the faults), the status says what the Deployments say with the right
observedGeneration, the operator's request rate stays that of a controller (no hot loop), and the
events stay few.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from caffe_testing.cluster import CMS, CONFIGMAPS, DEPLOYMENTS, EVENTS, REPO, SERVICES, Cluster, OperatorProcess
from caffe_testing.cms import cms, eventually, play_kubelet, ready
from caffe_testing.faults import FaultyApiServer

FAULT_S = 60.0
NAMES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def faulty():
    with Cluster(api_server_cls=FaultyApiServer) as cluster:
        cluster.kubectl("apply", "--validate=false", "-f", str(REPO / "crds" / "caffemodelservices.yaml"))
        op = OperatorProcess(cluster, all_namespaces=True, env={"CAFFESERVE_RESYNC_SECONDS": "5"}).start()
        try:
            yield cluster, op
        finally:
            op.stop()


def test_the_operator_converges_after_a_minute_of_api_faults_without_a_hot_loop(faulty):
    cluster, op = faulty
    api = cluster.api
    ns = "faults"
    cluster.in_loop(lambda: api.start_faults(FAULT_S, rate=0.3, drop_watches=1))
    started = time.monotonic()
    for name in NAMES:
        cluster.apply(cms(name, ns, runtime={"device": "cpu"}))
    time.sleep(15)
    cluster.apply(cms("beta", ns, replicas=2, runtime={"device": "cpu"}))  # an update during the faults
    time.sleep(10)
    if cluster.get_object(DEPLOYMENTS, ns, "alpha-predictor"):
        play_kubelet(cluster, ns, "alpha", 1)  # alpha's pod becomes ready during the faults
    time.sleep(max(0.0, FAULT_S - (time.monotonic() - started)))
    seen = cluster.in_loop(lambda: list(api.seen))
    injected = [s for s in seen if s.injected]
    assert len(injected) >= 10 and {s.injected for s in injected} == {429, 500}
    assert cluster.in_loop(lambda: api.dropped_watches) == 1, "no watch was cut"
    (cut,) = cluster.in_loop(lambda: list(api.cut))
    assert any(s.watch and s.path == cut and s.at > started and not s.injected for s in seen), \
        f"the operator did not watch {cut} again after it was cut"

    # converges: children once each, matching the spec; status as the Deployments say
    if not cluster.get_object(DEPLOYMENTS, ns, "alpha-predictor")["status"].get("readyReplicas"):
        play_kubelet(cluster, ns, "alpha", 1)

    def converged():
        crs = {n: cluster.get_object(CMS, ns, n) for n in NAMES}
        want = {"alpha": ("True", None), "beta": ("False", "Progressing"), "gamma": ("False", "Progressing")}
        for n, cr in crs.items():
            cond = ready(cr)
            if not cond or cond["status"] != want[n][0] or (want[n][1] and cond["reason"] != want[n][1]):
                return None
            if cr["status"].get("observedGeneration") != cr["metadata"]["generation"]:
                return None
        dep = cluster.get_object(DEPLOYMENTS, ns, "beta-predictor")
        return crs if dep and dep["spec"]["replicas"] == 2 else None

    crs = eventually(op, converged, "convergence after the faults", timeout=60)
    converged_at = time.monotonic()
    for resource in (CONFIGMAPS, DEPLOYMENTS, SERVICES):
        objs = cluster.list_objects(resource, ns)
        names = sorted(o["metadata"]["name"] for o in objs)
        suffix = "-config" if resource == CONFIGMAPS else "-predictor"
        assert names == sorted(n + suffix for n in NAMES), (resource, names)  # no duplicates
        for o in objs:
            (ref,) = o["metadata"]["ownerReferences"]
            assert ref["uid"] == crs[o["metadata"]["name"].rsplit("-", 1)[0]]["metadata"]["uid"]
    assert crs["beta"]["metadata"]["generation"] == 2

    # no hot loop: a controller's pace during the faults, and quiet once converged
    during = [s for s in seen if s.at <= started + FAULT_S]
    per_second = Counter(int(s.at - started) for s in during)
    time.sleep(10)
    after = cluster.in_loop(lambda: [s for s in api.seen if s.at > converged_at])
    print(f"cut watch: {cut} of {cluster.in_loop(lambda: api.open_at_start)}")
    print(f"operator requests: {len(during)} in the {FAULT_S:.0f} s of faults ({len(injected)} failed), "
          f"busiest second {max(per_second.values())}, {len(after)} in the 10 s after converging")
    assert len(during) < 20 * FAULT_S, f"{len(during)} requests in {FAULT_S} s"
    assert max(per_second.values()) < 60
    assert len(after) < 60, Counter((s.method, s.path) for s in after).most_common(5)

    # events not flooded
    per_object = Counter(e["involvedObject"]["name"] for e in cluster.list_objects(EVENTS, ns))
    print(f"events per object: {dict(per_object)}")
    assert all(count <= 15 for count in per_object.values()), per_object
    assert "Traceback" not in op.logs(), op.logs()[-3000:]

"""Per-model NetworkPolicies through the operator, against the API emulator: every model pod, of
either variant, is behind one, and they go when the chart turns the setting off.

The chart's `networkPolicy.enabled` reaches the operator as CAFFESERVE_NETWORK_POLICY_FROM (the
peers allowed in); a `helm upgrade` that turns it off restarts the operator without it. Each test
here starts its own operator so that it can restart one with other settings, as the upgrade does.
The emulator enforces no policy (nothing does without a CNI plugin): what a user sees is which
policies exist and which pods their selectors pick.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from caffe_testing.cluster import DEPLOYMENTS, SERVICES, OperatorProcess
from caffe_testing.cms import events, eventually
from caffe_testing.digits import DIGITS_DIR

pytestmark = pytest.mark.timeout(120)

POLICIES = "networking.k8s.io/v1/networkpolicies"
PEERS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "caffe-system"}},
          "podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}]
ON = {"CAFFESERVE_NETWORK_POLICY_FROM": json.dumps(PEERS), "CAFFESERVE_LOAD_RECHECK_SECONDS": "0"}
OFF = {"CAFFESERVE_NETWORK_POLICY_FROM": "", "CAFFESERVE_LOAD_RECHECK_SECONDS": "0"}


@pytest.fixture()
def operator(cluster):
    """One operator per test (a test here restarts it with other settings, as a chart upgrade does)."""
    op = OperatorProcess(cluster, all_namespaces=True, env=ON).start()
    yield op
    op.stop()
    assert "Traceback" not in op.logs(), op.logs()[-5000:]


@pytest.fixture()
def ns(request, operator) -> str:
    return re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_"))[:40].strip("-")


def digits(ns: str, **extra) -> dict:
    doc = yaml.safe_load((DIGITS_DIR / "service.yaml").read_text())
    doc["metadata"] = {"name": "digits", "namespace": ns}
    doc["spec"].update(extra)
    return doc


def with_canary(ns: str) -> dict:
    doc = digits(ns)
    doc["spec"]["canary"] = {"model": dict(doc["spec"]["model"], version="2"), "trafficPercent": 10}
    return doc


def selects(policy: dict, pod_labels: dict) -> bool:
    """Whether the policy's podSelector (matchLabels) picks a pod with these labels."""
    wanted = policy["spec"]["podSelector"].get("matchLabels") or {}
    return all(pod_labels.get(k) == v for k, v in wanted.items())


def guarded(cluster, ns: str, deployment: str) -> list[str]:
    """The NetworkPolicies in `ns` that select the pods of `deployment`."""
    labels = cluster.get_object(DEPLOYMENTS, ns, deployment)["spec"]["template"]["metadata"]["labels"]
    return sorted(p["metadata"]["name"] for p in cluster.list_objects(POLICIES, ns) if selects(p, labels))


def own_policy(ns: str, name: str) -> dict:
    """A NetworkPolicy of the user's own (no owner)."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}


def test_the_canarys_pods_are_behind_a_network_policy_too(cluster, operator, ns):
    cluster.apply(with_canary(ns))
    eventually(operator, lambda: cluster.get_object(SERVICES, ns, "digits-canary"), "the canary's children")
    assert guarded(cluster, ns, "digits-predictor") == ["digits-predictor"]
    assert guarded(cluster, ns, "digits-canary") == ["digits-canary"]
    policy = cluster.get_object(POLICIES, ns, "digits-canary")
    assert policy["spec"]["ingress"][0]["from"] == PEERS
    assert policy["metadata"]["ownerReferences"][0]["name"] == "digits"

    cluster.apply(digits(ns))  # roll back: the canary's policy goes with its pods
    eventually(operator, lambda: cluster.get_object(POLICIES, ns, "digits-canary") is None
               and cluster.get_object(DEPLOYMENTS, ns, "digits-canary") is None, "the canary and its policy deleted")
    assert guarded(cluster, ns, "digits-predictor") == ["digits-predictor"]

    # a policy the operator did not make is never deleted, even under a name it would use
    cluster.apply(own_policy(ns, "digits-canary"))
    cluster.apply(digits(ns, replicas=3))
    eventually(operator, lambda: cluster.get_object(DEPLOYMENTS, ns, "digits-predictor")["spec"]["replicas"] == 3,
               "a reconcile after the user's policy appeared")
    assert cluster.get_object(POLICIES, ns, "digits-canary") is not None


def test_turning_the_setting_off_deletes_the_operators_policies_and_nothing_else(cluster, operator, ns):
    cluster.apply(with_canary(ns))
    eventually(operator, lambda: cluster.get_object(SERVICES, ns, "digits-canary"), "the canary's children")
    assert cluster.get_object(POLICIES, ns, "digits-predictor") is not None
    cluster.apply(own_policy(ns, "allow-monitoring"))

    # `helm upgrade --set networkPolicy.enabled=false`: the operator restarts without peers
    operator.stop()
    with OperatorProcess(cluster, all_namespaces=True, env=OFF) as off:
        names = lambda: [p["metadata"]["name"] for p in cluster.list_objects(POLICIES, ns)]  # noqa: E731
        eventually(off, lambda: names() == ["allow-monitoring"], "the operator's policies deleted, the user's kept")
        eventually(off, lambda: "NetworkPolicyRemoved" in [r for _, r, _ in events(cluster, ns, "digits")],
                   "an event saying so")
        # the model keeps serving: its other children are untouched
        for name in ("digits-predictor", "digits-canary"):
            assert cluster.get_object(DEPLOYMENTS, ns, name) is not None
            assert cluster.get_object(SERVICES, ns, name) is not None
    assert "Traceback" not in off.logs(), off.logs()[-5000:]

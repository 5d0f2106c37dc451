"""A model's variants through the pure builders (variants.py, manifests.py, traffic.py): the canary's
children are built like the primary's from its own spec, autoscaled like the primary's, and
guarded by a NetworkPolicy that selects exactly its pods. No cluster needed.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from caffe_operator import api, manifests, traffic, variants
from caffe_operator.reconcile import drift_patch
from caffe_testing.keda import unknown_fields
from inference_server import slices

SHA = "ab" * 32
GATEWAY = "http://caffe-serving-gateway.caffe-system.svc:8080"
PEERS = [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}]
AUTOSCALING = {"minReplicas": 0, "maxReplicas": 3, "target": 2, "coldStartTimeoutSeconds": 120}


def spec(**changes: Any) -> api.CaffeModelServiceSpec:
    model = {"prototxt": "deploy.prototxt", "weights": "digits.caffemodel", "weightsSha256": SHA}
    raw: dict[str, Any] = {
        "source": {"pvc": {"claimName": "models"}},
        "model": model,
        "replicas": 2,
        "canary": {"model": dict(model, weights="digits-v2.caffemodel", version="2"), "trafficPercent": 10,
                   "replicas": 1},
    }
    raw.update(changes)
    return api.parse_spec("digits", raw)


def built(s: api.CaffeModelServiceSpec, peers: list | None = None) -> dict[str, manifests.Children]:
    return {v.name: manifests.children(v, "ml", "img:1", peers) for v in variants.of("digits", s)}


def selects(selector: dict[str, str], pod_labels: dict[str, str]) -> bool:
    """matchLabels, as Kubernetes applies it."""
    return all(pod_labels.get(k) == v for k, v in selector.items())


def pod_labels(kids: manifests.Children) -> dict[str, str]:
    return kids.deployment["spec"]["template"]["metadata"]["labels"]


def test_the_canary_is_built_from_its_own_spec_under_its_own_names():
    kids = built(spec(), PEERS)
    assert list(kids) == ["primary", "canary"]
    canary = kids["canary"]
    assert [(o["kind"], o["metadata"]["name"]) for o in canary.all()] == [
        ("NetworkPolicy", "digits-canary"), ("ConfigMap", "digits-canary-config"),
        ("Deployment", "digits-canary"), ("Service", "digits-canary")]
    for obj in (o for k in kids.values() for o in k.all()):
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
        assert obj["metadata"]["labels"][slices.MODEL_LABEL] == "digits"  # the operator and the gateway find it
    config = yaml.safe_load(canary.config_map["data"]["config.yaml"])
    assert (config["name"], config["version"], config["model"]["weights"]) == \
        ("digits", "2", "/models/digits-v2.caffemodel")
    pod = canary.deployment["spec"]["template"]["spec"]
    assert {"name": "config", "configMap": {"name": "digits-canary-config"}} in pod["volumes"]
    assert canary.deployment["spec"]["replicas"] == 1 and kids["primary"].deployment["spec"]["replicas"] == 2


def config_hash(kids: manifests.Children) -> str:
    return kids.deployment["spec"]["template"]["metadata"]["annotations"][manifests.CONFIG_HASH_ANNOTATION]


def test_a_change_to_the_canary_rolls_the_canarys_pods_only():
    before = built(spec())
    s = spec()
    changed = s.model_copy(update={"canary": s.canary.model_copy(update={"model": s.canary.model.model_copy(
        update={"version": "3"})})})
    after = built(changed)
    assert config_hash(after["canary"]) != config_hash(before["canary"])
    assert after["primary"].deployment == before["primary"].deployment
    assert config_hash(before["canary"]) != config_hash(before["primary"])


def test_each_variant_selects_its_own_pods_and_only_those():
    kids = built(spec(), PEERS)
    primary, canary = kids["primary"], kids["canary"]
    for k in (primary, canary):
        selector = k.deployment["spec"]["selector"]["matchLabels"]
        assert selects(selector, pod_labels(k))
        assert k.service["spec"]["selector"] == selector
        # the variant's NetworkPolicy guards exactly the pods its Deployment runs
        assert k.network_policy["spec"]["podSelector"] == {"matchLabels": selector}
        assert k.network_policy["spec"]["ingress"][0]["from"] == PEERS
    # the primary's (immutable) selector never picks up a canary pod, nor the canary's a primary pod
    assert not selects(primary.deployment["spec"]["selector"]["matchLabels"], pod_labels(canary))
    assert not selects(canary.deployment["spec"]["selector"]["matchLabels"], pod_labels(primary))
    # so every model pod, of either variant, is behind a policy
    assert any(selects(k.network_policy["spec"]["podSelector"]["matchLabels"], pod_labels(canary))
               for k in kids.values())


def test_each_variants_service_tells_the_gateway_its_share_and_version():
    kids = built(spec())
    got = {name: {k: v for k, v in k.service["metadata"]["labels"].items() if k.startswith("caffeserving.io/")}
           for name, k in kids.items()}
    assert got == {
        "primary": {slices.MODEL_LABEL: "digits", slices.VARIANT_LABEL: "primary", slices.TRAFFIC_LABEL: "90",
                    slices.VERSION_LABEL: "1"},
        "canary": {slices.MODEL_LABEL: "digits", slices.VARIANT_LABEL: "canary", slices.TRAFFIC_LABEL: "10",
                   slices.VERSION_LABEL: "2"},
    }
    alone = built(spec(canary=None))
    assert list(alone) == ["primary"] and alone["primary"].service["metadata"]["labels"][slices.TRAFFIC_LABEL] == "100"


def test_an_autoscaled_model_autoscales_its_canary_too():
    s = spec(autoscaling=AUTOSCALING)
    kids = built(s)
    for name, k in kids.items():
        assert "replicas" not in k.deployment["spec"], name  # the autoscaler owns the count
        assert k.service["metadata"]["labels"][slices.COLD_START_LABEL] == "120", name  # held while at zero
    objs = {v.name: traffic.scaled_object(v, "ml", GATEWAY) for v in variants.of("digits", s)}
    canary = objs["canary"]
    assert unknown_fields(canary) == []
    assert canary["metadata"]["name"] == "digits-canary"
    assert canary["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "digits-canary"}
    assert (canary["spec"]["minReplicaCount"], canary["spec"]["maxReplicaCount"]) == (0, 3)
    # each variant scales on its own share of the load
    assert [o["spec"]["triggers"][0]["metadata"]["url"] for o in objs.values()] == [
        f"{GATEWAY}/autoscaling/digits", f"{GATEWAY}/autoscaling/digits/canary"]
    prom = traffic.scaled_object(variants.of("digits", s)[1], "ml", GATEWAY, "http://prometheus:9090")
    assert prom["spec"]["triggers"][0]["metadata"]["query"] == \
        'sum(caffeserve_gateway_concurrency{model="digits",variant="canary"})'


@pytest.mark.parametrize("auto", [None, AUTOSCALING], ids=["fixed", "autoscaled"])
def test_replicas_are_decided_in_one_place(auto):
    s = spec(autoscaling=auto)
    scaled_by_keda = {"spec": {"replicas": 3}}
    for v in variants.of("digits", s):
        k = manifests.children(v, "ml")
        assert k.deployment["spec"].get("replicas") == v.replicas
        want = {"primary": 2, "canary": 1}[v.name] if auto is None else 3
        assert v.expected_replicas(scaled_by_keda) == want


def test_a_second_build_changes_nothing():
    """Idempotent: what the API server returns for the children built once needs no patch when built again."""
    first, second = built(spec(autoscaling=AUTOSCALING), PEERS), built(spec(autoscaling=AUTOSCALING), PEERS)
    assert first == second
    for obj in (o for k in second.values() for o in k.all()):
        stored = dict(obj, metadata={**obj["metadata"], "ownerReferences": [{"uid": "u", "controller": True}]})
        assert drift_patch(stored, stored) is None

"""A pool's pods and a pool model's Service: pure functions of the specs, each GPU sharing mode."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from caffe_operator import api, pool_manifests, variants
from caffe_operator.api import InvalidSpec
from caffe_operator.pool_api import parse_pool_spec
from inference_server.config import parse_config


def pool(**changes: Any):
    raw: dict[str, Any] = {"replicas": 2, "modelMemory": "8Gi", "modelClaims": ["models"]}
    raw.update(changes)
    return parse_pool_spec("small", raw)


def server(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


SHARING = {
    "whole": ({"sharing": "whole"}, {"nvidia.com/gpu": 1}),
    "timeSlicing": ({"sharing": "timeSlicing", "count": 1}, {"nvidia.com/gpu.shared": 1}),
    "mig": ({"sharing": "mig", "migProfile": "1g.10gb"}, {"nvidia.com/mig-1g.10gb": 1}),
    "hami": ({"sharing": "hami", "memoryMiB": 4096, "coresPercent": 30},
             {"nvidia.com/gpu": 1, "nvidia.com/gpumem": 4096, "nvidia.com/gpucores": 30}),
}


@pytest.mark.parametrize("mode", sorted(SHARING))
def test_each_gpu_sharing_mode_asks_for_its_resource(mode):
    gpu, wanted = SHARING[mode]
    dep = pool_manifests.pool_deployment("small", "ml", pool(gpu=gpu), "registry.example/caffe:1")
    limits = server(dep)["resources"]["limits"]
    assert {k: v for k, v in limits.items() if k.startswith("nvidia.com/")} == wanted
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        dep["spec"]["template"]["spec"]["tolerations"]
    kubernetes_validate.validate(dep, kubernetes_validate.latest_version(), strict=True)


def test_mig_and_hami_slices_bound_the_model_budget_without_modelMemory():
    assert parse_pool_spec("p", {"gpu": {"sharing": "mig", "migProfile": "1g.10gb"}}).budget_bytes == 10 * 10**9
    assert parse_pool_spec("p", {"gpu": {"sharing": "hami", "memoryMiB": 4096}}).budget_bytes == 4096 * 2**20
    with pytest.raises(InvalidSpec, match="modelMemory is required unless gpu.sharing is mig or hami"):
        parse_pool_spec("p", {"gpu": {"sharing": "timeSlicing"}})


@pytest.mark.parametrize("gpu,message", [
    ({"sharing": "mig"}, "gpu.sharing mig needs gpu.migProfile"),
    ({"sharing": "whole", "migProfile": "1g.10gb"}, "set sharing: mig"),
    ({"sharing": "timeSlicing", "memoryMiB": 10}, "need gpu.sharing hami"),
    ({"sharing": "hami"}, "gpu.sharing hami needs gpu.memoryMiB or gpu.coresPercent"),
    ({"sharing": "mig", "migProfile": "big"}, "spec.gpu.migProfile"),
    ({"sharing": "shared"}, "spec.gpu.sharing"),
])
def test_bad_gpu_settings_say_which_field(gpu, message):
    with pytest.raises(InvalidSpec, match=message):
        pool(gpu=gpu)


def test_cpu_pool_asks_for_no_gpu_and_mounts_each_claim():
    dep = pool_manifests.pool_deployment("small", "ml", pool(device="cpu", modelClaims=["models", "zoo"]))
    container = server(dep)
    assert not any(k.startswith("nvidia.com/") for k in container["resources"]["limits"])
    assert container["resources"]["limits"]["memory"] == str(8 * 2**30 + 2**30)
    assert "tolerations" not in dep["spec"]["template"]["spec"]
    assert container["command"][:6] == ["caffeserve", "serve", "--model-repository", "/repository",
                                         "--model-control-mode", "explicit"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models/zoo"]["readOnly"] is True
    claims = [v["persistentVolumeClaim"]["claimName"] for v in dep["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == ["models", "zoo"]
    assert dep["spec"]["replicas"] == 2
    moved = server(pool_manifests.pool_deployment("small", "ml", pool(device="cpu", modelMountPath="/srv/claims")))
    assert "/srv/claims/models" in {m["mountPath"] for m in moved["volumeMounts"]}
    assert dep["spec"]["selector"]["matchLabels"] == {"caffeserving.io/pool": "small"}
    kubernetes_validate.validate(dep, kubernetes_validate.latest_version(), strict=True)


def model_spec(**changes: Any) -> api.CaffeModelServiceSpec:
    raw: dict[str, Any] = {"pool": "small", "source": {"pvc": {"claimName": "models", "path": "zoo/digits/"}},
                           "model": {"prototxt": "deploy.prototxt", "weights": "digits.caffemodel"}}
    raw.update(changes)
    return api.parse_spec("digits", raw)


def test_a_pool_models_service_selects_the_pool_pods_that_hold_it():
    svc = pool_manifests.model_service(variants.Variant("digits", model_spec()), "ml", "small")
    assert svc["metadata"]["name"] == "digits-predictor"
    assert svc["metadata"]["labels"]["caffeserving.io/model"] == "digits"  # the gateway finds its slices
    assert svc["spec"]["selector"] == {"caffeserving.io/pool": "small", "pool.caffeserving.io/digits": "loaded"}
    assert [p["name"] for p in svc["spec"]["ports"]] == ["http", "grpc"]
    kubernetes_validate.validate(svc, kubernetes_validate.latest_version(), strict=True)


def test_the_load_config_is_the_models_server_config_under_the_pool_mount():
    # the pool's device, not the model's (runtime.device defaults to gpu; cpu is the server's default)
    assert json.loads(pool_manifests.load_config("digits", model_spec(), "gpu"))["device"]["kind"] == "gpu"
    cfg = json.loads(pool_manifests.load_config("digits", model_spec(runtime={"device": "gpu"}), "cpu"))
    assert cfg["name"] == "digits" and "device" not in cfg
    assert cfg["model"]["prototxt"] == "/models/models/zoo/digits/deploy.prototxt"
    assert cfg["model"]["weights"] == "/models/models/zoo/digits/digits.caffemodel"


def test_a_model_cache_claim_is_every_pool_pods_shared_onnx_cache_and_named_in_each_load_config():
    """A pool pod on a node with an empty local cache finds `auto`'s converted graph and verdict there."""
    dep = pool_manifests.pool_deployment("small", "ml", pool(device="cpu"), "registry.example/caffe:1", "onnx-cache")
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "onnx-cache"}} in \
        dep["spec"]["template"]["spec"]["volumes"]
    mount = next(m for m in server(dep)["volumeMounts"] if m["name"] == "model-cache")
    assert mount == {"name": "model-cache", "mountPath": "/var/cache/caffe-serving"}  # writable: pods publish there
    kubernetes_validate.validate(dep, kubernetes_validate.latest_version(), strict=True)
    cfg = parse_config(json.loads(pool_manifests.load_config("digits", model_spec(runtime={"backend": "auto"}), "cpu",
                                                             model_cache="onnx-cache")), environ={})
    assert cfg.onnx_cache.shared_dir == "/var/cache/caffe-serving"
    plain = pool_manifests.pool_deployment("small", "ml", pool(device="cpu"), "registry.example/caffe:1")
    assert "model-cache" not in {v["name"] for v in plain["spec"]["template"]["spec"]["volumes"]}
    assert "onnxCache" not in json.loads(pool_manifests.load_config("digits", model_spec(), "cpu"))


def test_pool_pods_serve_over_tls_with_the_pod_tls_secret():
    dep = pool_manifests.pool_deployment("small", "ml", pool(device="cpu"), "registry.example/caffe:1", None, "pod-tls")
    c = server(dep)
    assert {"name": "tls", "secret": {"secretName": "pod-tls", "defaultMode": 0o440}} in \
        dep["spec"]["template"]["spec"]["volumes"]
    assert c["args"][-2:] == ["--tls-dir", "/etc/caffe-serving/tls"]
    assert {c[p]["httpGet"]["scheme"] for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {"HTTPS"}
    kubernetes_validate.validate(dep, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("changes,message", [
    ({"source": {"url": "https://models.example.com/d"}}, "must come from source.pvc"),
    ({"runtime": {"gpus": 2}}, "pool small, whose spec.gpu decides"),
    ({"pool": "Not_A_Name"}, "spec.pool"),
])
def test_bad_pool_model_specs_say_why(changes, message):
    with pytest.raises(InvalidSpec, match=message):
        model_spec(**changes)


def test_a_pool_models_canary_runs_in_pods_of_its_own():
    s = model_spec(canary={"model": {"prototxt": "deploy.prototxt", "weights": "v2.caffemodel", "version": "2"},
                           "trafficPercent": 10})
    primary, canary = variants.of("digits", s)
    assert primary.spec.pool == "small" and canary.spec.pool is None


def test_the_pool_network_policy_lets_only_the_peers_into_every_pool_pod_on_http_and_grpc():
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "caffe-system"}},
              "podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}]
    policy = pool_manifests.pool_network_policy("small", "ml", peers)
    kubernetes_validate.validate(policy, kubernetes_validate.latest_version(), strict=True)
    pod_labels = pool_manifests.pool_deployment("small", "ml", pool(), "registry.example/caffe:1")[
        "spec"]["template"]["metadata"]["labels"]
    assert policy["metadata"] == {"name": "small-pool", "namespace": "ml",
                                  "labels": pool_manifests.pool_labels("small")}
    assert all(pod_labels.get(k) == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())
    # a pod that holds a model has one more label and is still selected; a pod of another pool is not
    assert policy["spec"]["podSelector"]["matchLabels"] == {pool_manifests.POOL_LABEL: "small"}
    assert policy["spec"]["ingress"] == [{"from": peers, "ports": [{"port": 8080, "protocol": "TCP"},
                                                                   {"port": 8081, "protocol": "TCP"}]}]
    assert policy["spec"]["policyTypes"] == ["Ingress"]

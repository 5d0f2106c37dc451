"""Child manifests, drift detection and status: pure functions of the spec (no cluster needed)."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from caffe_operator import api, manifests, variants
from caffe_operator.reconcile import drift_patch, is_subset, parse_quantity
from caffe_operator.status import Readiness, build_status, readiness, same_status
from inference_server.config import parse_config

SHA = "ab" * 32
CONTRACT_LABELS = {
    "caffeserving.io/model": "digits",
    "app.kubernetes.io/name": "caffe-model-server",
    "app.kubernetes.io/instance": "digits",
    "app.kubernetes.io/part-of": "caffe-serving",
    "app.kubernetes.io/managed-by": "caffe-serving-operator",
}


def spec(**changes: Any) -> api.CaffeModelServiceSpec:
    raw: dict[str, Any] = {
        "source": {"pvc": {"claimName": "models", "path": "zoo/digits/"}},
        "model": {
            "prototxt": "deploy.prototxt",
            "weights": "digits.caffemodel",
            "weightsSha256": SHA,
            "labels": "labels.txt",
        },
    }
    raw.update(changes)
    return api.parse_spec("digits", raw)


def build(s: api.CaffeModelServiceSpec | None = None, image: str = "registry.example/caffe:1") -> manifests.Children:
    return manifests.children(variants.Variant("digits", s or spec()), "ml", image)


def pod(children: manifests.Children) -> dict[str, Any]:
    return children.deployment["spec"]["template"]["spec"]


def server(children: manifests.Children) -> dict[str, Any]:
    (container,) = pod(children)["containers"]
    return container


URL_SPEC = dict(
    source={"url": "https://models.example.com/digits"},
    model={"prototxt": "deploy.prototxt", "prototxtSha256": "cd" * 32,
           "weights": "https://cdn.example.com/blobs/digits-v2.caffemodel", "weightsSha256": SHA,
           "preprocessing": {"meanFile": "mean.binaryproto"}},
)
VARIANTS = {
    "pvc gpu": spec(),
    "url": spec(**URL_SPEC),
    "configMap cpu": spec(source={"configMap": {"name": "digits-files"}}, runtime={"device": "cpu"}),
    "everything": spec(
        replicas=3,
        resources={"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        nodeSelector={"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"},
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        affinity={
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"caffeserving.io/model": "digits"}},
                        },
                    }
                ]
            }
        },
        runtimeClassName="nvidia",
        priorityClassName="inference",
        imagePullSecrets=[{"name": "regcred"}],
        serviceAccountName="model-reader",
        runtime={
            "image": "mine/caffe:2",
            "imagePullPolicy": "Always",
            "gpus": 2,
            "gpuResource": "nvidia.com/mig-2g.20gb",
        },
    ),
    "s3": spec(
        source={
            "s3": {
                "bucket": "models",
                "prefix": "zoo/digits/",
                "endpoint": "http://minio.storage:9000",
                "region": "eu-west-1",
                "secretRef": {"name": "s3-creds"},
            }
        }
    ),
}
GATEWAY_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "caffe-system"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_child_passes_kubernetes_validate(variant):
    kids = manifests.children(
        variants.Variant("digits", VARIANTS[variant]), "ml", "registry.example/caffe:1", [GATEWAY_PEER]
    )
    assert kids.network_policy is not None
    for obj in kids.all():
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_s3_source_downloads_from_the_bucket_with_the_secrets_credentials():
    init = {i["name"]: i for i in pod(build(VARIANTS["s3"]))["initContainers"]}
    assert set(init) == {"fetch-prototxt", "fetch-weights", "fetch-labels"}
    assert init["fetch-weights"]["command"] == [
        "caffeserve",
        "fetch",
        "--url",
        "s3://models/zoo/digits/digits.caffemodel",
        "--dest",
        "/models/digits.caffemodel",
        "--sha256",
        SHA,
        "--s3-endpoint",
        "http://minio.storage:9000",
        "--s3-region",
        "eu-west-1",
        "--s3-credentials-dir",
        manifests.S3_CREDENTIALS_DIR,
    ]
    mount = {"name": "s3-credentials", "mountPath": manifests.S3_CREDENTIALS_DIR, "readOnly": True}
    assert all(mount in i["volumeMounts"] and "envFrom" not in i for i in init.values())  # files, not environment
    assert all(i["terminationMessagePolicy"] == "FallbackToLogsOnError" for i in init.values())
    assert {"name": "s3-credentials", "secret": {"secretName": "s3-creds", "defaultMode": 0o440}} in \
        pod(build(VARIANTS["s3"]))["volumes"]
    # the server itself never sees the credentials
    assert all(m["name"] != "s3-credentials" for m in server(build(VARIANTS["s3"]))["volumeMounts"])


def test_a_network_policy_only_when_the_operator_is_given_peers():
    assert build().network_policy is None and len(build().all()) == 3
    kids = manifests.children(variants.Variant("digits", spec()), "ml", "img", [GATEWAY_PEER])
    np_ = kids.network_policy
    assert kids.all()[0] is np_ and np_["metadata"]["name"] == "digits-predictor"
    assert np_["metadata"]["labels"] == CONTRACT_LABELS
    assert np_["spec"] == {
        "podSelector": {"matchLabels": {"caffeserving.io/model": "digits"}},
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [GATEWAY_PEER], "ports": [{"port": 8080, "protocol": "TCP"}, {"port": 8081, "protocol": "TCP"}]}
        ],
    }
    # with gRPC off, only the http port is let in
    off = manifests.children(variants.Variant("digits", spec(runtime={"grpc": {"enabled": False}})), "ml", "img",
                             [GATEWAY_PEER])
    assert off.network_policy["spec"]["ingress"][0]["ports"] == [{"port": 8080, "protocol": "TCP"}]


def test_names_and_labels_are_the_contract():
    c = build()
    assert c.config_map["metadata"]["name"] == "digits-config"
    assert c.deployment["metadata"]["name"] == "digits-predictor"
    assert c.service["metadata"]["name"] == "digits-predictor"
    for obj in (c.config_map, c.deployment):
        assert obj["metadata"]["namespace"] == "ml"
        assert obj["metadata"]["labels"] == CONTRACT_LABELS
    # the Service adds what the gateway reads of its traffic (inference_server/slices.py)
    assert c.service["metadata"]["labels"] == {**CONTRACT_LABELS, "caffeserving.io/variant": "primary",
                                               "caffeserving.io/traffic-percent": "100", "caffeserving.io/version": "1"}
    assert c.deployment["spec"]["template"]["metadata"]["labels"] == CONTRACT_LABELS
    assert c.deployment["spec"]["selector"] == {"matchLabels": {"caffeserving.io/model": "digits"}}
    assert c.service["spec"]["selector"] == {"caffeserving.io/model": "digits"}
    assert c.service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP", "appProtocol": "http"},
        {"name": "grpc", "port": 8081, "targetPort": 8081, "protocol": "TCP", "appProtocol": "grpc"},
    ]


def test_a_model_cache_claim_is_mounted_read_write_as_the_servers_shared_onnx_cache():
    kids = manifests.children(variants.Variant("digits", spec()), "ml", "registry.example/caffe:1", None, "onnx-cache")
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "onnx-cache"}} in pod(kids)["volumes"]
    mount = next(m for m in server(kids)["volumeMounts"] if m["name"] == "model-cache")
    assert mount == {"name": "model-cache", "mountPath": "/var/cache/caffe-serving"}  # writable: pods publish there
    cfg = parse_config(yaml.safe_load(kids.config_map["data"]["config.yaml"]), environ={})
    assert cfg.onnx_cache.shared_dir == "/var/cache/caffe-serving"
    for obj in kids.all():
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    plain = build()  # no claim: no volume, no shared cache in the config (each pod converts on its own)
    assert "model-cache" not in {v["name"] for v in pod(plain)["volumes"]}
    assert "onnxCache" not in plain.config_map["data"]["config.yaml"]
    hashes = {k.deployment["spec"]["template"]["metadata"]["annotations"][manifests.CONFIG_HASH_ANNOTATION]
              for k in (kids, plain)}
    assert len(hashes) == 2  # turning the cache on or off rolls the pods


def test_a_pod_tls_secret_makes_the_server_serve_over_tls_with_https_probes():
    kids = manifests.children(variants.Variant("digits", spec()), "ml", "registry.example/caffe:1", pod_tls="pod-tls")
    assert {"name": "tls", "secret": {"secretName": "pod-tls", "defaultMode": 0o440}} in pod(kids)["volumes"]
    c = server(kids)
    assert {"name": "tls", "mountPath": "/etc/caffe-serving/tls", "readOnly": True} in c["volumeMounts"]
    assert c["args"][-2:] == ["--tls-dir", "/etc/caffe-serving/tls"]
    assert {c[p]["httpGet"]["scheme"] for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {"HTTPS"}
    assert kids.deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    assert manifests.model_url("digits", "ml", None, tls=True) == \
        "https://digits-predictor.ml.svc:8080/v2/models/digits"
    for obj in kids.all():
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    plain = build()
    assert "--tls-dir" not in server(plain)["args"] and "scheme" not in server(plain)["readinessProbe"]["httpGet"]
    assert manifests.SERVE_ARGS == ["--drain-delay", "5", "--grace-period", "30"]  # the shared list is untouched
    hashes = {k.deployment["spec"]["template"]["metadata"]["annotations"][manifests.CONFIG_HASH_ANNOTATION]
              for k in (kids, plain)}
    assert len(hashes) == 2  # turning TLS on or off rolls the pods


def test_the_server_config_is_what_caffeserve_serve_accepts():
    s = spec(runtime={"device": "gpu", "instances": 3, "batching": {"enabled": "auto", "maxBatchSize": 32},
                      "backend": "auto", "parityTolerance": 1e-4, "limits": {"maxBatch": 4}},
             model={"prototxt": "deploy.prototxt", "weights": "digits.caffemodel", "weightsSha256": SHA, "version": "7",
                    "labels": "labels.txt", "inputs": [{"name": "data", "datatype": "BYTES"}],
                    "preprocessing": {"color": False, "meanFile": "mean.binaryproto"}})
    text = build(s).config_map["data"]["config.yaml"]
    cfg = parse_config(yaml.safe_load(text), environ={})
    assert cfg.name == "digits" and cfg.version == "7"
    assert cfg.model.prototxt == "/models/deploy.prototxt"
    assert cfg.model.weights == "/models/digits.caffemodel"
    assert cfg.model.weights_sha256 == SHA
    assert cfg.model.labels == "/models/labels.txt"
    assert cfg.preprocessing.mean_file == "/models/mean.binaryproto" and cfg.preprocessing.color is False
    assert cfg.device.kind == "gpu" and cfg.device.id == 0
    assert cfg.instances == 3 and cfg.batching.enabled == "auto" and cfg.batching.max_batch_size == 32
    assert cfg.inputs[0].datatype == "BYTES"
    assert (cfg.backend, cfg.parity_tolerance, cfg.limits.max_batch) == ("auto", 1e-4, 4)


def test_grpc_is_on_by_default_and_can_be_turned_off():
    on = build()
    assert "grpc" not in yaml.safe_load(on.config_map["data"]["config.yaml"])  # the server's default: on, 8081
    assert manifests.grpc_address("digits", "ml", spec()) == "digits-predictor.ml.svc:8081"
    assert manifests.grpc_address("digits", "ml", spec(), "gw.caffe-system.svc:8081") == "gw.caffe-system.svc:8081"
    off = build(spec(runtime={"grpc": {"enabled": False}}))
    cfg = parse_config(yaml.safe_load(off.config_map["data"]["config.yaml"]), environ={})
    assert cfg.grpc.enabled is False
    c = server(off)
    assert "--grpc-port" not in c["command"] and [p["name"] for p in c["ports"]] == ["http"]
    assert [p["name"] for p in off.service["spec"]["ports"]] == ["http"]
    assert manifests.grpc_address("digits", "ml", spec(runtime={"grpc": {"enabled": False}}), "gw:8081") is None
    # turning it off changes what the pods see: they roll
    def hash_of(c):
        return c.deployment["spec"]["template"]["metadata"]["annotations"][manifests.CONFIG_HASH_ANNOTATION]
    assert hash_of(on) != hash_of(off)
    # probes stay on REST
    assert c["readinessProbe"] == server(on)["readinessProbe"]


def test_tracing_reaches_the_pods_config_from_the_cr_or_the_operators_default():
    def config_of(s):
        return parse_config(yaml.safe_load(build(s).config_map["data"]["config.yaml"]), environ={})

    assert config_of(spec()).tracing.endpoint is None  # off unless someone sets it
    own = spec(runtime={"tracing": {"endpoint": "http://mine:4318", "sampleRatio": 0.25}})
    cfg = config_of(own)
    assert (cfg.tracing.endpoint, cfg.tracing.sample_ratio) == ("http://mine:4318", 0.25)
    default = "http://otel-collector.observability:4318"
    assert config_of(manifests.with_tracing_default(spec(), default)).tracing.endpoint == default
    assert config_of(manifests.with_tracing_default(own, default)).tracing.endpoint == "http://mine:4318"
    assert manifests.with_tracing_default(own, None) is own
    canary = spec(canary={"model": {"prototxt": "deploy.prototxt", "weights": "v2.caffemodel", "version": "2"},
                          "trafficPercent": 10})
    assert all(config_of(v.spec).tracing.endpoint == default
               for v in variants.of("digits", manifests.with_tracing_default(canary, default)))
    with pytest.raises(api.InvalidSpec, match=r"spec\.runtime\.tracing\.endpoint"):
        spec(runtime={"tracing": {"endpoint": "otel-collector:4318"}})


def test_cpu_config_says_cpu():
    text = build(spec(runtime={"device": "cpu"})).config_map["data"]["config.yaml"]
    assert parse_config(yaml.safe_load(text), environ={}).device.kind == "cpu"


def test_server_container_runs_caffeserve_serve_with_probes():
    c = server(build())
    assert c["command"] == ["caffeserve", "serve", "--config", "/etc/caffeserve/config.yaml",
                            "--host", "0.0.0.0", "--port", "8080", "--grpc-port", "8081"]
    assert c["image"] == "registry.example/caffe:1"
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "grpc", "containerPort": 8081, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # runtime.startupTimeoutSeconds default
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/caffeserve"]["readOnly"] and mounts["/models"]["readOnly"]


def test_the_pod_gives_the_server_time_to_drain_before_the_kubelet_kills_it():
    # SIGTERM: readiness 503 at once, the listener open for the drain delay (endpoints catch up),
    # then the requests received are finished within the grace period; SIGKILL only after both
    c = server(build())
    args = dict(zip(c["args"][::2], c["args"][1::2], strict=True))
    drain, grace = float(args["--drain-delay"]), float(args["--grace-period"])
    assert drain >= 3  # endpoints propagation takes seconds
    assert pod(build())["terminationGracePeriodSeconds"] > drain + grace
    assert "lifecycle" not in c  # no preStop: the server's own drain delay does what a preStop sleep would


def test_startup_budget_follows_the_spec():
    c = server(build(spec(runtime={"startupTimeoutSeconds": 1800})))
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] == 1800


def test_pods_meet_pod_security_restricted():
    for s in VARIANTS.values():
        p = pod(build(s))
        assert p["automountServiceAccountToken"] is False
        assert p["securityContext"]["runAsNonRoot"] is True
        assert p["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in p["containers"] + p.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["runAsNonRoot"] is True
        kinds = {next(k for k in v if k != "name") for v in p["volumes"]}
        assert kinds <= {"configMap", "emptyDir", "persistentVolumeClaim", "secret"}  # restricted allows these


def test_gpu_limits_and_toleration():
    c = build()
    assert server(c)["resources"]["limits"] == {"nvidia.com/gpu": 1, "memory": manifests.DEFAULT_MEMORY_LIMIT}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod(c)["tolerations"]
    mig = build(VARIANTS["everything"])
    assert server(mig)["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"},
                                        "limits": {"memory": "2Gi", "nvidia.com/mig-2g.20gb": 2}}


def test_cpu_pods_ask_for_no_gpu():
    c = build(VARIANTS["configMap cpu"])
    assert server(c)["resources"]["limits"] == {"memory": manifests.DEFAULT_MEMORY_LIMIT}  # a memory limit, no GPU
    assert "tolerations" not in pod(c)


def test_every_container_has_a_memory_limit_and_every_emptydir_a_size_limit():
    for variant, s in VARIANTS.items():
        p = pod(build(s))
        for c in p["containers"] + p.get("initContainers", []):
            assert c["resources"]["limits"]["memory"], (variant, c["name"])
        for v in p["volumes"]:
            if "emptyDir" in v:
                assert v["emptyDir"]["sizeLimit"], (variant, v["name"])
    # a memory request without a limit becomes the limit too
    req = spec(resources={"requests": {"memory": "6Gi"}})
    assert server(build(req))["resources"]["limits"]["memory"] == "6Gi"


def test_pod_placement_fields_are_passed_through():
    p = pod(build(VARIANTS["everything"]))
    assert p["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}
    assert p["tolerations"][0]["key"] == "dedicated"
    assert "podAntiAffinity" in p["affinity"]
    assert p["runtimeClassName"] == "nvidia" and p["priorityClassName"] == "inference"
    assert p["imagePullSecrets"] == [{"name": "regcred"}] and p["serviceAccountName"] == "model-reader"
    assert server(build(VARIANTS["everything"]))["imagePullPolicy"] == "Always"
    assert server(build(VARIANTS["everything"]))["image"] == "mine/caffe:2"


def test_pvc_source_mounts_the_folder():
    p = pod(build())
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in p["volumes"]
    mount = next(m for m in server(build())["volumeMounts"] if m["name"] == "models")
    assert mount == {"name": "models", "mountPath": "/models", "readOnly": True, "subPath": "zoo/digits"}
    assert "initContainers" not in p


def test_configmap_source_mounts_its_keys():
    p = pod(build(VARIANTS["configMap cpu"]))
    assert {"name": "models", "configMap": {"name": "digits-files"}} in p["volumes"]


def test_url_source_downloads_each_file_in_an_init_container():
    c = build(VARIANTS["url"])
    init = {i["name"]: i for i in pod(c)["initContainers"]}
    assert set(init) == {"fetch-prototxt", "fetch-weights", "fetch-meanfile"}
    assert init["fetch-prototxt"]["command"] == [
        "caffeserve", "fetch", "--url", "https://models.example.com/digits/deploy.prototxt",
        "--dest", "/models/deploy.prototxt", "--sha256", "cd" * 32]
    assert init["fetch-weights"]["command"] == [
        "caffeserve", "fetch", "--url", "https://cdn.example.com/blobs/digits-v2.caffemodel",
        "--dest", "/models/digits-v2.caffemodel", "--sha256", SHA]
    assert "--sha256" not in init["fetch-meanfile"]["command"]
    assert all(i["image"] == "registry.example/caffe:1" for i in init.values())
    assert all("nvidia.com/gpu" not in str(i.get("resources")) for i in init.values())
    assert {"name": "models", "emptyDir": {"sizeLimit": manifests.MODELS_SIZE_LIMIT}} in pod(c)["volumes"]
    assert all(i["terminationMessagePolicy"] == "FallbackToLogsOnError" for i in init.values())
    cfg = yaml.safe_load(c.config_map["data"]["config.yaml"])
    assert cfg["model"]["weights"] == "/models/digits-v2.caffemodel"


def test_config_hash_changes_with_what_pods_see_only():
    base = build()
    h = base.deployment["spec"]["template"]["metadata"]["annotations"][manifests.CONFIG_HASH_ANNOTATION]
    assert len(h) == 64
    same = build(spec())
    assert same.deployment == base.deployment  # deterministic

    def hash_of(children: manifests.Children) -> str:
        return children.deployment["spec"]["template"]["metadata"]["annotations"][manifests.CONFIG_HASH_ANNOTATION]

    assert hash_of(build(spec(runtime={"batching": {"enabled": True}}))) != h  # config.yaml changed
    assert hash_of(build(image="registry.example/caffe:2")) != h  # image changed
    assert hash_of(build(spec(nodeSelector={"a": "b"}))) != h  # placement changed
    # Scaling is not a reason to restart every pod.
    scaled = build(spec(replicas=5))
    assert scaled.deployment["spec"]["replicas"] == 5 and hash_of(scaled) == h


def test_status_url_prefers_the_gateway():
    assert manifests.model_url("digits", "ml") == "http://digits-predictor.ml.svc:8080/v2/models/digits"
    assert manifests.model_url("digits", "ml", "https://infer.example.com/") == "https://infer.example.com/v2/models/digits"


# ---------------------------------------------------------------------------------------------
# drift detection
# ---------------------------------------------------------------------------------------------
def with_owner(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"]["ownerReferences"] = [{"apiVersion": api.API_VERSION, "kind": api.KIND, "name": "digits",
                                           "uid": "u-1", "controller": True, "blockOwnerDeletion": True}]
    return obj


def as_the_api_server_returns_it(obj: dict[str, Any]) -> dict[str, Any]:
    """Defaults and normalisations a real API server adds."""
    out = copy.deepcopy(obj)
    out["metadata"].update(uid="x", resourceVersion="9", generation=2, creationTimestamp="2026-01-01T00:00:00Z")
    if out["kind"] == "Deployment":
        p = out["spec"]["template"]["spec"]
        p.update(dnsPolicy="ClusterFirst", restartPolicy="Always", schedulerName="default-scheduler",
                 serviceAccountName="default", serviceAccount="default")
        for c in p["containers"]:
            c.update(terminationMessagePath="/dev/termination-log", imagePullPolicy="IfNotPresent")
            c["livenessProbe"].update(successThreshold=1)
            c["livenessProbe"]["httpGet"]["scheme"] = "HTTP"
            limits = c["resources"].get("limits", {})
            for k, v in limits.items():
                limits[k] = str(v)
        out["status"] = {"replicas": 1}
    if out["kind"] == "Service":
        out["spec"].update(clusterIP="10.0.0.7", sessionAffinity="None")
    return out


def test_in_sync_children_need_no_patch():
    for obj in build().all():
        desired = with_owner(obj)
        assert drift_patch(as_the_api_server_returns_it(desired), desired) is None


def test_normalised_quantities_are_not_drift():
    desired = with_owner(build(spec(resources={"requests": {"cpu": "0.5", "memory": "1024Mi"}})).deployment)
    current = as_the_api_server_returns_it(desired)
    current["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] = {"cpu": "500m", "memory": "1Gi"}
    assert drift_patch(current, desired) is None
    assert parse_quantity("500m") == parse_quantity("0.5") and parse_quantity("2Gi") == 2 * 2**30
    assert not is_subset({"image": "a:1"}, {"image": "a:1.0"})  # only quantities compare by value


def test_a_hand_edit_is_patched_back():
    desired = with_owner(build().deployment)
    current = as_the_api_server_returns_it(desired)
    current["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"
    current["spec"]["replicas"] = 7
    patch = drift_patch(current, desired)
    assert patch["spec"]["replicas"] == 1
    assert patch["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/caffe:1"


def test_fields_dropped_from_the_spec_are_removed():
    desired = with_owner(build().deployment)
    current = as_the_api_server_returns_it(
        with_owner(build(spec(nodeSelector={"a": "b"}, runtimeClassName="nvidia")).deployment)
    )
    patch = drift_patch(current, desired)
    assert patch["spec"]["template"]["spec"]["nodeSelector"] is None
    assert patch["spec"]["template"]["spec"]["runtimeClassName"] is None
    # serviceAccountName comes back as the API server's default; so must its deprecated alias
    assert patch["spec"]["template"]["spec"]["serviceAccountName"] is None
    assert patch["spec"]["template"]["spec"]["serviceAccount"] is None


def test_configmap_extra_keys_are_removed():
    desired = with_owner(build().config_map)
    current = as_the_api_server_returns_it(desired)
    current["data"]["extra.yaml"] = "x: 1"
    assert drift_patch(current, desired) == {"data": {"extra.yaml": None, **desired["data"]}}


def test_a_foreign_object_is_adopted():
    desired = with_owner(build().service)
    current = as_the_api_server_returns_it(build().service)
    current["metadata"]["labels"] = {"team": "x"}
    current["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": "u-9"}]
    patch = drift_patch(current, desired)
    assert patch["metadata"]["labels"] == desired["metadata"]["labels"]
    assert [r["uid"] for r in patch["metadata"]["ownerReferences"]] == ["u-9", "u-1"]


# ---------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------
def deployment_with(generation: int = 2, **status: Any) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "status": status}


@pytest.mark.parametrize(
    "desired,dep,expected",
    [
        (0, None, ("False", "ScaledToZero")),
        (2, None, ("False", "Progressing")),
        (
            2,
            deployment_with(observedGeneration=1, replicas=2, updatedReplicas=2, readyReplicas=2),
            ("False", "Progressing"),
        ),
        (
            2,
            deployment_with(observedGeneration=2, replicas=3, updatedReplicas=1, readyReplicas=2),
            ("False", "Progressing"),
        ),
        (
            2,
            deployment_with(observedGeneration=2, replicas=3, updatedReplicas=2, readyReplicas=3),
            ("False", "Progressing"),
        ),
        (
            2,
            deployment_with(observedGeneration=2, replicas=2, updatedReplicas=2, readyReplicas=1),
            ("False", "Progressing"),
        ),
        (
            2,
            deployment_with(observedGeneration=2, replicas=2, updatedReplicas=2, readyReplicas=2),
            ("True", "ReplicasReady"),
        ),
        (
            2,
            deployment_with(
                observedGeneration=2,
                replicas=2,
                updatedReplicas=2,
                readyReplicas=0,
                conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}],
            ),
            ("False", "RolloutStalled"),
        ),
        (
            2,
            deployment_with(
                observedGeneration=2,
                conditions=[
                    {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "exceeded quota"}
                ],
            ),
            ("False", "ReplicaFailure"),
        ),
    ],
)
def test_readiness_reads_the_deployment_like_kubectl_rollout_status(desired, dep, expected):
    r = readiness(desired, dep)
    assert (r.status, r.reason) == expected


def test_ready_condition_keeps_its_transition_time_until_it_flips():
    dep = deployment_with(observedGeneration=2, replicas=1, updatedReplicas=1, readyReplicas=1)
    first = build_status(generation=3, readiness_=readiness(1, dep), deployment=dep, previous=None,
                         url="u", selector="s", now="2026-01-01T00:00:00Z")
    assert first["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert first["readyReplicas"] == 1 and first["observedGeneration"] == 3
    again = build_status(generation=3, readiness_=readiness(1, dep), deployment=dep, previous=first,
                         url="u", selector="s", now="2026-01-02T00:00:00Z")
    assert again["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert same_status(first, again)
    down = build_status(generation=3, readiness_=Readiness("False", "Progressing", "0/1"), deployment=None,
                        previous=again, url="u", selector="s", now="2026-01-03T00:00:00Z")
    assert down["conditions"][0]["lastTransitionTime"] == "2026-01-03T00:00:00Z"
    assert not same_status(again, down)

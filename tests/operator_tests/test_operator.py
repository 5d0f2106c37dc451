"""The operator, as a real `caffeserve operator` process, against kmock's Kubernetes API emulator.

CRs go in with real kubectl (`kubectl apply`); children and status are read back over the API.
The emulator runs no controllers, so the tests play their parts where needed, and say so:
the kubelet/Deployment controller (`play_kubelet` patches a Deployment's status) and the garbage
collector (caffe_testing.cluster.ApiServer deletes objects whose owners, by ownerReferences uid, are gone).
"""

from __future__ import annotations

import time

import kubernetes_validate
import pytest
import yaml

from caffe_testing.cluster import CMS, CONFIGMAPS, DEPLOYMENTS, SERVICES, Cluster, OperatorProcess, cluster_with_crd
from caffe_testing.cms import (
    children,
    cms,
    events,
    eventually,
    play_kubelet,
    pod_hash,
    ready,
    wait_children,
    wait_ready,
)
from inference_server.config import parse_config

SHA = "ab" * 32


# ---------------------------------------------------------------------------------------------
# create
# ---------------------------------------------------------------------------------------------
def test_apply_creates_the_children(cluster, operator, ns):
    cr = cms("alexnet", ns,
             source={"url": "https://models.example.com/alexnet/"},
             model={"prototxt": "deploy.prototxt", "weights": "bvlc_alexnet.caffemodel", "weightsSha256": SHA,
                    "labels": "synset_words.txt", "inputs": [{"name": "data", "datatype": "BYTES"}],
                    "preprocessing": {"imageSize": [227, 227], "channelSwap": [2, 1, 0],
                                      "meanValues": [104, 117, 123]}},
             runtime={"instances": 2, "batching": {"enabled": "auto"}},
             resources={"requests": {"cpu": "2", "memory": "4Gi"}})
    cluster.apply(cr)
    cm, dep, svc = wait_children(cluster, operator, ns, "alexnet")
    owner = cluster.get_object(CMS, ns, "alexnet")

    for child in (cm, dep, svc):
        kubernetes_validate.validate(child, kubernetes_validate.latest_version(), strict=True)
        assert child["metadata"]["labels"]["caffeserving.io/model"] == "alexnet"
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "caffe-serving-operator"
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "caffeserving.io/v1alpha1", "kind": "CaffeModelService", "name": "alexnet",
                       "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}

    cfg = parse_config(yaml.safe_load(cm["data"]["config.yaml"]), environ={})
    assert (cfg.name, cfg.device.kind, cfg.instances, cfg.batching.enabled) == ("alexnet", "gpu", 2, "auto")
    assert cfg.model.weights == "/models/bvlc_alexnet.caffemodel" and cfg.model.weights_sha256 == SHA
    assert cfg.preprocessing.image_size == [227, 227]

    pod = dep["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["command"][:2] == ["caffeserve", "serve"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")
    fetch_weights = next(c for c in pod["initContainers"] if c["name"] == "fetch-weights")
    assert fetch_weights["command"] == ["caffeserve", "fetch", "--url",
                                        "https://models.example.com/alexnet/bvlc_alexnet.caffemodel",
                                        "--dest", "/models/bvlc_alexnet.caffemodel", "--sha256", SHA]
    assert svc["spec"]["ports"][0]["port"] == 8080 and svc["spec"]["selector"] == {"caffeserving.io/model": "alexnet"}
    # gRPC beside REST: port 8081 named grpc on the pod and the Service (appProtocol grpc); probes stay on http
    assert server["command"][-2:] == ["--grpc-port", "8081"]
    assert {"name": "grpc", "containerPort": 8081, "protocol": "TCP"} in server["ports"]
    assert svc["spec"]["ports"][1] == {"name": "grpc", "port": 8081, "targetPort": 8081, "protocol": "TCP",
                                       "appProtocol": "grpc"}
    assert {server[p]["httpGet"]["port"] for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {"http"}

    cr_now = wait_ready(cluster, operator, ns, "alexnet", status="False", reason="Progressing")
    st = cr_now["status"]
    assert st["url"] == f"http://alexnet-predictor.{ns}.svc:8080/v2/models/alexnet"
    assert st["selector"] == "caffeserving.io/model=alexnet" and st["observedGeneration"] == 1
    assert st["grpcAddress"] == f"alexnet-predictor.{ns}.svc:8081"
    assert not cr_now["metadata"].get("finalizers")  # nothing blocks deletion, even without the operator
    created = {m for t, r, m in events(cluster, ns, "alexnet") if r == "Created"}
    assert created == {"created ConfigMap alexnet-config", "created Deployment alexnet-predictor",
                       "created Service alexnet-predictor"}


def test_existing_child_is_adopted(cluster, operator, ns):
    cluster.create(SERVICES, ns, {"apiVersion": "v1", "kind": "Service",
                                  "metadata": {"name": "digits-predictor", "namespace": ns, "labels": {"team": "a"}},
                                  "spec": {"ports": [{"name": "web", "port": 80}]}})
    cluster.apply(cms("digits", ns, runtime={"device": "cpu"}))
    uid = eventually(operator, lambda: cluster.get_object(CMS, ns, "digits"), "CR")["metadata"]["uid"]

    def adopted():
        svc = cluster.get_object(SERVICES, ns, "digits-predictor")
        refs = svc["metadata"].get("ownerReferences") or []
        return svc if [r["uid"] for r in refs] == [uid] else None
    svc = eventually(operator, adopted, "the Service adopted")
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP", "appProtocol": "http"},
        {"name": "grpc", "port": 8081, "targetPort": 8081, "protocol": "TCP", "appProtocol": "grpc"}]
    assert svc["metadata"]["labels"]["caffeserving.io/model"] == "digits"
    assert len(cluster.list_objects(SERVICES, ns)) == 1


# ---------------------------------------------------------------------------------------------
# update and drift
# ---------------------------------------------------------------------------------------------
def test_spec_update_patches_children_and_rolls_pods(cluster, operator, ns):
    cluster.apply(cms("digits", ns, nodeSelector={"pool": "gpu-a"}))
    _, dep, _ = wait_children(cluster, operator, ns, "digits")
    first_hash = pod_hash(dep)

    cluster.apply(cms("digits", ns, runtime={"batching": {"enabled": True, "maxBatchSize": 16}}))
    dep = eventually(operator, lambda: (d := cluster.get_object(DEPLOYMENTS, ns, "digits-predictor"))
                     and pod_hash(d) != first_hash and d, "the pod template to change")
    assert "nodeSelector" not in dep["spec"]["template"]["spec"]  # dropped from the CR, dropped here
    cm = cluster.get_object(CONFIGMAPS, ns, "digits-config")
    cfg = parse_config(yaml.safe_load(cm["data"]["config.yaml"]), environ={})
    assert cfg.batching.enabled is True and cfg.batching.max_batch_size == 16
    cr = wait_ready(cluster, operator, ns, "digits", observedGeneration=2)
    assert cr["status"]["observedGeneration"] == 2
    updated = ("Normal", "Updated", "updated Deployment digits-predictor for generation 2")
    assert updated in events(cluster, ns, "digits")

    # Scaling changes the replica count, not what the pods see: no rollout.
    second_hash = pod_hash(dep)
    cluster.apply(cms("digits", ns, replicas=3, runtime={"batching": {"enabled": True, "maxBatchSize": 16}}))
    dep = eventually(operator, lambda: (d := cluster.get_object(DEPLOYMENTS, ns, "digits-predictor"))
                     and d["spec"]["replicas"] == 3 and d, "replicas 3")
    assert pod_hash(dep) == second_hash
    assert len(cluster.list_objects(DEPLOYMENTS, ns)) == 1


def test_hand_edits_and_deletions_are_undone(cluster, operator, ns):
    cluster.apply(cms("digits", ns))
    cm, dep, _ = wait_children(cluster, operator, ns, "digits")
    wait_ready(cluster, operator, ns, "digits", observedGeneration=1)
    image = dep["spec"]["template"]["spec"]["containers"][0]["image"]

    cluster.kubectl("patch", "deployment", "digits-predictor", "-n", ns, "--type", "merge", "-p",
                    '{"spec": {"replicas": 9, "template": {"spec": {"containers": '
                    '[{"name": "server", "image": "evil:1"}]}}}}')
    restored = eventually(operator, lambda: (d := cluster.get_object(DEPLOYMENTS, ns, "digits-predictor"))
                          and d["spec"]["template"]["spec"]["containers"][0]["image"] == image and d, "image restored")
    assert restored["spec"]["replicas"] == 1
    assert restored["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["caffeserve", "serve"]

    cluster.patch(CONFIGMAPS, ns, "digits-config", {"data": {"config.yaml": "name: hacked\n"}})
    eventually(operator, lambda: cluster.get_object(CONFIGMAPS, ns, "digits-config")["data"] == cm["data"],
               "config restored")

    cluster.kubectl("delete", "service", "digits-predictor", "-n", ns, "--wait=false")
    eventually(operator, lambda: cluster.get_object(SERVICES, ns, "digits-predictor"), "Service recreated")
    cluster.kubectl("delete", "configmap", "digits-config", "-n", ns, "--wait=false")
    eventually(operator, lambda: cluster.get_object(CONFIGMAPS, ns, "digits-config"), "ConfigMap recreated")

    reasons = [(t, r) for t, r, _ in events(cluster, ns, "digits")]
    assert ("Warning", "Restored") in reasons and ("Warning", "Recreated") in reasons
    assert [len(cluster.list_objects(res, ns)) for res in (CONFIGMAPS, DEPLOYMENTS, SERVICES)] == [1, 1, 1]


# ---------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------
def test_status_follows_the_pods(cluster, operator, ns):
    cluster.apply(cms("digits", ns, replicas=2))
    wait_children(cluster, operator, ns, "digits")

    play_kubelet(cluster, ns, "digits", ready_=1)
    cr = wait_ready(cluster, operator, ns, "digits", status="False", reason="Progressing",
                    message="1/2 replicas ready (loading the model?)")
    assert (cr["status"]["replicas"], cr["status"]["readyReplicas"]) == (2, 1)

    play_kubelet(cluster, ns, "digits", ready_=2)
    cr = wait_ready(cluster, operator, ns, "digits", status="True", reason="ReplicasReady")
    assert (cr["status"]["replicas"], cr["status"]["readyReplicas"]) == (2, 2)
    assert any(r == "Ready" for _, r, _ in events(cluster, ns, "digits"))

    # A model that never loads: the pods never turn ready, the Deployment gives up progressing.
    play_kubelet(cluster, ns, "digits", ready_=0, conditions=[
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
         "message": 'ReplicaSet "digits-predictor-5d9" has timed out progressing.'}])
    cr = wait_ready(cluster, operator, ns, "digits", status="False", reason="RolloutStalled")
    assert "model failing to load" in ready(cr)["message"]
    assert any(t == "Warning" and r == "NotReady" for t, r, _ in events(cluster, ns, "digits"))


# ---------------------------------------------------------------------------------------------
# bad specs
# ---------------------------------------------------------------------------------------------
def test_bad_specs_get_a_condition_and_no_children(cluster, operator, ns):
    cluster.apply(cms("cpu-with-gpus", ns, runtime={"device": "cpu", "gpus": 2}))
    cluster.apply(cms("escape", ns, source={"pvc": {"claimName": "models", "path": "a/../../etc"}}))
    # a real API server's schema stops this one
    cluster.apply({**cms("no-model", ns), "spec": {"source": {"pvc": {"claimName": "m"}}}})

    cr = wait_ready(cluster, operator, ns, "cpu-with-gpus", status="False", reason="InvalidSpec")
    assert "runtime.gpus is 2 but runtime.device is cpu" in ready(cr)["message"]
    assert cr["status"]["observedGeneration"] == 1 and "url" not in cr["status"]
    cr = wait_ready(cluster, operator, ns, "escape", status="False", reason="InvalidSpec")
    assert "spec.source.pvc.path" in ready(cr)["message"] and "'..'" in ready(cr)["message"]
    cr = wait_ready(cluster, operator, ns, "no-model", status="False", reason="InvalidSpec")
    assert "spec.model: Field required" in ready(cr)["message"]

    # Not retried in a loop: after the first answer, the operator leaves them alone.
    path = f"/apis/caffeserving.io/v1alpha1/namespaces/{ns}/caffemodelservices/cpu-with-gpus/status"
    writes = cluster.requests_seen("PATCH", path)
    time.sleep(2)
    assert cluster.requests_seen("PATCH", path) == writes == 1
    for name in ("cpu-with-gpus", "escape", "no-model"):
        assert children(cluster, ns, name) == (None, None, None)
        assert [r for t, r, _ in events(cluster, ns, name) if t == "Warning"] == ["InvalidSpec"]

    # Fixing the spec is what makes the operator try again.
    cluster.apply(cms("cpu-with-gpus", ns, runtime={"device": "cpu"}))
    wait_children(cluster, operator, ns, "cpu-with-gpus")
    wait_ready(cluster, operator, ns, "cpu-with-gpus", reason="Progressing", observedGeneration=2)


def test_a_bad_update_leaves_the_serving_pods_alone(cluster, operator, ns):
    cluster.apply(cms("digits", ns, runtime={"device": "cpu"}))
    _, dep, _ = wait_children(cluster, operator, ns, "digits")
    cluster.apply(cms("digits", ns, runtime={"device": "cpu", "gpus": 1}))
    cr = wait_ready(cluster, operator, ns, "digits", reason="InvalidSpec")
    assert "previous spec's pods keep running" in ready(cr)["message"]
    assert cluster.get_object(DEPLOYMENTS, ns, "digits-predictor")["spec"] == dep["spec"]


# ---------------------------------------------------------------------------------------------
# delete
# ---------------------------------------------------------------------------------------------
def test_delete_removes_everything(cluster, operator, ns):
    cluster.apply(cms("digits", ns))
    kids = wait_children(cluster, operator, ns, "digits")
    cr = wait_ready(cluster, operator, ns, "digits", observedGeneration=1)
    assert not cr["metadata"].get("finalizers")
    # What a real garbage collector acts on (caffe_testing.cluster.ApiServer plays it here).
    assert all(k["metadata"]["ownerReferences"][0]["uid"] == cr["metadata"]["uid"] for k in kids)

    cluster.kubectl("delete", "caffemodelservice", "digits", "-n", ns, "--wait=false")
    eventually(operator, lambda: children(cluster, ns, "digits") == (None, None, None), "children gone")
    assert cluster.get_object(CMS, ns, "digits") is None
    time.sleep(1)  # the children's DELETED events reach the operator: it must not resurrect them
    assert children(cluster, ns, "digits") == (None, None, None)


def test_turning_grpc_off_closes_its_ports_and_clears_the_grpc_address(cluster, operator, ns):
    cluster.apply(cms("digits", ns, runtime={"device": "cpu"}))
    wait_children(cluster, operator, ns, "digits")
    cr = eventually(operator, lambda: (c := cluster.get_object(CMS, ns, "digits")).get("status", {}).get("grpcAddress")
                    and c, "status.grpcAddress")
    assert cr["status"]["grpcAddress"] == f"digits-predictor.{ns}.svc:8081"

    cluster.apply(cms("digits", ns, runtime={"device": "cpu", "grpc": {"enabled": False}}))
    svc = eventually(operator, lambda: (s := cluster.get_object(SERVICES, ns, "digits-predictor"))
                     and len(s["spec"]["ports"]) == 1 and s, "the Service without its grpc port")
    assert svc["spec"]["ports"][0]["name"] == "http"
    dep = cluster.get_object(DEPLOYMENTS, ns, "digits-predictor")
    (server,) = dep["spec"]["template"]["spec"]["containers"]
    assert "--grpc-port" not in server["command"] and [p["name"] for p in server["ports"]] == ["http"]
    cm = cluster.get_object(CONFIGMAPS, ns, "digits-config")
    assert parse_config(yaml.safe_load(cm["data"]["config.yaml"]), environ={}).grpc.enabled is False
    cr = eventually(operator, lambda: (c := cluster.get_object(CMS, ns, "digits"))
                    and c["status"].get("observedGeneration") == 2 and c, "status of generation 2")
    assert "grpcAddress" not in cr["status"] and cr["status"]["url"]


# ---------------------------------------------------------------------------------------------
# restart
# ---------------------------------------------------------------------------------------------
def test_restart_in_the_middle_of_a_reconcile_converges():
    """Kill -9 the operator while its Service create hangs (the API server stored it but never
    answered), start another: it converges on exactly one of each child. This one runs its own
    emulator and a namespaced operator with a gateway URL."""
    with cluster_with_crd() as cluster:
        gateway = {"CAFFESERVE_GATEWAY_URL": "https://models.example.com",
                   "CAFFESERVE_GATEWAY_GRPC_ADDRESS": "grpc.models.example.com:443"}
        release = cluster.hang_requests("POST", "/api/v1/namespaces/prod/services")
        first = OperatorProcess(cluster, namespaces=["prod"], env=gateway).start()
        try:
            cluster.apply(cms("digits", "prod"))
            cluster.apply(cms("elsewhere", "dev"))  # not a namespace this operator watches
            eventually(first, lambda: cluster.requests_seen("POST", "/api/v1/namespaces/prod/services") == 1,
                       "the Service create to arrive")
            cr = cluster.get_object(CMS, "prod", "digits")
            assert "status" not in cr  # interrupted before it could write anything
        finally:
            first.kill()
            release()

        second = OperatorProcess(cluster, namespaces=["prod"], env=gateway).start()
        try:
            cr = wait_ready(cluster, second, "prod", "digits", status="False", reason="Progressing")
            assert cr["status"]["url"] == "https://models.example.com/v2/models/digits"
            assert cr["status"]["grpcAddress"] == "grpc.models.example.com:443"
            assert [len(cluster.list_objects(r, "prod")) for r in (CONFIGMAPS, DEPLOYMENTS, SERVICES)] == [1, 1, 1]
            assert all(children(cluster, "prod", "digits"))
            play_kubelet(cluster, "prod", "digits", ready_=1)
            wait_ready(cluster, second, "prod", "digits", status="True")
            assert children(cluster, "dev", "elsewhere") == (None, None, None)
            assert cluster.get_object(CMS, "dev", "elsewhere").get("status") is None
        finally:
            second.stop()
        assert "Traceback" not in second.logs(), second.logs()[-4000:]


# ---------------------------------------------------------------------------------------------
# startup
# ---------------------------------------------------------------------------------------------
def test_the_scope_is_a_required_choice(capsys):
    from caffe_operator.run import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args([])
    assert exit_.value.code == 2 and "--namespace" in capsys.readouterr().err
    args = parse_args(["--namespace", "a", "-n", "b"])
    assert args.namespaces == ["a", "b"] and not args.all_namespaces
    assert args.liveness == "http://0.0.0.0:8081/healthz"


def test_without_the_crd_the_operator_exits_and_says_why():
    with Cluster() as bare:
        op = OperatorProcess(bare, all_namespaces=True, env={"CAFFESERVE_CRD_WAIT_SECONDS": "1"}).start(wait=False)
        try:
            assert op.proc.wait(30) == 1
        finally:
            op.kill()
        assert "caffeserve operator: PermanentError: the API does not serve caffemodelservices" in op.logs()

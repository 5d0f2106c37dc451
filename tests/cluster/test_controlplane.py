"""The test cluster itself (caffe_testing/controlplane.py, nodeagent.py): what other tests rely on.

A real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler built by
scripts/kube/build.sh) and the node agent: nodes Ready with their GPU capacity, a pod scheduled
and run on its own address, readiness from its probe, a crash restarted and reported, a pod that
ignores SIGTERM killed at the end of its grace period, and the authorizer refusing what RBAC and
the Node authorizer do not allow.
"""

from __future__ import annotations

import sys
import time
import urllib.request

import pytest

from caffe_testing.controlplane import ControlPlane
from caffe_testing.kubeclient import ApiError, KubeClient
from caffe_testing.nodeagent import TEST_NODES, NodeAgent

pytestmark = pytest.mark.timeout(180)
PODS = "v1/pods"


@pytest.fixture(scope="module")
def kube():
    with ControlPlane() as cp, NodeAgent(cp, TEST_NODES) as agent:
        yield cp, agent


def pod(name: str, command: list[str], **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "main", "image": "python", "command": command, **spec.pop("container", {})}],
                     **spec}}


def phase_of(cp: ControlPlane, name: str) -> dict:
    return cp.get_object(PODS, "default", name) or {}


def test_nodes_are_ready_untainted_and_offer_their_gpus(kube):
    cp, _ = kube

    def settled() -> list[dict]:
        nodes = cp.list_objects("v1/nodes")
        ready = [n for n in nodes if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])]
        return nodes if len(ready) == 4 and not any(n["spec"].get("taints") for n in nodes) else []
    nodes = {n["metadata"]["name"]: n for n in cp.wait_for(settled, timeout=60, what="4 Ready nodes without taints")}
    assert nodes["gpu-small"]["status"]["allocatable"]["nvidia.com/gpu"] == "1"
    assert nodes["gpu-large"]["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert nodes["gpu-mig"]["status"]["allocatable"]["nvidia.com/mig-1g.10gb"] == "7"
    assert "nvidia.com/gpu" not in nodes["cpu-only"]["status"]["allocatable"]


def test_a_pod_is_scheduled_runs_on_its_own_address_and_turns_ready_by_its_probe(kube):
    cp, agent = kube
    cp.create(PODS, "default", pod("web", [sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0"],
                                   container={"ports": [{"containerPort": 8080}],
                                              "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}},
                                   nodeSelector={"kubernetes.io/hostname": "cpu-only"}))
    ready = cp.wait_for(lambda: (p := phase_of(cp, "web")) and any(
        c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", [])) and p,
        timeout=60, what="pod web Ready")
    assert ready["spec"]["nodeName"] == "cpu-only" and ready["status"]["phase"] == "Running"
    ip = ready["status"]["podIP"]
    assert ip.startswith("10.244.") and ready["status"]["hostIP"] != ip
    with urllib.request.urlopen(f"http://{ip}:8080/", timeout=10) as r:  # the container port itself, on the pod's address
        assert r.status == 200
    cp.delete(PODS, "default", "web")
    cp.wait_for(lambda: phase_of(cp, "web") == {}, timeout=30, what="pod web deleted")


def test_a_crashing_container_is_restarted_and_its_exit_reported(kube):
    cp, _ = kube
    cp.create(PODS, "default", pod("crash", [sys.executable, "-c", "import sys; sys.exit(3)"]))

    def restarted() -> dict:
        st = (phase_of(cp, "crash").get("status") or {}).get("containerStatuses") or [{}]
        return st[0] if st[0].get("restartCount", 0) >= 1 and st[0].get("lastState") else {}
    st = cp.wait_for(restarted, timeout=60, what="a restart")
    assert st["lastState"]["terminated"]["exitCode"] == 3 and st["lastState"]["terminated"]["reason"] == "Error"
    cp.delete(PODS, "default", "crash")


def test_a_pod_that_ignores_sigterm_is_killed_after_its_grace_period(kube):
    cp, agent = kube
    cp.create(PODS, "default", pod("stubborn", [sys.executable, "-c",
                                                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
                                   terminationGracePeriodSeconds=2))
    cp.wait_for(lambda: phase_of(cp, "stubborn").get("status", {}).get("phase") == "Running", timeout=60, what="running")
    worker = agent.pod("default", "stubborn")
    start = time.monotonic()
    cp.kubectl("delete", "pod", "stubborn", "--wait=true", timeout=60)
    took = time.monotonic() - start
    assert phase_of(cp, "stubborn") == {}
    (c,) = worker.containers
    assert c.terminated["exitCode"] == 137, c.terminated  # SIGKILL
    assert took >= 2, took


def test_rbac_refuses_a_service_account_without_rules(kube):
    cp, _ = kube
    cp.create("v1/serviceaccounts", "default", {"metadata": {"name": "nobody"}})
    token = cp.client.create("v1/serviceaccounts", "default", {"spec": {"expirationSeconds": 600}},
                             sub="token", name="nobody")["status"]["token"]
    nobody = KubeClient(cp.server, cp.ca.cert_path, token=token)
    with pytest.raises(ApiError) as refused:
        nobody.list_objects(PODS, "default")
    assert refused.value.status == 403
    assert 'User "system:serviceaccount:default:nobody" cannot list resource "pods"' in refused.value.message


def test_the_node_authorizer_keeps_a_node_to_its_own_pods_secrets(kube):
    cp, agent = kube
    cp.create("v1/secrets", "default", {"metadata": {"name": "not-for-nodes"}, "stringData": {"k": "v"}})
    with pytest.raises(ApiError) as refused:
        agent.nodes[0].client.get_object("v1/secrets", "default", "not-for-nodes")
    assert refused.value.status == 403
    assert "no relationship found between node" in refused.value.message, refused.value.message


def test_pod_security_admission_refuses_a_pod_the_restricted_profile_forbids(kube):
    cp, _ = kube
    cp.create_namespace("locked", {"pod-security.kubernetes.io/enforce": "restricted"})
    with pytest.raises(ApiError) as refused:
        loose = pod("loose", [sys.executable, "-c", "pass"])
        loose["metadata"]["namespace"] = "locked"
        cp.create(PODS, "locked", loose)
    assert refused.value.status == 403
    assert 'violates PodSecurity "restricted:latest"' in refused.value.message, refused.value.message
    assert cp.list_objects(PODS, "locked") == []

"""A model that fails to load says why in its CaffeModelService status, in the loader's own words.

End to end: the real operator process against kmock's emulator, and real `caffeserve serve`
processes on loopback standing in for the pods. The emulator runs no controllers, so the tests
play two of their parts, and say so where they do: the kubelet (`play_kubelet` patches the
Deployment's status) and the EndpointSlice controller (`publish_endpoints` writes the slice that
would list the pod, not ready, with its address and the Service's `http` port).

The pure parts (which endpoints to ask, what an answer means, what the condition says) are
tested directly first.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import time
from pathlib import Path

import kubernetes_validate
import pytest

from caffe_operator import variants
from caffe_operator.events import event_body
from caffe_operator.load_errors import LoadErrorProbe, Target, classify, not_ready_targets
from caffe_operator.reconcile import needs_recheck, recheck_delay
from caffe_operator.status import EndpointHealth, Readiness, with_load_errors
from caffe_testing.cluster import CMS, Cluster, free_port
from caffe_testing.cms import (ENDPOINTSLICES, cms, endpoint, endpoint_slice, events, play_kubelet, ready,
                               wait_children, wait_ready)
from caffe_testing.digits import DIGITS_DIR
from caffe_testing.servers import ServerProcess

PROGRESSING = Readiness("False", "Progressing", "0/1 replicas ready (loading the model?)")
MISSING = "model 'digits' failed to load: model weights file /models/w.caffemodel does not exist"


# ---------------------------------------------------------------------------------------------
# which endpoints are asked (pure)
# ---------------------------------------------------------------------------------------------
def test_only_not_ready_endpoints_of_the_service_are_asked():
    slices = [
        endpoint_slice("m-predictor", 8080, [
            endpoint("10.0.0.1", True, "m-1"),                       # ready: nothing to ask
            endpoint("10.0.0.2", None, "m-2"),                       # absent means ready (the API's rule)
            endpoint("10.0.0.3", False, "m-3"),
            endpoint("10.0.0.4", False, "m-4", terminating=True),    # on its way out
            endpoint("10.0.0.5", False),                             # no targetRef: named by address
        ]),
        endpoint_slice("other-predictor", 8080, [endpoint("10.0.1.1", False, "other-1")]),
    ]
    assert not_ready_targets(slices, "m-predictor", default_port=8080) == [
        Target("10.0.0.5:8080", "http://10.0.0.5:8080/v2/health/ready"),
        Target("pod m-3", "http://10.0.0.3:8080/v2/health/ready"),
    ]


def test_the_http_port_is_used_and_at_most_three_pods_are_asked_in_a_stable_order():
    many = [endpoint(f"10.0.0.{i}", False, f"m-{i}") for i in (9, 3, 7, 1, 5)]
    sl = endpoint_slice("m-predictor", 9000, many)
    sl["ports"].insert(0, {"name": "metrics", "port": 9090, "protocol": "TCP"})
    targets = not_ready_targets([sl], "m-predictor", default_port=8080)
    assert [t.endpoint for t in targets] == ["pod m-1", "pod m-3", "pod m-5"]
    assert targets[0].url == "http://10.0.0.1:9000/v2/health/ready"

    v6 = {**endpoint_slice("m-predictor", 8080, [endpoint("fd00::7", False)]), "addressType": "IPv6"}
    assert not_ready_targets([v6], "m-predictor", 8080) == [Target("[fd00::7]:8080", "http://[fd00::7]:8080/v2/health/ready")]


# ---------------------------------------------------------------------------------------------
# what an answer means (pure)
# ---------------------------------------------------------------------------------------------
def test_health_answers_are_classified():
    assert classify("pod a", 200, b'{"ready": true}') == EndpointHealth("pod a", "ready")
    assert classify("pod a", 503, b'{"ready": false, "error": "%s"}' % MISSING.encode()) == \
        EndpointHealth("pod a", "failed", MISSING)
    assert classify("pod a", 503, b'{"ready": false, "error": "model \'digits\' is loading"}') == \
        EndpointHealth("pod a", "loading", "model 'digits' is loading")
    assert classify("pod a", 503, b'{"ready": false, "error": "the server is shutting down"}').state == "other"
    assert classify("pod a", 502, b"<html>bad gateway</html>") == EndpointHealth("pod a", "other", "HTTP 502")
    long = classify("pod a", 503, b'{"error": "model \'m\' failed to load: %s"}' % (b"x" * 5000))
    assert long.state == "failed" and len(long.message) == 1024


# ---------------------------------------------------------------------------------------------
# what the condition says (pure)
# ---------------------------------------------------------------------------------------------
def test_a_load_failure_outranks_what_the_deployment_guesses():
    stalled = Readiness("False", "RolloutStalled", "0/2 replicas ready; pods did not become ready ...")
    health = [EndpointHealth("pod m-1", "failed", MISSING), EndpointHealth("pod m-2", "loading", "model 'digits' is loading")]
    for base in (PROGRESSING, stalled):
        assert with_load_errors(base, health) == Readiness("False", "ModelLoadFailed", f"pod m-1: {MISSING}")


def test_pods_with_the_same_error_share_one_message():
    sha = "model 'digits' failed to load: sha256 mismatch for /models/w.caffemodel: expected ab.., got cd.."
    health = [EndpointHealth("pod m-1", "failed", MISSING), EndpointHealth("pod m-2", "failed", sha),
              EndpointHealth("pod m-3", "failed", MISSING)]
    assert with_load_errors(PROGRESSING, health).message == f"pod m-1, pod m-3: {MISSING}; pod m-2: {sha}"


def test_loading_ready_or_unknown_answers_leave_the_deployments_reason():
    for state, message in (("loading", "model 'digits' is loading"), ("ready", ""),
                           ("other", "the server is shutting down"), ("unreachable", "ClientConnectorError")):
        assert with_load_errors(PROGRESSING, [EndpointHealth("pod m-1", state, message)]) == PROGRESSING
    assert with_load_errors(PROGRESSING, []) == PROGRESSING


def test_an_unreachable_pod_does_not_erase_a_known_load_failure():
    known = {"type": "Ready", "status": "False", "reason": "ModelLoadFailed", "message": f"pod m-1: {MISSING}"}
    blip = [EndpointHealth("pod m-1", "unreachable", "TimeoutError")]
    assert with_load_errors(PROGRESSING, blip, known) == Readiness("False", "ModelLoadFailed", f"pod m-1: {MISSING}")
    # ... but a pod that answers something else (reloading after a fix) does.
    assert with_load_errors(PROGRESSING, [EndpointHealth("pod m-1", "loading", "model 'digits' is loading")], known) == PROGRESSING
    assert with_load_errors(PROGRESSING, [], known) == PROGRESSING  # no pod left to ask


def test_ready_invalid_or_scaled_to_zero_models_are_not_explained_by_pods():
    health = [EndpointHealth("pod m-1", "failed", MISSING)]
    for base in (Readiness("True", "ReplicasReady", "2/2 replicas ready"),
                 Readiness("False", "InvalidSpec", "spec.runtime.gpus ..."),
                 Readiness("False", "ScaledToZero", "spec.replicas is 0")):
        assert with_load_errors(base, health) == base


def test_follow_ups_back_off_and_stop_once_the_cause_is_known():
    assert [recheck_delay(i, 10) for i in range(7)] == [10, 20, 40, 80, 160, 160, 160]
    assert needs_recheck(PROGRESSING)
    assert not needs_recheck(Readiness("False", "ModelLoadFailed", MISSING))
    assert not needs_recheck(Readiness("True", "ReplicasReady", "1/1 replicas ready"))


# ---------------------------------------------------------------------------------------------
# the probe never blocks long (real sockets)
# ---------------------------------------------------------------------------------------------
def test_a_pod_that_never_answers_costs_the_probe_its_timeout_only():
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        closed = free_port()

        async def ask() -> list[EndpointHealth]:
            probe = LoadErrorProbe(client=None, timeout_s=0.5)  # type: ignore[arg-type]  (no listing here)
            try:
                session = probe._open()
                return list(await asyncio.gather(
                    probe._probe(session, Target("pod silent", f"http://127.0.0.1:{port}/v2/health/ready")),
                    probe._probe(session, Target("pod gone", f"http://127.0.0.1:{closed}/v2/health/ready"))))
            finally:
                await probe.close()

        started = time.monotonic()
        silent_pod, gone_pod = asyncio.run(ask())
        elapsed = time.monotonic() - started
    assert (silent_pod.state, gone_pod.state) == ("unreachable", "unreachable")
    assert "Timeout" in silent_pod.message and "Connect" in gone_pod.message
    assert elapsed < 1.5  # concurrently, each within its 0.5 s


# ---------------------------------------------------------------------------------------------
# end to end: the real operator, real servers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def operator_env():
    # Short follow-ups and resync, so the test sees them (defaults: 10 s and 300 s).
    return {"CAFFESERVE_LOAD_RECHECK_SECONDS": "1", "CAFFESERVE_RESYNC_SECONDS": "2"}


def server_config(weights: Path | str) -> dict:
    return {"name": "digits", "model": {"prototxt": str(DIGITS_DIR / "deploy.prototxt"), "weights": str(weights)},
            "inputs": [{"name": "data", "shape": [1, 1, 8, 8], "datatype": "FP32"}], "outputs": [{"name": "prob"}]}


def publish_endpoints(cluster: Cluster, ns: str, name: str, pods: dict[str, int]) -> None:
    """Stand-in for the EndpointSlice controller: the model Service's slice lists these pods
    (name → the port its server listens on, all on 127.0.0.1), not ready, as the kubelet's
    readiness probe left them. One slice per pod, since each local server has its own port."""
    service = variants.predictor_name(name)
    for pod, port in pods.items():
        body = endpoint_slice(service, port, [{**endpoint("127.0.0.1", False, pod), "conditions": {
            "ready": False, "serving": False, "terminating": False}}], name=f"{pod}-slice", namespace=ns)
        body["endpoints"][0]["targetRef"]["namespace"] = ns
        if cluster.get_object(ENDPOINTSLICES, ns, body["metadata"]["name"]) is None:
            cluster.create(ENDPOINTSLICES, ns, body)
        else:
            cluster.patch(ENDPOINTSLICES, ns, body["metadata"]["name"], body)


def load_failed_events(cluster: Cluster, ns: str, name: str) -> list[tuple[str, str, str]]:
    return [e for e in events(cluster, ns, name) if e[1] == "ModelLoadFailed"]


def test_a_model_that_fails_to_load_says_why(cluster, operator, tmp_path):
    ns, pod = "load-failure", "digits-predictor-6d8f9b7c4-x2k4q"
    weights = tmp_path / "models" / "digits.caffemodel"  # never written
    cluster.apply(cms("digits", ns, runtime={"device": "cpu"}))
    wait_children(cluster, operator, ns, "digits")

    # The pod is scheduled and listed before its server listens: nothing to learn from it yet.
    server = ServerProcess(server_config(weights), tmp_path, wait_ready=False)
    publish_endpoints(cluster, ns, "digits", {pod: server.port})
    play_kubelet(cluster, ns, "digits", ready_=0, total=1)
    wait_ready(cluster, operator, ns, "digits", status="False", reason="Progressing")

    # Its server comes up and fails to load the model. Nothing the operator watches changes; its
    # follow-up looks (or the resync) find out.
    with server:
        cr = wait_ready(cluster, operator, ns, "digits", status="False", reason="ModelLoadFailed")
        message = ready(cr)["message"]
        assert message == f"pod {pod}: model 'digits' failed to load: model weights file {weights} does not exist"
        assert (cr["status"]["replicas"], cr["status"]["readyReplicas"]) == (1, 0)
        assert load_failed_events(cluster, ns, "digits") == [("Warning", "ModelLoadFailed", message)]

        # Resyncs (every 2 s here) and further Deployment changes ask again: same answer, no new event.
        play_kubelet(cluster, ns, "digits", ready_=0, total=1, conditions=[
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
             "message": 'ReplicaSet "digits-predictor-6d8f9b7c4" has timed out progressing.'}])
        time.sleep(5)
        assert ready(cluster.get_object(CMS, ns, "digits"))["reason"] == "ModelLoadFailed"  # outranks RolloutStalled
        assert len(load_failed_events(cluster, ns, "digits")) == 1

    # The user puts the weights in place; the pod restarts and loads them; the kubelet marks it ready.
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes((DIGITS_DIR / "digits.caffemodel").read_bytes())
    with ServerProcess(server_config(weights), tmp_path) as server:
        publish_endpoints(cluster, ns, "digits", {pod: server.port})
        play_kubelet(cluster, ns, "digits", ready_=0, total=1, conditions=[])
        wait_ready(cluster, operator, ns, "digits", status="False", reason="Progressing")
        play_kubelet(cluster, ns, "digits", ready_=1, total=1, conditions=[])
        wait_ready(cluster, operator, ns, "digits", status="True", reason="ReplicasReady")
    assert len(load_failed_events(cluster, ns, "digits")) == 1


def test_a_healthy_or_unreachable_pod_is_no_load_failure(cluster, operator, tmp_path):
    ns = "load-healthy"
    cluster.apply(cms("digits", ns, replicas=2, runtime={"device": "cpu"}))
    wait_children(cluster, operator, ns, "digits")

    # One pod whose server is up but that the kubelet has not yet marked ready, one that does not
    # answer at all (the network, or a pod not listening yet).
    with ServerProcess(DIGITS_DIR / "server.yaml") as server:
        publish_endpoints(cluster, ns, "digits", {"digits-predictor-a": server.port, "digits-predictor-b": free_port()})
        play_kubelet(cluster, ns, "digits", ready_=0, total=2)
        wait_ready(cluster, operator, ns, "digits", status="False", reason="Progressing",
                   message="0/2 replicas ready (loading the model?)")
        time.sleep(3)  # follow-ups (every 1-2 s here) and a resync: they find nothing to report
        cr = cluster.get_object(CMS, ns, "digits")
        assert ready(cr)["reason"] == "Progressing", ready(cr)
    assert load_failed_events(cluster, ns, "digits") == []


def test_events_are_core_v1_events_the_api_server_accepts():
    cr = {"apiVersion": "caffeserving.io/v1alpha1", "kind": "CaffeModelService",
          "metadata": {"name": "digits", "namespace": "ml", "uid": "u-1"}}
    when = datetime.datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=datetime.timezone.utc)
    body = event_body(cr, "Warning", "ModelLoadFailed", "x" * 5000, component="caffe-serving-operator",
                      instance="op-0", now=when)
    assert body["involvedObject"] == {"apiVersion": "caffeserving.io/v1alpha1", "kind": "CaffeModelService",
                                      "name": "digits", "namespace": "ml", "uid": "u-1"}
    assert body["metadata"]["namespace"] == "ml" and len(body["message"]) == 1024 and "..." in body["message"]
    assert (body["eventTime"], body["lastTimestamp"]) == ("2026-11-25T10:00:00.123456Z", "2026-11-25T10:00:00Z")
    kubernetes_validate.validate(body | {"metadata": {**body["metadata"], "name": "caffe-serving-x"}},
                                 kubernetes_validate.latest_version(), strict=True)


def test_a_caffe_abort_at_load_reaches_the_status_in_caffes_words(cluster, operator, tmp_path):
    """Caffe ends a process with a CHECK (here: an unknown layer type); the server's load probe catches it in
    a child process, so the pod stays up and says why, and the operator reports it as ModelLoadFailed."""
    ns, pod = "load-abort", "digits-predictor-7c9d8e6f5-a1b2c"
    proto = tmp_path / "unknown.prototxt"
    proto.write_text((DIGITS_DIR / "deploy.prototxt").read_text().replace('type: "Softmax"', 'type: "Frobnicate"'))
    cfg = server_config(DIGITS_DIR / "digits.caffemodel")
    cfg["model"]["prototxt"] = str(proto)
    cluster.apply(cms("digits", ns, runtime={"device": "cpu"}))
    wait_children(cluster, operator, ns, "digits")
    with ServerProcess(cfg, tmp_path, wait_ready=False) as server:
        publish_endpoints(cluster, ns, "digits", {pod: server.port})
        play_kubelet(cluster, ns, "digits", ready_=0, total=1)
        cr = wait_ready(cluster, operator, ns, "digits", status="False", reason="ModelLoadFailed")
        message = ready(cr)["message"]
        assert message.startswith(f"pod {pod}: model 'digits' failed to load: Caffe aborted the load (SIGABRT)"), message
        assert "Check failed: registry.count(type) == 1 (0 vs. 1) Unknown layer type: Frobnicate" in message
        assert server.proc.poll() is None

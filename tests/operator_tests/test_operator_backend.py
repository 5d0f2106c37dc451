"""The CaffeModelService status says which backend serves the model and why, as a ready pod says it.

End to end: the real operator process against kmock's emulator, and real `caffeserve serve`
processes (the digits example, `backend: auto` and `backend: pycaffe`) on loopback standing in
for the pods. The emulator runs no controllers, so the test plays two of their parts, as
test_operator_load_errors.py does: the kubelet (`play_kubelet`) and the EndpointSlice controller
(`publish_ready` writes the slice listing the pod as ready).

The pure parts (when to ask, whom to ask, what an answer means, the status patch) come first.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from caffe_operator import api, crd, variants
from caffe_operator.backend_report import Answer, BackendReport, needs_probe, parse_metadata, ready_target
from caffe_operator.pods import Target
from caffe_operator.status import Readiness, build_status, status_patch
from caffe_testing.cluster import CMS, DEPLOYMENTS, Cluster, OperatorProcess
from caffe_testing.cms import (
    ENDPOINTSLICES,
    cms,
    endpoint,
    endpoint_slice,
    eventually,
    play_kubelet,
    wait_children,
    wait_ready,
)
from caffe_testing.digits import DIGITS_DIR
from caffe_testing.servers import ServerProcess

FP = ("hash-1", 3)
ONNX = BackendReport(
    "onnxruntime", "auto: parity check passed, the converted graph matches pycaffe (max |Δ| 3.1e-06 ...)", 3.1e-06
)


# ---------------------------------------------------------------------------------------------
# when to ask (pure)
# ---------------------------------------------------------------------------------------------
def answer(report=ONNX, fingerprint=FP, settled=True, ready=2, at=100.0, error=""):
    return Answer(fingerprint, report, settled, ready, at, error)


def test_a_steady_model_is_asked_once():
    assert needs_probe(None, FP, settled=True, ready_replicas=2, now=100) == "no answer yet"
    for now in (101, 10_000):  # resyncs, child events: the answer holds
        assert needs_probe(answer(), FP, settled=True, ready_replicas=2, now=now) is None
    assert needs_probe(answer(), FP, settled=True, ready_replicas=1, now=101) is None  # a pod restarting


def test_a_new_pod_template_or_generation_is_asked_again():
    for changed in (("hash-2", 3), ("hash-1", 4)):
        assert needs_probe(answer(), changed, settled=False, ready_replicas=2, now=101) == \
            "the pod template or the spec changed"


def test_an_answer_from_a_rollout_is_checked_once_the_pods_change():
    during = answer(settled=False, ready=1)
    assert needs_probe(during, FP, settled=False, ready_replicas=1, now=101) is None
    assert (
        needs_probe(during, FP, settled=False, ready_replicas=2, now=101) == "the ready pods changed during the rollout"
    )
    assert needs_probe(during, FP, settled=True, ready_replicas=2, now=101) == "the rollout finished"


def test_an_answer_given_while_autos_check_runs_is_asked_again_until_it_has_ended():
    checking = answer(BackendReport("pycaffe", "auto: serving with pycaffe while the onnxruntime check ...",
                                    checking=True))
    assert needs_probe(checking, FP, settled=True, ready_replicas=2, now=105) is None
    assert needs_probe(checking, FP, settled=True, ready_replicas=2, now=115) == \
        "the pod's onnxruntime check was still running"
    assert parse_metadata(200, b'{"parameters": {"backend": "pycaffe", "backend_reason": "auto: ... beside it", '
                               b'"backend_check": "running"}}').checking is True
    assert parse_metadata(200, b'{"parameters": {"backend": "onnxruntime", "backend_reason": "auto: onnxruntime", '
                               b'"backend_check": "done"}}').checking is False


def test_a_failed_ask_is_retried_later_or_when_the_ready_pods_change():
    failed = answer(report=None, error="TimeoutError")
    assert needs_probe(failed, FP, settled=True, ready_replicas=2, now=130, retry_s=60) is None
    assert (
        needs_probe(failed, FP, settled=True, ready_replicas=2, now=160, retry_s=60) == "the last ask failed 60 s ago"
    )
    assert (
        needs_probe(failed, FP, settled=True, ready_replicas=3, now=101)
        == "the ready pods changed since the last failed ask"
    )


def test_no_ready_pod_no_ask():
    assert needs_probe(None, FP, settled=False, ready_replicas=0, now=100) is None


# ---------------------------------------------------------------------------------------------
# whom to ask, what the answer means (pure)
# ---------------------------------------------------------------------------------------------
def test_the_first_ready_pod_by_name_is_asked_for_the_model_metadata():
    slices = [
        endpoint_slice("m-predictor", 8080, [endpoint("10.0.0.9", True, "m-c"), endpoint("10.0.0.3", None, "m-b"),
                                             endpoint("10.0.0.1", False, "m-a"),            # not ready
                                             endpoint("10.0.0.2", True, "m-0", terminating=True)]),
        endpoint_slice("other-predictor", 8080, [endpoint("10.0.1.1", True, "a-other")]),
    ]
    assert ready_target(slices, "m-predictor", 8080, "m") == Target("pod m-b", "http://10.0.0.3:8080/v2/models/m")
    assert ready_target(slices[1:], "m-predictor", 8080, "m") is None


def test_model_metadata_answers_are_read():
    onnx = (b'{"name": "digits", "parameters": {"backend": "onnxruntime", "backend_reason": "auto: matches",'
            b' "parity_max_abs_diff": 3.1e-06, "parity_passed": true}}')
    assert parse_metadata(200, onnx) == BackendReport("onnxruntime", "auto: matches", 3.1e-06)
    assert parse_metadata(
        200, b'{"parameters": {"backend": "pycaffe", "backend_reason": "backend: pycaffe in the config"}}'
    ) == BackendReport("pycaffe", "backend: pycaffe in the config")
    assert (
        parse_metadata(404, b'{"error": "model \'m\' is not served here"}') == "HTTP 404: model 'm' is not served here"
    )
    assert "no parameters.backend" in parse_metadata(200, b'{"name": "m", "parameters": {"instances": 1}}')
    assert parse_metadata(200, b"<html>") == "the model metadata is not JSON"
    assert (
        parse_metadata(200, b'{"parameters": {"backend": "pycaffe", "parity_max_abs_diff": true}}').max_abs_diff is None
    )


# ---------------------------------------------------------------------------------------------
# the status (pure)
# ---------------------------------------------------------------------------------------------
def test_the_last_answer_stays_until_a_new_one_and_a_vanished_figure_is_removed():
    ready = Readiness("True", "ReplicasReady", "1/1 replicas ready")
    dep = {"status": {"replicas": 1, "readyReplicas": 1}}
    first = build_status(generation=1, readiness_=ready, deployment=dep, previous=None, url=None, selector=None,
                         backend=ONNX.as_status())
    assert first["backend"] == {"name": "onnxruntime", "reason": ONNX.reason, "maxAbsDiff": 3.1e-06}
    api.CaffeModelServiceStatus.model_validate(first)
    kept = build_status(generation=1, readiness_=ready, deployment=dep, previous=first, url=None, selector=None)
    assert kept["backend"] == first["backend"]
    pycaffe = build_status(generation=2, readiness_=ready, deployment=dep, previous=first, url=None, selector=None,
                           backend=BackendReport("pycaffe", "backend: pycaffe in the config").as_status())
    assert status_patch(first, pycaffe)["backend"] == {"maxAbsDiff": None, "name": "pycaffe",
                                                       "reason": "backend: pycaffe in the config"}


def test_kubectl_get_shows_the_backend():
    (version,) = crd.custom_resource_definition()["spec"]["versions"]
    assert {"name": "Backend", "type": "string", "jsonPath": ".status.backend.name",
            "description": "pycaffe or onnxruntime, as a ready pod reports it."} in version["additionalPrinterColumns"]
    backend = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["backend"]
    assert set(backend["properties"]) == {"name", "reason", "maxAbsDiff"}
    assert backend["properties"]["maxAbsDiff"]["type"] == "number"


# ---------------------------------------------------------------------------------------------
# end to end: the real operator, real servers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def operator_env():
    return {"CAFFESERVE_LOAD_RECHECK_SECONDS": "1", "CAFFESERVE_RESYNC_SECONDS": "1"}


def digits_server(backend: str, tmp_path: Path) -> ServerProcess:
    """The digits example served with `backend`, as the pod's server would serve it."""
    cfg = yaml.safe_load((DIGITS_DIR / "server.yaml").read_text())
    for role in ("prototxt", "weights", "labels"):
        cfg["model"][role] = str(DIGITS_DIR / cfg["model"][role])
    cfg["backend"] = backend
    return ServerProcess(cfg, tmp_path, env={"CAFFESERVE_CACHE_DIR": str(tmp_path / "onnx-cache")})


def publish_ready(cluster: Cluster, ns: str, pod: str, port: int) -> None:
    """Stand-in for the EndpointSlice controller: the Service's slice for `pod` lists it ready."""
    body = endpoint_slice(variants.predictor_name("digits"), port, [endpoint("127.0.0.1", True, pod)],
                          name=f"{pod}-slice", namespace=ns)
    if cluster.get_object(ENDPOINTSLICES, ns, body["metadata"]["name"]) is None:
        cluster.create(ENDPOINTSLICES, ns, body)
    else:
        cluster.patch(ENDPOINTSLICES, ns, body["metadata"]["name"], body)


def wait_backend(cluster: Cluster, op: OperatorProcess, ns: str, name: str) -> dict:
    """Until status.backend names `name`; returns status.backend."""
    def check():
        backend = (cluster.get_object(CMS, ns, "digits").get("status") or {}).get("backend") or {}
        return backend if backend.get("name") == name else None
    return eventually(op, check, f"{ns}/digits status.backend.name == {name}")


def test_the_status_says_which_backend_serves_and_why(cluster, operator, tmp_path):
    ns = "backend"
    cluster.apply(cms("digits", ns, runtime={"device": "cpu", "backend": "onnxruntime"}))
    wait_children(cluster, operator, ns, "digits")

    # onnxruntime: the digits net converts and passes the parity gate, so ONNX Runtime serves it. (Under
    # auto it would not: ONNX Runtime runs this tiny net at ~0.8× pycaffe's speed, see test_onnx_verdict.py.)
    with digits_server("onnxruntime", tmp_path) as auto:
        publish_ready(cluster, ns, "digits-predictor-5f7c9-a", auto.port)
        play_kubelet(cluster, ns, "digits", ready_=1)
        wait_ready(cluster, operator, ns, "digits", status="True")
        backend = wait_backend(cluster, operator, ns, "onnxruntime")
        assert backend["reason"].startswith("backend: onnxruntime: parity check passed, the converted graph matches "
                                            "pycaffe (max |Δ|"), backend
        assert 0 <= backend["maxAbsDiff"] <= 1e-5 * 9  # the parity bound: 1e-5 × max(1, |logits| ≈ 8.7)

        # The user asks for pycaffe: a new pod template. The old pod still answers while the new
        # one loads (what it says is what the status says), then it is replaced.
        cms_pycaffe = cms("digits", ns, runtime={"device": "cpu", "backend": "pycaffe"})
        old_hash = cluster.get_object(DEPLOYMENTS, ns, "digits-predictor")["spec"]["template"]["metadata"][
            "annotations"
        ]
        cluster.apply(cms_pycaffe)
        eventually(operator, lambda: cluster.get_object(DEPLOYMENTS, ns, "digits-predictor")["spec"]["template"]
                   ["metadata"]["annotations"] != old_hash, "the new pod template")
        with digits_server("pycaffe", tmp_path) as pycaffe:
            cluster.delete(ENDPOINTSLICES, ns, "digits-predictor-5f7c9-a-slice")
            publish_ready(cluster, ns, "digits-predictor-6b8d4-b", pycaffe.port)
            play_kubelet(cluster, ns, "digits", ready_=1)
            wait_ready(cluster, operator, ns, "digits", status="True")
            backend = wait_backend(cluster, operator, ns, "pycaffe")
            assert backend == {"name": "pycaffe", "reason": "backend: pycaffe in the config"}  # no parity figure left

            # A steady model is not asked again on every reconcile (resyncs every second here):
            # the pod behind the endpoint now says otherwise, and the status does not follow.
            publish_ready(cluster, ns, "digits-predictor-6b8d4-b", auto.port)
            time.sleep(3)
            assert cluster.get_object(CMS, ns, "digits")["status"]["backend"]["name"] == "pycaffe"
    assert "backend pycaffe: backend: pycaffe in the config" in operator.logs()

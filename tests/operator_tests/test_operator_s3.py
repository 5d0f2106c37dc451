"""`source.s3` through the operator: a wrong checksum or a missing object says so in the
CaffeModelService's status (Ready=False, ModelFetchFailed, fetch's own message).

The real operator against kmock's emulator; a real S3 API (moto in server mode, on loopback); the
fetch init containers are the real `caffeserve fetch`, run from the Deployment's pod template with
the Secret's keys as their environment. The emulator has no kubelet, so the test plays it (and says
so): it runs the init containers (caffe_testing/kubelet.py) and writes the Pod with their statuses,
the termination message being the failed container's log tail (FallbackToLogsOnError).
"""

from __future__ import annotations

import base64

import pytest
import yaml

from caffe_testing.cluster import CMS
from caffe_testing.cms import cms, events, wait_children, wait_ready
from caffe_testing.digits import DIGITS_DIR
from caffe_testing.kubelet import ContainerProcess
from caffe_testing.s3 import CREDENTIALS, MotoS3

SERVER = yaml.safe_load((DIGITS_DIR / "server.yaml").read_text())
WEIGHTS_SHA = SERVER["model"]["weightsSha256"]


@pytest.fixture(scope="module")
def operator_env():
    return {"CAFFESERVE_LOAD_RECHECK_SECONDS": "1", "CAFFESERVE_RESYNC_SECONDS": "2"}


@pytest.fixture(scope="module")
def s3():
    with MotoS3() as server:
        server.upload("models", "zoo/digits/v1", {n: DIGITS_DIR / n for n in ("deploy.prototxt", "digits.caffemodel")})
        yield server


def play_kubelet_for_init_containers(cluster, ns: str, name: str, workdir) -> list[dict]:
    """Run the pod template's init containers in order until one fails; write the Pod with their statuses."""
    dep = cluster.get_object("apps/v1/deployments", ns, f"{name}-predictor")
    template = dep["spec"]["template"]
    pod_name = f"{name}-predictor-6f7d9c8b5-q2x7z"
    statuses = []
    for init in template["spec"]["initContainers"]:
        proc = ContainerProcess(template, init["name"], namespace=ns, pod_name=pod_name, workdir=workdir,
                                cluster=cluster)
        statuses.append(proc.run_to_completion())
        if statuses[-1]["lastState" if "lastState" in statuses[-1] else "state"]["terminated"]["exitCode"] != 0:
            break
    cluster.create("v1/pods", ns, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": ns, "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
        "status": {"phase": "Pending", "initContainerStatuses": statuses},
    })
    return statuses


def s3_model(cluster, ns: str, endpoint: str, prefix: str, weights_sha: str) -> dict:
    secret_data = {**CREDENTIALS, "AWS_REGION": "us-east-1"}
    data = {k: base64.b64encode(v.encode()).decode() for k, v in secret_data.items()}
    cluster.create("v1/secrets", ns, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
                                      "data": data})
    return cms("digits", ns, source={"s3": {"bucket": "models", "prefix": prefix, "endpoint": endpoint,
                                            "secretRef": {"name": "s3-creds"}}},
               model={"prototxt": "deploy.prototxt", "weights": "digits.caffemodel", "weightsSha256": weights_sha},
               runtime={"device": "cpu"})


@pytest.mark.parametrize("case", ["wrong checksum", "missing key"])
def test_a_failed_s3_fetch_is_a_clear_status(cluster, operator, ns, s3, tmp_path, case):
    prefix, sha = ("zoo/digits/v1", "0" * 64) if case == "wrong checksum" else ("zoo/digits/v9", WEIGHTS_SHA)
    cluster.create(CMS, ns, s3_model(cluster, ns, s3.endpoint, prefix, sha))
    _, dep, _ = wait_children(cluster, operator, ns, "digits")
    init = {c["name"]: c for c in dep["spec"]["template"]["spec"]["initContainers"]}
    assert init["fetch-weights"]["command"][:4] == ["caffeserve", "fetch", "--url",
                                                    f"s3://models/{prefix}/digits.caffemodel"]
    assert init["fetch-weights"]["command"][-2:] == ["--s3-credentials-dir", "/var/run/secrets/caffeserve/s3"]

    statuses = play_kubelet_for_init_containers(cluster, ns, "digits", tmp_path)
    failed = statuses[-1]["name"]
    cr = wait_ready(cluster, operator, ns, "digits", status="False", reason="ModelFetchFailed")
    message = [c for c in cr["status"]["conditions"] if c["type"] == "Ready"][0]["message"]
    assert message.startswith("pod digits-predictor-6f7d9c8b5-q2x7z: init container ")
    if case == "wrong checksum":
        assert failed == "fetch-weights"  # the prototxt came down fine first
        assert ("init container fetch-weights failed: fetch: s3://models/zoo/digits/v1/digits.caffemodel: "
                f"sha256 mismatch: expected {'0' * 64}, got {WEIGHTS_SHA}") in message
    else:
        assert failed == "fetch-prototxt"
        assert ("init container fetch-prototxt failed: fetch: s3://models/zoo/digits/v9/deploy.prototxt at "
                f"{s3.endpoint}: no object with key 'zoo/digits/v9/deploy.prototxt' in bucket 'models' (NoSuchKey)") \
            in message
    assert [e for e in events(cluster, ns, "digits") if e[1] == "ModelFetchFailed"] == [
        ("Warning", "ModelFetchFailed", message)]  # once, however often the operator looks again

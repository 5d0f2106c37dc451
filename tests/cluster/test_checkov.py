"""checkov (Kubernetes hygiene) on what we deploy: the chart as rendered by real Helm (NetworkPolicies
on; the gateway with TLS and TokenReview, so its Secret volume and auth-delegator binding are seen)
and the operator's model pods (every source, with the NetworkPolicy peers the chart gives the
operator). Every finding must be in charts/checkov-accepted.yaml with its reason, and every entry
there must still be needed. checkov lives in a venv of its own (`make setup`: .venv-checkov)."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from caffe_operator import api, manifests, variants
from caffe_testing.chart import helm_cluster, helm_install, one, rendered_objects
from caffe_testing.cluster import REPO

ACCEPTED = REPO / "charts" / "checkov-accepted.yaml"
SHA = "ab" * 32
MODEL_SPECS = {
    "pvc": yaml.safe_load((REPO / "examples" / "digits" / "service.yaml").read_text())["spec"],
    "url": {"source": {"url": "https://models.example.com/digits/"},
            "model": {"prototxt": "deploy.prototxt", "weights": "digits.caffemodel", "weightsSha256": SHA}},
    "s3": {"source": {"s3": {"bucket": "models", "prefix": "digits", "secretRef": {"name": "s3-creds"}}},
           "model": {"prototxt": "deploy.prototxt", "weights": "digits.caffemodel", "weightsSha256": SHA},
           "resources": {"requests": {"cpu": "1", "memory": "2Gi"}}},
}


def checkov_binary() -> str:
    for candidate in (os.environ.get("CHECKOV"), REPO / ".venv-checkov" / "bin" / "checkov"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("checkov is not installed: `make setup` puts it in .venv-checkov (or set CHECKOV=path)")


@pytest.fixture(scope="module")
def findings(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("checkov")
    with helm_cluster() as cluster:
        chart = rendered_objects(helm_install(cluster, "cs", "caffe-system", {
            "networkPolicy": {"enabled": True},
            "gateway": {"tls": {"secretName": "gateway-tls"}, "auth": {"mode": "tokenreview"}},
            "podTLS": {"secretName": "pod-tls"}}))
    (out / "chart.yaml").write_text(yaml.safe_dump_all(chart))
    operator = one(chart, "Deployment", "cs-caffe-serving-operator")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in operator["env"]}
    peers = json.loads(env["CAFFESERVE_NETWORK_POLICY_FROM"])  # what the chart tells the operator
    for source, raw in MODEL_SPECS.items():
        variant = variants.Variant(f"digits-{source}", api.parse_spec(f"digits-{source}", raw))
        kids = manifests.children(variant, "ml", env["CAFFESERVE_SERVER_IMAGE"], peers,
                                  pod_tls=env["CAFFESERVE_POD_TLS_SECRET"])
        (out / f"model-{source}.yaml").write_text(yaml.safe_dump_all(kids.all()))
    proc = subprocess.run([checkov_binary(), "-d", str(out), "--framework", "kubernetes", "-o", "json", "--quiet",
                           "--compact", "--skip-download"], capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [f for r in reports for f in r["results"]["failed_checks"]]
    print("\ncheckov findings:")
    for f in sorted(failed, key=lambda f: (f["resource"], f["check_id"])):
        print(f"  {f['check_id']:<12} {f['resource']:<50} {f['check_name']}")
    return failed


def accepted() -> list[dict]:
    return yaml.safe_load(ACCEPTED.read_text())["accepted"]


def is_accepted(finding: dict, entry: dict) -> bool:
    return (finding["check_id"] == entry["check"]
            and any(fnmatch.fnmatch(finding["resource"], p) for p in entry["resources"]))


def test_every_finding_is_accepted_with_a_reason(findings):
    entries = accepted()
    assert all(len(e["reason"].split()) >= 15 for e in entries)
    unexplained = [f"{f['check_id']} {f['resource']}: {f['check_name']}" for f in findings
                   if not any(is_accepted(f, e) for e in entries)]
    assert not unexplained, ("fix these, or accept them in charts/checkov-accepted.yaml with a reason:\n"
                             + "\n".join(unexplained))


def test_every_accepted_finding_still_occurs(findings):
    stale = [f"{e['check']} {p}" for e in accepted() for p in e["resources"]
             if not any(f["check_id"] == e["check"] and fnmatch.fnmatch(f["resource"], p) for f in findings)]
    assert not stale, "no longer found: remove from charts/checkov-accepted.yaml:\n" + "\n".join(stale)


def test_model_pods_have_a_network_policy_and_a_memory_limit(findings):
    model = [f for f in findings if f["resource"].endswith("-predictor")]
    assert model, "checkov found nothing on the model pods: did it scan them?"
    flagged = {f["check_id"] for f in model}
    assert not flagged & {"CKV2_K8S_6", "CKV_K8S_13", "CKV_K8S_10", "CKV_K8S_12"}, flagged

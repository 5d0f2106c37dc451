"""The CaffeModelService CRD: generated from the pydantic model, valid, and strict where it should be.

Sample CRs are checked against the CRD's openAPIV3Schema with jsonschema (OpenAPI 3.0 schemas are
draft-4 JSON schemas plus `x-kubernetes-*` keys). Unknown fields are made errors here, as kubectl's
default `--validate=strict` (server-side fieldValidation=Strict) makes them; CEL and pruning are not
emulated. What a schema cannot reject is the operator's job: see the InvalidSpec cases below.
"""

from __future__ import annotations

import copy
import glob
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from caffe_operator import api, crd
from caffe_testing import REPO
from inference_server.config import ModelServing

CRD_FILE = REPO / "crds" / "caffemodelservices.yaml"


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILE.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def strict(schema: Any) -> Any:
    """Unknown fields are errors (kubectl --validate=strict), except where the schema preserves them."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


VALIDATOR = jsonschema.Draft4Validator(strict(crd_schema()))


def schema_errors(doc: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(doc)]


def sample(**spec_changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "source": {"pvc": {"claimName": "models", "path": "digits"}},
        "model": {"prototxt": "deploy.prototxt", "weights": "digits.caffemodel"},
    }
    spec.update(spec_changes)
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "digits"}, "spec": spec}


def example_crs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(glob.glob(str(REPO / "examples" / "**" / "*.yaml"), recursive=True)):
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if isinstance(doc, dict) and doc.get("kind") == api.KIND:
                docs.append((str(Path(path).relative_to(REPO)), doc))
    return docs


# ---------------------------------------------------------------------------------------------
# one source of truth
# ---------------------------------------------------------------------------------------------
def test_checked_in_crd_is_what_the_model_generates():
    assert CRD_FILE.read_text() == crd.crd_yaml(), (
        "crds/caffemodelservices.yaml drifted from operator/caffe_operator/api.py: run `make crd`"
    )


def test_caffeserve_crd_prints_the_crd(capsys):
    from caffeserve import main

    assert main(["crd"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(CRD_FILE.read_text())


def test_crd_passes_kubernetes_validate():
    crd = yaml.safe_load(CRD_FILE.read_text())
    kubernetes_validate.validate(crd, "1.30.0", strict=True)
    kubernetes_validate.validate(crd, kubernetes_validate.latest_version(), strict=True)


def test_names_and_subresources_are_the_contract():
    crd = yaml.safe_load(CRD_FILE.read_text())
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "caffemodelservices.caffeserving.io"
    assert spec["group"] == "caffeserving.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "CaffeModelService"
    assert spec["names"]["plural"] == "caffemodelservices"
    assert spec["names"]["shortNames"] == ["cms"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Device"] == ".spec.runtime.device"
    assert columns["URL"] == ".status.url"
    assert {"Replicas", "Age"} <= set(columns)


def _walk(schema: dict[str, Any], path: str = ""):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")


def test_every_field_has_a_description_for_kubectl_explain():
    schema = crd_schema()
    nodes = [*_walk(schema["properties"]["spec"], ".spec"), *_walk(schema["properties"]["status"], ".status")]
    # items of scalar lists (shape: [1, 3, 224, 224]) are described by their list
    missing = [p for p, node in nodes
               if not node.get("description") and not (p.endswith("[]") and node.get("type") != "object")]
    assert not missing, f"fields without a description: {missing}"


def test_schema_is_structural():
    """Every node has a type (or preserves unknown fields); junctors carry only value validations."""
    problems = []
    for path, node in _walk(crd_schema()):
        if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields") \
                and not node.get("x-kubernetes-int-or-string"):
            problems.append(f"{path}: no type")
        for junctor in ("oneOf", "anyOf", "allOf", "not"):
            for alt in node.get(junctor, []) if junctor != "not" else [node.get("not") or {}]:
                bad = set(alt) & {"type", "description", "default", "additionalProperties", "nullable"}
                if bad:
                    problems.append(f"{path}.{junctor}: {bad}")
        if "additionalProperties" in node and "properties" in node:
            problems.append(f"{path}: properties and additionalProperties together")
        if node.get("additionalProperties") is False:
            problems.append(f"{path}: additionalProperties: false")
    assert not problems


def test_every_serving_field_of_the_server_config_is_in_the_cr():
    """The CR reuses the server's config types: each ModelServing field has a home in the spec."""
    cr_fields = set(api.ModelSpec.model_fields) | set(api.RuntimeSpec.model_fields)
    assert set(ModelServing.model_fields) - {"device"} <= cr_fields
    assert api.RuntimeSpec.model_fields["batching"].annotation is ModelServing.model_fields["batching"].annotation
    assert api.RuntimeSpec.model_fields["limits"].annotation is ModelServing.model_fields["limits"].annotation


# ---------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------
def test_there_are_gpu_examples():
    names = [p for p, _ in example_crs()]
    assert any(p.endswith("-gpu.yaml") for p in names), names


@pytest.mark.parametrize("path,doc", example_crs(), ids=lambda v: v if isinstance(v, str) else "")
def test_example_crs_validate(path, doc):
    assert schema_errors(doc) == []
    api.parse_spec(doc["metadata"]["name"], doc["spec"])  # and the operator accepts them


GOOD = {
    "pvc source": sample(),
    "url source with per-file URL and sha256": sample(
        source={"url": "https://models.example.com/digits/"},
        model={"prototxt": "deploy.prototxt", "weights": "https://cdn.example.com/w/digits.caffemodel",
               "weightsSha256": "ab" * 32, "labels": "labels.txt"},
    ),
    "configMap source": sample(source={"configMap": {"name": "digits-files"}}),
    "cpu, serving fields": sample(
        runtime={"device": "cpu", "instances": 2, "backend": "onnxruntime",
                 "batching": {"enabled": "auto", "maxBatchSize": 16}, "limits": {"maxBatch": 8}},
        model={"prototxt": "d.prototxt", "weights": "w.caffemodel",
               "inputs": [{"name": "data", "datatype": "BYTES"}], "outputs": [{"name": "prob"}],
               "preprocessing": {"color": False, "imageSize": [8, 8], "meanValues": [4.9]}},
    ),
    "pod placement": sample(
        replicas=0, resources={"limits": {"cpu": "2", "memory": "4Gi"}}, nodeSelector={"gpu": "a100"},
        tolerations=[{"key": "k", "operator": "Exists"}],
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
        runtimeClassName="nvidia", priorityClassName="high", imagePullSecrets=[{"name": "regcred"}],
        serviceAccountName="models-reader",
    ),
    "MIG resource": sample(runtime={"device": "gpu", "gpus": 2, "gpuResource": "nvidia.com/mig-1g.10gb"}),
}


@pytest.mark.parametrize("name", GOOD)
def test_good_samples_validate(name):
    assert schema_errors(GOOD[name]) == []
    api.parse_spec("digits", GOOD[name]["spec"])


def _without(doc: dict[str, Any], *path: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return doc


BROKEN = {
    "no spec": _without(sample(), "spec"),
    "no model": _without(sample(), "spec", "model"),
    "no weights": _without(sample(), "spec", "model", "weights"),
    "no source": _without(sample(), "spec", "source"),
    "two sources": sample(source={"pvc": {"claimName": "m"}, "url": "https://x.example/m/"}),
    "empty source": sample(source={}),
    "ftp url": sample(source={"url": "ftp://x.example/m/"}),
    "bad sha256": sample(model={"prototxt": "d", "weights": "w", "weightsSha256": "123"}),
    "unknown device": sample(runtime={"device": "tpu"}),
    "zero gpus": sample(runtime={"gpus": 0}),
    "negative replicas": sample(replicas=-1),
    "replicas as text": sample(replicas="two"),
    "unknown field": sample(model={"prototxt": "d", "weights": "w", "weigths": "typo"}),
    "unknown backend": sample(runtime={"backend": "tensorrt"}),
    "bad batching flag": sample(runtime={"batching": {"enabled": "sometimes"}}),
    "bad datatype": sample(model={"prototxt": "d", "weights": "w", "inputs": [{"name": "x", "datatype": "FP8"}]}),
    "bad claim name": sample(source={"pvc": {"claimName": "Models_Dir"}}),
    "instances 0": sample(runtime={"instances": 0}),
}


@pytest.mark.parametrize("name", BROKEN)
def test_broken_samples_are_rejected_by_the_schema(name):
    assert schema_errors(BROKEN[name]), f"{name} passed the schema"


# What the schema cannot say: the operator answers InvalidSpec with a message naming the field.
SEMANTIC = {
    "gpus with device cpu": (sample(runtime={"device": "cpu", "gpus": 1}), "runtime.gpus"),
    "pvc path with ..": (sample(source={"pvc": {"claimName": "m", "path": "models/../../etc"}}), "'..'"),
    "absolute pvc path": (sample(source={"pvc": {"claimName": "m", "path": "/etc"}}), "relative"),
    "model file escaping the source": (sample(model={"prototxt": "../d", "weights": "w"}), "model.prototxt"),
    "URL file without url source": (sample(model={"prototxt": "d", "weights": "https://x.example/w"}), "model.weights"),
    "GPU in resources": (sample(resources={"limits": {"nvidia.com/gpu": 2}}), "nvidia.com/gpu"),
    "two files, one path": (sample(source={"url": "https://x.example/"},
                                   model={"prototxt": "w", "weights": "https://y.example/w"}), "/models/w"),
    "slash in configMap key": (sample(source={"configMap": {"name": "m"}}, model={"prototxt": "a/d", "weights": "w"}),
                               "ConfigMap"),
}


@pytest.mark.parametrize("name", SEMANTIC)
def test_semantic_errors_pass_the_schema_but_not_the_operator(name):
    doc, needle = SEMANTIC[name]
    assert schema_errors(doc) == []
    with pytest.raises(api.InvalidSpec) as err:
        api.parse_spec("digits", doc["spec"])
    assert needle in str(err.value)


@pytest.mark.parametrize("bad_name", ["Digits", "my.model", "x" * 54, "9lives"])
def test_names_that_cannot_name_a_service_are_invalid(bad_name):
    with pytest.raises(api.InvalidSpec, match="metadata.name"):
        api.parse_spec(bad_name, sample()["spec"])


def test_the_status_the_operator_writes_fits_the_schema():
    from caffe_operator.status import build_status, readiness

    dep = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
                                                      "readyReplicas": 2}}
    status = build_status(generation=4, readiness_=readiness(2, dep), deployment=dep, previous=None,
                          url="http://digits-predictor.ml.svc:8080/v2/models/digits",
                          selector="caffeserving.io/model=digits")
    assert schema_errors({**sample(), "status": status}) == []
    api.CaffeModelServiceStatus.model_validate(status)


def test_kubectl_get_shows_the_grpc_address():
    version = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert columns["gRPC"]["jsonPath"] == ".status.grpcAddress" and columns["gRPC"].get("priority", 0) == 0
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["grpcAddress"]["type"] == "string"
    runtime = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["runtime"]["properties"]
    assert runtime["grpc"]["properties"]["enabled"]["type"] == "boolean"

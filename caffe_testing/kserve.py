"""KServe for tests: its CRDs (ClusterServingRuntime, InferenceService), trimmed to the fields we write.

KServe's controller cannot run here (no Knative, no container runtime), so what the tests check is what
KServe's API would take: `caffe_testing/kserve_crds/` holds KServe's published CRDs
(`config/crd/full/serving.kserve.io_*.yaml`), cut down to the property paths in `KEEP_RUNTIME` and
`KEEP_ISVC` (each kept property exactly as published: types, enums, required lists; the InferenceService's
status left open, since only KServe's controller writes it). `python -m caffe_testing.kserve FULL_CRD...`
trims a newer release's files the same way. Installed in the real API server (controlplane.py), they make
it validate an InferenceService and a ClusterServingRuntime as a cluster with KServe would; `unknown_fields`
(caffe_testing/keda.py) checks a manifest against a schema offline, as the API server's pruning would.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

CRD_DIR = Path(__file__).parent / "kserve_crds"
RUNTIME_CRD_FILE = CRD_DIR / "serving.kserve.io_clusterservingruntimes.yaml"
ISVC_CRD_FILE = CRD_DIR / "serving.kserve.io_inferenceservices.yaml"
CLUSTERSERVINGRUNTIMES = "serving.kserve.io/v1alpha1/clusterservingruntimes"
INFERENCESERVICES = "serving.kserve.io/v1beta1/inferenceservices"

ALL = True  # keep this property's whole schema
_CONTAINER = {k: ALL for k in ("name", "image", "command", "args", "ports", "env", "securityContext", "resources",
                               "readinessProbe")}
KEEP_RUNTIME: dict[str, Any] = {
    "apiVersion": ALL, "kind": ALL, "metadata": ALL, "status": ALL,
    "spec": {"annotations": ALL, "supportedModelFormats": ALL, "protocolVersions": ALL, "disabled": ALL,
             "containers": _CONTAINER},
}
KEEP_ISVC: dict[str, Any] = {
    "apiVersion": ALL, "kind": ALL, "metadata": ALL,
    "spec": {"predictor": {
        "minReplicas": ALL, "maxReplicas": ALL, "scaleMetric": ALL, "scaleTarget": ALL, "canaryTrafficPercent": ALL,
        "model": {k: ALL for k in ("modelFormat", "runtime", "storageUri", "protocolVersion", "resources", "args",
                                   "env")}}},
}


def trim(schema: dict[str, Any], keep: Any) -> dict[str, Any]:
    """`schema` with only the properties on the paths of `keep` (a tree of names; ALL keeps a subtree)."""
    if keep is ALL:
        return copy.deepcopy(schema)
    out = {k: copy.deepcopy(v) for k, v in schema.items() if k not in ("properties", "items")}
    if "items" in schema:
        return {**out, "items": trim(schema["items"], keep)}
    props = schema.get("properties", {})
    missing = set(keep) - set(props)
    if missing:
        raise KeyError(f"not in the published schema: {sorted(missing)}")
    out["properties"] = {k: trim(props[k], keep[k]) for k in keep}
    required = [r for r in out.get("required", []) if r in keep]
    out.pop("required", None)
    if required:
        out["required"] = required
    return out


def trimmed_crd(crd: dict[str, Any], keep: Any, open_status: bool = False) -> dict[str, Any]:
    crd = copy.deepcopy(crd)
    crd["metadata"] = {"name": crd["metadata"]["name"]}
    for version in crd["spec"]["versions"]:
        schema = trim(version["schema"]["openAPIV3Schema"], keep)
        if open_status:
            schema["properties"]["status"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        version["schema"]["openAPIV3Schema"] = schema
    return crd


def load_crd(path: Path) -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(path.read_text())
    return crd


def runtime_crd() -> dict[str, Any]:
    return load_crd(RUNTIME_CRD_FILE)


def isvc_crd() -> dict[str, Any]:
    return load_crd(ISVC_CRD_FILE)


def schema_of(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def main(paths: list[str]) -> None:
    """Trim KServe's full CRD files (ClusterServingRuntime, InferenceService) into kserve_crds/."""
    for path in paths:
        crd = yaml.safe_load(Path(path).read_text())
        kind = crd["spec"]["names"]["kind"]
        keep, target = {"ClusterServingRuntime": (KEEP_RUNTIME, RUNTIME_CRD_FILE),
                        "InferenceService": (KEEP_ISVC, ISVC_CRD_FILE)}[kind]
        header = "".join(line + "\n" for line in target.read_text().splitlines() if line.startswith("#"))
        target.write_text(header + yaml.safe_dump(trimmed_crd(crd, keep, kind == "InferenceService"),
                                                  sort_keys=False, width=120))


if __name__ == "__main__":
    main(sys.argv[1:])

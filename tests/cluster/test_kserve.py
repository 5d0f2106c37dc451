"""KServe: our ClusterServingRuntime for `modelFormat: caffe` (examples/kserve/, the chart's kserve.runtime) and
the server started exactly as its container spec says.

- the runtime and the example InferenceService fit KServe's published CRD schemas (trimmed to the fields we
  write, caffe_testing/kserve.py): nothing unknown (the API server would prune it), every type right;
- the chart renders the same runtime, with its server image, only when kserve.runtime.enabled (real Helm
  into the emulator, KServe's CRD registered there);
- a real API server (caffe_testing/controlplane.py) with KServe's CRDs installed accepts the runtime and an
  InferenceService with modelFormat caffe unchanged, and refuses a malformed one with the schema's message;
- `caffeserve serve` started from the runtime's command and args (KServe's `{{.Name}}` filled in, /mnt/models
  a folder like the storage initializer's) answers tritonclient over REST and gRPC, from a folder with a
  server.yaml and from one with only the Caffe files.

What is not KServe's: no KServe controller runs (no Knative, no container runtime here), so no pod is made
from the InferenceService; the test plays the part of the container runtime by running the container's
command line on this machine, with the ports mapped to free ones.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml

from caffe_testing import REPO
from caffe_testing.chart import helm_cluster, helm_install, rendered_objects
from caffe_testing.controlplane import ControlPlane
from caffe_testing.digits import DIGITS_DIR, digits_data
from caffe_testing.keda import unknown_fields
from caffe_testing.kserve import CLUSTERSERVINGRUNTIMES, INFERENCESERVICES, isvc_crd, runtime_crd, schema_of
from caffe_testing.kubeclient import ApiError
from caffe_testing.servers import free_port, http, stop_process

pytestmark = pytest.mark.timeout(300)
RUNTIME = yaml.safe_load((REPO / "examples" / "kserve" / "clusterservingruntime.yaml").read_text())
ISVC = yaml.safe_load((REPO / "examples" / "kserve" / "inferenceservice.yaml").read_text())
CHART_YAML = yaml.safe_load((REPO / "charts" / "caffe-serving" / "Chart.yaml").read_text())
CRD_RESOURCE = "apiextensions.k8s.io/v1/customresourcedefinitions"


def test_the_runtime_and_the_inferenceservice_fit_kserves_crd_schemas():
    assert unknown_fields(RUNTIME, schema_of(runtime_crd())) == []
    assert unknown_fields(ISVC, schema_of(isvc_crd())) == []
    spec = RUNTIME["spec"]
    assert spec["supportedModelFormats"][0]["name"] == "caffe" and spec["protocolVersions"] == ["v2", "grpc-v2"]
    (container,) = spec["containers"]
    assert {"--model_name={{.Name}}", "--model_dir=/mnt/models"} <= set(container["args"])
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("http1", 8080), ("grpc", 8081)]
    model = ISVC["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "caffe" and model["runtime"] == RUNTIME["metadata"]["name"]
    # a field KServe does not know is found (the check is not vacuous)
    typo = copy.deepcopy(ISVC)
    typo["spec"]["predictor"]["model"]["modelformat"] = {"name": "caffe"}
    assert unknown_fields(typo, schema_of(isvc_crd())) == [
        ".spec.predictor.model.modelformat: unknown to the schema (would be pruned)"]


def register_runtime_kind(cluster) -> None:
    cluster.create(CRD_RESOURCE, None, runtime_crd())


def chart_runtimes(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    with helm_cluster() as cluster:
        register_runtime_kind(cluster)
        release = helm_install(cluster, "cs", "caffe-system", values)
    return [o for o in rendered_objects(release) if o["kind"] == "ClusterServingRuntime"]


def test_the_chart_ships_the_same_runtime_off_by_default():
    assert chart_runtimes(None) == []
    (runtime,) = chart_runtimes({"kserve": {"runtime": {"enabled": True}}})
    assert runtime["metadata"]["name"] == RUNTIME["metadata"]["name"]
    assert runtime["metadata"]["labels"]["app.kubernetes.io/part-of"] == "caffe-serving"
    # the example names the chart's default server image at the chart's appVersion
    assert runtime["spec"] == RUNTIME["spec"]
    assert RUNTIME["spec"]["containers"][0]["image"].endswith(":" + CHART_YAML["appVersion"])
    assert unknown_fields(runtime, schema_of(runtime_crd())) == []
    (custom,) = chart_runtimes({"kserve": {"runtime": {"enabled": True, "name": "caffe-gpu",
                                                       "resources": {"limits": {"nvidia.com/gpu": 1}}}},
                                "server": {"image": {"repository": "registry.example/caffe", "tag": "7"}}})
    container = custom["spec"]["containers"][0]
    assert custom["metadata"]["name"] == "caffe-gpu" and container["image"] == "registry.example/caffe:7"
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": 1}  # Helm merges maps


# --------------------------------------------------------------------------------------------
# a real API server with KServe's CRDs
# --------------------------------------------------------------------------------------------
def established(cp: ControlPlane, name: str) -> bool:
    crd = cp.get_object(CRD_RESOURCE, None, name) or {}
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def test_a_real_api_server_with_kserves_crds_accepts_the_runtime_and_a_caffe_inferenceservice():
    with ControlPlane() as cp:
        for crd in (runtime_crd(), isvc_crd()):
            cp.create(CRD_RESOURCE, None, crd)
            cp.wait_for(lambda crd=crd: established(cp, crd["metadata"]["name"]), timeout=30,
                        what=f"{crd['metadata']['name']} established")
        cp.create_namespace("ml")
        cp.apply(RUNTIME)
        cp.apply(ISVC, namespace="ml")
        stored = cp.get_object(CLUSTERSERVINGRUNTIMES, None, RUNTIME["metadata"]["name"])
        assert stored is not None and stored["spec"] == RUNTIME["spec"]  # nothing pruned, nothing defaulted away
        isvc = cp.get_object(INFERENCESERVICES, "ml", "digits")
        assert isvc is not None and isvc["spec"] == ISVC["spec"]
        # a malformed InferenceService is refused with the schema's message; the stored one is unchanged
        bad = copy.deepcopy(ISVC)
        bad["metadata"]["name"] = "bad"
        bad["spec"]["predictor"]["model"]["modelFormat"] = {"version": "1"}  # its name is required
        with pytest.raises(ApiError) as refused:
            cp.create(INFERENCESERVICES, "ml", bad)
        assert refused.value.status == 422 and "spec.predictor.model.modelFormat.name: Required value" in str(
            refused.value), refused.value
        assert cp.get_object(INFERENCESERVICES, "ml", "bad") is None
        assert cp.get_object(INFERENCESERVICES, "ml", "digits")["spec"] == ISVC["spec"]


# --------------------------------------------------------------------------------------------
# the server, started from the runtime's container spec
# --------------------------------------------------------------------------------------------
def container_command(model_dir: Path, name: str, http_port: int, grpc_port: int) -> list[str]:
    """The runtime container's command line as KServe's pod would run it: `{{.Name}}` is the InferenceService's
    name, /mnt/models the storage initializer's folder (here `model_dir`), ports mapped to free ones."""
    (container,) = RUNTIME["spec"]["containers"]
    ports = {"8080": str(http_port), "8081": str(grpc_port)}
    argv = []
    for arg in container["command"] + container["args"]:
        arg = arg.replace("{{.Name}}", name).replace("/mnt/models", str(model_dir))
        flag, eq, value = arg.partition("=")
        argv.append(f"{flag}={ports.get(value, value)}" if eq and flag.endswith("_port") else arg)
    assert argv[0] == "caffeserve"
    return [str(Path(sys.executable).parent / "caffeserve"), *argv[1:]]


def storage_folder(tmp_path: Path, with_config: bool) -> Path:
    """What KServe's storage initializer leaves for a storageUri holding the digits files."""
    folder = tmp_path / "mnt-models"
    folder.mkdir()
    for name in ("deploy.prototxt", "digits.caffemodel", "labels.txt") + (("server.yaml",) if with_config else ()):
        shutil.copy(DIGITS_DIR / name, folder / name)
    return folder


@pytest.mark.parametrize("with_config", [False, True], ids=["caffe-files-only", "with-server-yaml"])
def test_the_server_started_from_the_runtimes_args_answers_tritonclient_over_rest_and_grpc(tmp_path, with_config):
    folder = storage_folder(tmp_path, with_config)
    http_port, grpc_port = free_port(), free_port()
    argv = container_command(folder, "digits-isvc", http_port, grpc_port)
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log.read_text()}"
            try:
                if http("GET", f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"not ready in 120 s:\n{log.read_text()}"
            time.sleep(0.2)
        images, labels = digits_data.held_out()
        x = digits_data.to_blob(images[:20])
        # KServe's name for the model, not the config's: clients call /v2/models/{InferenceService name}
        rest = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        meta = rest.get_model_metadata("digits-isvc")
        assert [i["name"] for i in meta["inputs"]] == ["data"] and [o["name"] for o in meta["outputs"]] == ["prob"]
        inp = httpclient.InferInput("data", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        prob = rest.infer("digits-isvc", [inp]).as_numpy("prob")
        assert (prob.argmax(axis=1) == labels[:20]).mean() >= 0.9
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        ginp = grpcclient.InferInput("data", list(x.shape), "FP32")
        ginp.set_data_from_numpy(x)
        gprob = grpc.infer("digits-isvc", [ginp]).as_numpy("prob")
        np.testing.assert_array_equal(gprob, prob)
        grpc.close()
        text = log.read_text()
        if with_config:
            assert "its server.yaml" in text
            # the folder's config applies: its preprocessing takes a PNG as a BYTES input
            png = grpcclient.InferInput("data", [1], "BYTES")
            png.set_data_from_numpy(np.array([digits_data.render_png(images[0], size=32)], dtype=object))
            grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            top = grpc.infer("digits-isvc", [png], outputs=[grpcclient.InferRequestedOutput("prob", class_count=1)])
            assert int(top.as_numpy("prob")[0][0].decode().split(":")[1]) == labels[0]
            grpc.close()
        else:
            assert "no server.yaml, serving deploy.prototxt and digits.caffemodel" in text
    finally:
        assert stop_process(proc, 30) == 0, log.read_text()[-3000:]

"""`caffeserve export`: what a user leaving Caffe takes away, checked as they would check it.

The exported ONNX file runs under ONNX Runtime and under OpenCV 5's `cv2.dnn.readNetFromONNX` (PyPI's
opencv-python-headless, in .venv-opencv: its wheels need numpy 2, pycaffe's build numpy 1) and gives
pycaffe's answers within the tolerance the report says it passed; the report beside it has the figures; a
net that cannot be converted exactly is refused naming each layer, writing nothing; the Triton repository's
config.pbtxt parses with Triton's own ModelConfig protobuf (tritonclient.grpc.model_config_pb2) and says
what the batching probe found. Real pycaffe, onnxruntime, OpenCV and the `caffeserve` command; no doubles.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from caffe_testing import REPO
from caffe_testing.digits import DIGITS_DIR
from caffe_testing.nets import batch_folding_net, forward, save_net, zoo_net
from caffe_testing.servers import CAFFESERVE

OPENCV_PYTHON = REPO / ".venv-opencv" / "bin" / "python"


def export(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*CAFFESERVE, "export", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def feeds(inputs: dict[str, list[int]], n: int = 3, batch: int = 2, seed: int = 7) -> list[dict[str, np.ndarray]]:
    """Inputs the report did not use (another seed, another batch size): the graph must hold beyond them."""
    rng = np.random.default_rng(seed)
    return [{name: rng.uniform(-1, 1, (batch, *shape[1:])).astype(np.float32) for name, shape in inputs.items()}
            for _ in range(n)]


def assert_within(report: dict, got: dict[str, np.ndarray], ref: dict[str, np.ndarray], who: str) -> None:
    for blob, r in ref.items():
        assert got[blob].shape == r.shape, (who, blob)
        diff = float(np.abs(got[blob].astype(np.float64) - r).max())
        limit = report["tolerance"] * max(1.0, float(np.abs(r).max()))
        assert diff <= limit, f"{who}: '{blob}' max |Δ| {diff:.3g} > {limit:.3g}"


def opencv_forward(onnx_path: Path, feed: dict[str, np.ndarray], outputs: list[str], tmp: Path) -> dict:
    if not OPENCV_PYTHON.is_file():
        pytest.fail("OpenCV is not installed: `make setup` puts opencv-python-headless 5 in .venv-opencv")
    np.savez(tmp / "in.npz", **feed)
    proc = subprocess.run([str(OPENCV_PYTHON), str(Path(__file__).parent / "opencv_forward.py"), str(onnx_path),
                           str(tmp / "in.npz"), str(tmp / "out.npz"), *outputs], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp / "out.npz") as out:
        assert str(out["__version__"]).startswith("5."), f"OpenCV {out['__version__']}, not 5.x"
        return {n: out[n] for n in outputs}


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-export")
    proc = export(DIGITS_DIR / "server.yaml", "--onnx", out / "digits.onnx", "--triton-repo", out / "triton")
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout, json.loads((out / "digits.parity.json").read_text())


def test_the_report_says_what_passed_per_output_per_layer_with_the_opset_and_tolerance(digits_export):
    out, stdout, report = digits_export
    assert report["passed"] is True and report["opset"] == 17 and report["tolerance"] == 1e-5
    assert report["inputs"] == {"data": [1, 1, 8, 8]} and report["outputs"] == {"prob": [1, 10]}
    assert report["n_inputs"] == 4  # 3 seeded random inputs and one image through the preprocessing
    by_blob = {p["blob"]: p for p in report["parity"]}
    # the output, and the logits feeding its Softmax (a softmax squashes errors, so they are compared too)
    assert by_blob["prob"]["kind"] == "output" and by_blob["logits"]["kind"] == "logits"
    for p in by_blob.values():
        assert p["passed"] and p["max_abs_diff"] <= p["limit"] == 1e-5 * max(1.0, p["max_abs_ref"])
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["conv1"]["type"] == "Convolution" and layers["conv1"]["onnx_ops"] == ["Conv"]
    assert layers["prob"]["onnx_ops"] == ["Softmax"] and not any(layer["refused"] for layer in report["layers"])
    import hashlib

    assert report["onnx_sha256"] == hashlib.sha256((out / "digits.onnx").read_bytes()).hexdigest()
    summary = (out / "digits.parity.txt").read_text()
    assert summary in stdout
    assert "PASSED" in summary and "ONNX opset 17" in summary and "tolerance 1e-05" in summary
    assert "conv1" in summary and "Conv" in summary


def test_onnxruntime_and_opencv5_give_pycaffes_answers_within_the_reported_tolerance(digits_export, tmp_path):
    out, _, report = digits_export
    sess = ort.InferenceSession(str(out / "digits.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["prob"]  # the served outputs only: no extra parity outputs
    for feed in feeds(report["inputs"]):
        ref = forward(DIGITS_DIR / "deploy.prototxt", DIGITS_DIR / "digits.caffemodel", feed)
        assert_within(report, dict(zip(["prob"], sess.run(["prob"], feed), strict=True)), ref, "onnxruntime")
        assert_within(report, opencv_forward(out / "digits.onnx", feed, ["prob"], tmp_path), ref, "OpenCV")


def test_the_triton_repository_parses_as_triton_model_config(digits_export):
    from tritonclient.grpc import model_config_pb2

    out, _, report = digits_export
    folder = out / "triton" / "digits"
    assert (folder / "1" / "model.onnx").read_bytes() == (out / "digits.onnx").read_bytes()
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "digits" and config.backend == "onnxruntime"
    assert config.max_batch_size == 64  # batch-separable: limits.maxBatch, the largest batch a request may carry
    assert report["triton"]["batch_separable"] is True
    (inp,) = config.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("data", model_config_pb2.TYPE_FP32, [1, 8, 8])
    (outp,) = config.output
    assert (outp.name, list(outp.dims), outp.label_filename) == ("prob", [10], "labels.txt")
    assert (folder / "labels.txt").read_text() == (DIGITS_DIR / "labels.txt").read_text()
    assert not config.HasField("dynamic_batching")  # the digits config leaves batching off


def test_a_model_folder_without_config_exports_with_the_nets_own_io(tmp_path):
    """A folder as KServe's storage initializer leaves it: the prototxt and caffemodel only."""
    folder = tmp_path / "zoo"
    proto, weights = save_net(zoo_net(), folder, "deploy")
    proc = export(folder, "--onnx", tmp_path / "zoo.onnx", "--triton-repo", tmp_path / "triton", "--inputs", "2")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "zoo.parity.json").read_text())
    assert report["model"] == "zoo" and report["config"] == "inferred" and report["n_inputs"] == 2
    assert set(report["outputs"]) == {"prob", "feat", "pooled"}
    types = {layer["type"] for layer in report["layers"]}
    assert {"BatchNorm", "Scale", "LRN", "Eltwise", "Concat", "Dropout"} <= types
    sess = ort.InferenceSession(str(tmp_path / "zoo.onnx"), providers=["CPUExecutionProvider"])
    names = list(report["outputs"])
    for feed in feeds(report["inputs"], n=2, batch=3):
        ref = forward(proto, weights, feed)
        assert_within(report, dict(zip(names, sess.run(names, feed), strict=True)), ref, "onnxruntime")
        assert_within(report, opencv_forward(tmp_path / "zoo.onnx", feed, names, tmp_path), ref, "OpenCV")


def test_a_net_that_folds_the_batch_gets_max_batch_size_0_and_the_batch_in_its_dims(tmp_path):
    folder = tmp_path / "folding"
    save_net(batch_folding_net(), folder, "deploy")
    proc = export(folder, "--onnx", tmp_path / "folding.onnx", "--triton-repo", tmp_path / "triton")
    assert proc.returncode == 0, proc.stderr
    from tritonclient.grpc import model_config_pb2

    text = (tmp_path / "triton" / "folding" / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.max_batch_size == 0  # Triton must never split its output between requests
    # [N, 4] in, [1, 6N] out: the probe saw axis 1 follow the batch, so it is -1 as well
    assert list(config.input[0].dims) == [-1, 4] and list(config.output[0].dims) == [-1, -1]
    report = json.loads((tmp_path / "folding.parity.json").read_text())
    assert report["triton"]["batch_separable"] is False
    assert "does not keep the batch on axis 0" in report["triton"]["batch_separable_reason"]


def refused_net():
    """Two layer types Caffe runs and the converter has no exact form for (Threshold, MVN), with a conv between."""
    import caffe
    from caffe import layers as L

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3)
    n.gate = L.Threshold(n.conv, threshold=0.1)
    n.norm = L.MVN(n.gate)
    n.score = L.InnerProduct(n.norm, num_output=5)
    return n


def test_a_net_that_cannot_be_converted_is_refused_naming_each_layer_and_nothing_is_written(tmp_path):
    save_net(refused_net(), tmp_path / "refused", "deploy")
    proc = export(tmp_path / "refused", "--onnx", tmp_path / "out.onnx", "--triton-repo", tmp_path / "triton")
    assert proc.returncode == 1, proc.stderr
    assert "refused" in proc.stderr and "cannot convert 2 of 5 layers" in proc.stderr
    # each layer by name and type, not only the first the converter meets
    assert "layer 'gate' (Threshold)" in proc.stderr and "layer 'norm' (MVN)" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["refused"]  # no ONNX file, no report, no repository


def test_usage_and_config_errors_exit_2_and_a_model_pycaffe_cannot_load_exits_1(tmp_path):
    assert export(tmp_path / "missing.yaml", "--onnx", tmp_path / "x.onnx").returncode == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = export(empty, "--onnx", tmp_path / "x.onnx")
    assert proc.returncode == 2 and "has no prototxt" in proc.stderr
    assert export(DIGITS_DIR / "server.yaml").returncode == 2  # --onnx is required
    broken = tmp_path / "broken"
    shutil.copytree(DIGITS_DIR, broken, ignore=shutil.ignore_patterns("server.yaml", "*.py", "*.json", "*.md"))
    (broken / "digits.caffemodel").write_bytes(b"not weights")
    proc = export(broken, "--onnx", tmp_path / "x.onnx")
    assert proc.returncode == 1 and "digits" in proc.stderr
    assert not (tmp_path / "x.onnx").exists()

"""The CUDA build of Caffe (`make cuda-build`), loaded here where there is no GPU.

The build compiles and links with CUDA 13 from PyPI; loaded in a process of its own (two pycaffe
builds cannot share one), its CPU mode must give the CPU build's answers, and a server asked for
`device: {kind: gpu}` must fail at startup with the clear message, not crash. Skipped where
`make cuda-build` has not run. Also: the CUDA source patch and the GPU memory guard, which need no build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from caffe_testing import REPO
from caffe_testing.nets import save_net
from caffe_testing.servers import ServerProcess, http, http_json

BUILD = REPO / ".caffe-cuda" / "build"
PYVER = f"{sys.version_info[0]}.{sys.version_info[1]}"
CUDA_PACKAGE = BUILD / f"py{PYVER}"


def cuda_env() -> dict:
    cuda_lib = (REPO / ".caffe-cuda" / "cuda" / "lib").resolve()
    return {**os.environ,
            "PYTHONPATH": os.pathsep.join([str(CUDA_PACKAGE), str(REPO), os.environ.get("PYTHONPATH", "")]),
            "LD_LIBRARY_PATH": os.pathsep.join([str(cuda_lib), os.environ.get("LD_LIBRARY_PATH", "")])}


needs_build = pytest.mark.skipif(not (CUDA_PACKAGE / "caffe" / "_caffe.so").exists(),
                                 reason=f"no CUDA build for Python {PYVER}: run `make cuda-build`")


def zoo_like(directory: Path) -> tuple[Path, Path]:
    """A small net of the zoo's layer types: conv-BatchNorm-Scale-ReLU, a residual Eltwise, pooling,
    an inception-style Concat of 1x1 and 3x3 branches, LRN, InnerProduct, Softmax."""
    import caffe
    from caffe import layers as L, params as P

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 32, 32]))
    n.conv1 = L.Convolution(n.data, num_output=16, kernel_size=3, pad=1, bias_term=False)
    n.bn1 = L.BatchNorm(n.conv1, in_place=True)
    n.sc1 = L.Scale(n.conv1, bias_term=True, in_place=True)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.conv2 = L.Convolution(n.conv1, num_output=16, kernel_size=3, pad=1)
    n.sum = L.Eltwise(n.conv1, n.conv2)
    n.pool = L.Pooling(n.sum, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.b1 = L.Convolution(n.pool, num_output=8, kernel_size=1)
    n.b3 = L.Convolution(n.pool, num_output=8, kernel_size=3, pad=1)
    n.cat = L.Concat(n.b1, n.b3)
    n.lrn = L.LRN(n.cat, local_size=5, alpha=1e-4, beta=0.75)
    n.gpool = L.Pooling(n.lrn, pool=P.Pooling.AVE, global_pooling=True)
    n.fc = L.InnerProduct(n.gpool, num_output=10)
    n.prob = L.Softmax(n.fc)
    return save_net(n, directory, "zoo", seed=3)


RUN_IN_CUDA_BUILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import caffe
    from inference_server.backends.pycaffe import _cuda_build, gpu_problem
    caffe.set_mode_cpu()
    out = {"file": caffe.__file__, "cuda_build": _cuda_build(caffe._caffe.__file__), "gpu_problem": gpu_problem(0)}
    for name, proto, weights, npy in json.loads(sys.argv[1]):
        net = caffe.Net(proto, caffe.TEST, weights=weights)
        x = np.load(npy)
        net.blobs["data"].reshape(*x.shape); net.reshape(); net.blobs["data"].data[...] = x; net.forward()
        np.savez(npy + ".out.npz", **{b: net.blobs[b].data for b in net.blobs})
    print(json.dumps(out))
""")


def cpu_forward(proto, weights, x) -> dict:
    import caffe

    caffe.set_mode_cpu()
    net = caffe.Net(str(proto), caffe.TEST, weights=str(weights))
    net.blobs["data"].reshape(*x.shape)
    net.reshape()
    net.blobs["data"].data[...] = x
    net.forward()
    return {b: net.blobs[b].data.copy() for b in net.blobs}


@needs_build
def test_cuda_build_in_cpu_mode_gives_the_cpu_builds_answers(tmp_path):
    digits = REPO / "examples" / "digits"
    zoo_proto, zoo_weights = zoo_like(tmp_path)
    rng = np.random.default_rng(0)
    cases = {"digits": (digits / "deploy.prototxt", digits / "digits.caffemodel",
                        (rng.random((4, 1, 8, 8)) * 16).astype(np.float32)),
             "zoo": (zoo_proto, zoo_weights, rng.standard_normal((2, 3, 32, 32)).astype(np.float32))}
    jobs = []
    for name, (proto, weights, x) in cases.items():
        np.save(tmp_path / f"{name}.npy", x)
        jobs.append([name, str(proto), str(weights), str(tmp_path / f"{name}.npy")])
    run = subprocess.run([sys.executable, "-c", RUN_IN_CUDA_BUILD, json.dumps(jobs)], env=cuda_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info["file"].startswith(str(CUDA_PACKAGE)), info  # the CUDA build, not the venv's CPU one
    assert info["cuda_build"] is True
    assert "no CUDA GPU is visible" in info["gpu_problem"]
    for name, (proto, weights, x) in cases.items():
        ours = cpu_forward(proto, weights, x)
        theirs = np.load(tmp_path / f"{name}.npy.out.npz")
        logits = list(ours)[-2]  # the blob before the Softmax
        scale = np.abs(ours[logits]).max()
        for blob in (logits, list(ours)[-1]):
            assert theirs[blob].shape == ours[blob].shape
            assert np.abs(theirs[blob] - ours[blob]).max() <= 1e-5 * scale, (name, blob)


@needs_build
def test_device_gpu_without_a_gpu_fails_at_startup_with_the_clear_message(tmp_path):
    digits = REPO / "examples" / "digits"
    env = {k: v for k, v in cuda_env().items() if k in ("PYTHONPATH", "LD_LIBRARY_PATH")}
    env["CAFFESERVE__DEVICE__KIND"] = "gpu"
    with ServerProcess(digits / "server.yaml", tmp_path, env=env, wait_ready=False) as server:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, body = http_json("GET", server.url + "/v2/health/ready")
            assert status == 503
            if "failed" in body["error"]:
                break
            time.sleep(0.1)
        assert "no CUDA GPU is visible" in body["error"], body
        assert "CPU-only" not in body["error"]  # this is the CUDA build
        assert http_json("GET", server.url + "/v2/health/live") == (200, {"live": True})
        status, _, err = http("POST", server.url + "/v2/models/digits/infer", b"{}")
        assert status == 503 and "gpu" in json.loads(err)["error"]
        time.sleep(0.5)
        assert server.proc.poll() is None, "the server process ended"


# ---------------------------------------------------------------------------------- no build needed
def load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "caffe" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layers_without_cuda_code_get_gpu_methods_that_run_the_cpu_code(tmp_path):
    patch = load_script("patch_caffe_cuda")
    (tmp_path / "include/caffe/layers").mkdir(parents=True)
    (tmp_path / "src/caffe/layers").mkdir(parents=True)
    (tmp_path / "include/caffe/layers/up_layer.hpp").write_text(
        "template <typename Dtype>\nclass UpLayer : public Layer<Dtype> {\n public:\n"
        "  virtual void Forward_gpu(const vector<Blob<Dtype>*>& bottom,\n      const vector<Blob<Dtype>*>& top);\n"
        "  virtual void Backward_gpu(const vector<Blob<Dtype>*>& top, const vector<bool>& p,\n"
        "      const vector<Blob<Dtype>*>& bottom) { NOT_IMPLEMENTED; }\n};\n")
    (tmp_path / "include/caffe/layers/ok_layer.hpp").write_text(
        "template <typename Dtype>\nclass OkLayer : public Layer<Dtype> {\n"
        "  virtual void Forward_gpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);\n};\n")
    (tmp_path / "include/caffe/layers/bi_layer.hpp").write_text(
        "template <typename Dtype>\nclass BiLayer : public Layer<Dtype>{\n"
        "  //virtual void Forward_gpu(const vector<Blob<Dtype>*>& bottom,\n"
        "  //    const vector<Blob<Dtype>*>& top);\n};\n")
    (tmp_path / "src/caffe/layers/bi_layer.cpp").write_text("INSTANTIATE_CLASS(BiLayer);\n")
    up = tmp_path / "src/caffe/layers/up_layer.cpp"
    up.write_text("#ifdef CPU_ONLY\nSTUB_GPU(UpLayer);\n#endif\n\nINSTANTIATE_CLASS(UpLayer);\n")
    (tmp_path / "src/caffe/layers/ok_layer.cpp").write_text("INSTANTIATE_CLASS(OkLayer);\n")
    (tmp_path / "src/caffe/layers/ok_layer.cu").write_text("void OkLayer<Dtype>::Forward_gpu(...) {}\n")
    assert patch.add_gpu_fallbacks(str(tmp_path)) == ["Up"]  # not Bi: its declaration is commented out
    text = up.read_text()
    assert "void UpLayer<Dtype>::Forward_gpu(" in text and "Forward_cpu(bottom, top);" in text
    assert "Backward_gpu" not in text  # defined inline in the header: left alone
    assert text.index("#ifndef CPU_ONLY") < text.index("INSTANTIATE_CLASS(UpLayer);")
    assert patch.add_gpu_fallbacks(str(tmp_path)) == []  # idempotent
    assert up.read_text() == text


def test_gpu_memory_guard_refuses_a_batch_that_does_not_fit_before_caffe_allocates(monkeypatch):
    from inference_server.backends import pycaffe
    from inference_server.errors import GpuOutOfMemory

    backend = pycaffe.PycaffeBackend.__new__(pycaffe.PycaffeBackend)
    backend._gpu, backend._bytes_per_item, backend._allocated_batch = True, 2**30, 1  # 1 GiB of blobs per item
    monkeypatch.setattr(pycaffe, "gpu_free_bytes", lambda: 20 * 2**30)
    backend._check_gpu_memory(8)  # 7 more items x 1 GiB x 2 fits in 20 GiB
    assert backend._allocated_batch == 8
    backend._check_gpu_memory(4)  # smaller: Caffe reuses its blobs, nothing to ask
    with pytest.raises(GpuOutOfMemory) as e:
        backend._check_gpu_memory(64)
    assert e.value.status_code == 507
    assert "out of GPU memory" in e.value.message and "batch 64" in e.value.message
    assert backend._allocated_batch == 8  # unchanged: nothing was allocated

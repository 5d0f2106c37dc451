"""The pycaffe backend: one `caffe.Net` owned by the thread that created it."""

from __future__ import annotations

import numpy as np

from ..errors import ModelLoadError
from .base import BlobInfo, NetDescription


def _set_device(device_kind: str, device_id: int) -> None:
    """Caffe's mode and device are per thread: call this in the thread that will run the Net."""
    import caffe

    if device_kind == "gpu":
        problem = gpu_problem(device_id)
        if problem:
            raise ModelLoadError(problem)
        caffe.set_device(device_id)
        caffe.set_mode_gpu()
    else:
        caffe.set_mode_cpu()


def gpu_problem(device_id: int) -> str | None:
    """Why GPU mode cannot work here, or None.

    Asked before touching Caffe's GPU calls, because in a CPU-only build (and in a CUDA build
    without a visible GPU) they end the process with a glog FATAL instead of raising.
    """
    import ctypes

    import caffe._caffe as native

    with open(native.__file__, "rb") as f:
        if b"libcudart" not in f.read():
            return ("device kind 'gpu' was requested but this pycaffe is a CPU-only build; "
                    "use device.kind: cpu, or the caffe-gpu image on a GPU node")
    try:
        cudart = ctypes.CDLL("libcudart.so")
    except OSError:
        try:
            import glob

            cudart = ctypes.CDLL(sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so*"))[-1])
        except (OSError, IndexError):
            return "device kind 'gpu' was requested but the CUDA runtime (libcudart) cannot be loaded"
    count = ctypes.c_int(0)
    rc = cudart.cudaGetDeviceCount(ctypes.byref(count))
    if rc != 0 or count.value == 0:
        return f"device kind 'gpu' was requested but no CUDA GPU is visible (cudaGetDeviceCount rc={rc})"
    if device_id >= count.value:
        return f"GPU {device_id} was requested but only {count.value} GPU(s) are visible"
    return None


class PycaffeBackend:
    name = "pycaffe"

    def __init__(self, prototxt: str, weights: str, device_kind: str = "cpu", device_id: int = 0, cfg=None):
        """Load the net; with `cfg`, reshaped to the served input shapes and serving the config's outputs."""
        _set_device(device_kind, device_id)
        import caffe

        from .. import served

        try:
            self.net = caffe.Net(prototxt, 1, weights=weights)  # 1 == caffe.TEST
        except Exception as e:
            raise ModelLoadError(f"pycaffe could not load {prototxt} with weights {weights}: {e}") from None
        if cfg is not None:
            served.reshape(self.net, served.input_shapes(cfg, self.net))
        self.outputs = served.output_blobs(cfg, self.net) if cfg is not None else list(self.net.outputs)

    def describe(self) -> NetDescription:
        net = self.net
        return NetDescription(
            inputs=[BlobInfo(n, tuple(net.blobs[n].data.shape)) for n in net.inputs],
            outputs=[BlobInfo(n, tuple(net.blobs[n].data.shape)) for n in self.outputs],
            layer_types=[layer.type for layer in net.layers],
            parameters={"backend": self.name},
        )

    def blob_names(self) -> list[str]:
        return list(self.net.blobs.keys())

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        net = self.net
        reshape = False
        for name, arr in inputs.items():
            blob = net.blobs[name]
            if blob.data.shape != arr.shape:
                blob.reshape(*arr.shape)
                reshape = True
        if reshape:
            net.reshape()
        for name, arr in inputs.items():
            net.blobs[name].data[...] = arr
        net.forward()
        return {name: net.blobs[name].data.copy() for name in outputs}

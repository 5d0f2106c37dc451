"""The pycaffe backend: one `caffe.Net` owned by the thread that created it."""

from __future__ import annotations

import numpy as np

from ..errors import BadRequest, GpuOutOfMemory, ModelLoadError
from .base import BlobInfo, NetDescription


def set_device(device_kind: str, device_id: int, caffe=None) -> None:
    """Caffe's mode and device are per thread: call this in the thread that will run the Net.

    `caffe` is the module whose set_mode_* to call: pycaffe itself, or its native `caffe._caffe`
    (the load probe imports only that).
    """
    if caffe is None:
        import caffe as pycaffe

        caffe = pycaffe

    if device_kind == "gpu":
        problem = gpu_problem(device_id)
        if problem:
            raise ModelLoadError(problem)
        caffe.set_device(device_id)
        caffe.set_mode_gpu()
    else:
        caffe.set_mode_cpu()


def _cuda_build(native_path: str) -> bool:
    """Whether pycaffe at `native_path` (its _caffe.so) was built with CUDA: it, or the libcaffe
    beside it (our CUDA build keeps Caffe in a library of its own), links the CUDA runtime."""
    import glob
    import os

    for path in [native_path, *glob.glob(os.path.join(os.path.dirname(native_path), "libcaffe*.so*"))]:
        with open(path, "rb") as f:
            if b"libcudart" in f.read():
                return True
    return False


def _cudart():
    """The CUDA runtime library this process uses (the one pycaffe loaded), as a ctypes CDLL, or None."""
    import ctypes
    import glob

    try:
        with open("/proc/self/maps") as f:
            loaded = sorted({line.split()[-1] for line in f if "/libcudart.so" in line})
    except OSError:
        loaded = []
    candidates = loaded + ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]
    candidates += sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so*"))
    for name in candidates:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def gpu_problem(device_id: int) -> str | None:
    """Why GPU mode cannot work here, or None.

    Asked before touching Caffe's GPU calls, because in a CPU-only build (and in a CUDA build
    without a visible GPU) they end the process with a glog FATAL instead of raising.
    """
    import ctypes

    import caffe._caffe as native

    if not _cuda_build(native.__file__):
        return ("device kind 'gpu' was requested but this pycaffe is a CPU-only build; "
                "use device.kind: cpu, or the caffe-gpu image on a GPU node")
    cudart = _cudart()
    if cudart is None:
        return "device kind 'gpu' was requested but the CUDA runtime (libcudart) cannot be loaded"
    count = ctypes.c_int(0)
    rc = cudart.cudaGetDeviceCount(ctypes.byref(count))
    if rc != 0 or count.value == 0:
        return f"device kind 'gpu' was requested but no CUDA GPU is visible (cudaGetDeviceCount rc={rc})"
    if device_id >= count.value:
        return f"GPU {device_id} was requested but only {count.value} GPU(s) are visible"
    return None


def gpu_free_bytes() -> int | None:
    """Free memory of this thread's current GPU (cudaMemGetInfo), or None if it cannot be read."""
    import ctypes

    cudart = _cudart()
    if cudart is None:
        return None
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    if cudart.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
        return None
    return free.value


# Caffe ends the process when cudaMalloc fails, so the backend asks before its blobs grow.
# Layers keep buffers of their own beside the Net's blobs (pooling masks, softmax/LRN/BatchNorm
# scratch, ...), and cuBLAS a workspace: ask for this much more than the blobs themselves.
GPU_MEMORY_FACTOR = 2.0
GPU_MEMORY_RESERVE = 256 * 2**20


class PycaffeBackend:
    name = "pycaffe"

    def __init__(self, prototxt: str, weights: str, device_kind: str = "cpu", device_id: int = 0, cfg=None):
        """Load the net; with `cfg`, reshaped to the served input shapes and serving the config's outputs."""
        set_device(device_kind, device_id)
        import caffe

        from ..loading import served

        try:
            self.net = caffe.Net(prototxt, 1, weights=weights)  # 1 == caffe.TEST
        except Exception as e:
            raise ModelLoadError(f"pycaffe could not load {prototxt} with weights {weights}: {e}") from None
        if cfg is not None:
            served.reshape(self.net, served.input_shapes(cfg, self.net))
        self.outputs = served.output_blobs(cfg, self.net) if cfg is not None else list(self.net.outputs)
        self._batch = {name: self.net.blobs[name].data.shape[0] for name in self.net.inputs}
        # Caffe counts a blob's elements in an int and ends the process past 2^31 - 1.
        batch0 = max(1, min(self._batch.values(), default=1))
        self._largest_blob_per_item = max((b.count for b in self.net.blobs.values()), default=0) / batch0
        self._gpu = device_kind == "gpu"
        self._last_layer = len(self.net.layers) - 1
        self._blobs = self.net.blobs  # pycaffe's property looks its dict up on each access
        self._in_views: dict[str, np.ndarray] = {}  # CPU only: the input blobs' arrays (_infer_cpu)
        if self._gpu:
            # Blob memory grows with the batch and never shrinks (Caffe keeps a blob's capacity):
            # bytes per batch item, from the Net as loaded, and the largest batch allocated so far.
            total = sum(b.count for b in self.net.blobs.values()) * 4
            self._bytes_per_item = total / batch0
            self._allocated_batch = batch0

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
        if not self._gpu:
            return self._infer_cpu(inputs, outputs)
        net = self.net
        if any(net.blobs[name].data.shape != arr.shape for name, arr in inputs.items()):
            self._reshape(inputs)
        for name, arr in inputs.items():
            net.blobs[name].data[...] = arr
        net.forward()
        return {name: net.blobs[name].data.copy() for name in outputs}

    def _infer_cpu(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """The forward pass on the CPU, writing into the input blobs' arrays fetched once per shape.

        pycaffe's `Net.forward` builds a list of the layers, a set and a dict of every output's array per
        call, and `net.blobs[name].data` a numpy array per access. On the CPU an input blob's memory stays
        where it is while its shape does (only a reshape moves it; the Input layer never reshapes in a
        forward), so arrays taken after the last reshape stay valid. Outputs are read fresh: a layer may
        reshape its top in the forward (DetectionOutput's count is the data's). Not on the GPU: there
        `blob.data` is also what marks the host copy as the newest (mutable_cpu_data), so that the next
        forward uploads it; writing through an array taken earlier would not be uploaded.
        """
        views = self._in_views
        for name, arr in inputs.items():
            view = views.get(name)
            if view is None or view.shape != arr.shape:
                self._reshape(inputs)
                views = self._in_views
                break
        for name, arr in inputs.items():
            views[name][...] = arr
        self.net._forward(0, self._last_layer)
        blobs = self._blobs
        return {name: blobs[name].data.copy() for name in outputs}

    def _reshape(self, inputs: dict[str, np.ndarray]) -> None:
        """The Net reshaped to `inputs`' shapes (any blob may move: the arrays are fetched again)."""
        net = self.net
        if any(net.blobs[name].data.shape != arr.shape for name, arr in inputs.items()):
            batch = max(arr.shape[0] for arr in inputs.values())
            if batch * self._largest_blob_per_item > 2**31 - 1:
                raise BadRequest(f"batch {batch} is too large for this net: a blob would exceed Caffe's limit "
                                 f"of 2^31 - 1 elements ({int(self._largest_blob_per_item)} per item)")
            if self._gpu:
                self._check_gpu_memory(batch)
            for name, arr in inputs.items():
                net.blobs[name].reshape(*arr.shape)
            net.reshape()
        if not self._gpu:
            self._in_views = {name: net.blobs[name].data for name in inputs}

    def _check_gpu_memory(self, batch: int) -> None:
        """Raise GpuOutOfMemory (before any blob grows) if `batch` would not fit in the GPU's free memory."""
        if batch <= self._allocated_batch:
            return
        need = (batch - self._allocated_batch) * self._bytes_per_item * GPU_MEMORY_FACTOR + GPU_MEMORY_RESERVE
        free = gpu_free_bytes()
        if free is not None and need > free:
            fits = self._allocated_batch + int(max(0, free - GPU_MEMORY_RESERVE)
                                               / (self._bytes_per_item * GPU_MEMORY_FACTOR))
            raise GpuOutOfMemory(
                f"out of GPU memory: batch {batch} needs about {need / 2**30:.1f} GiB more GPU memory "
                f"({self._bytes_per_item / 2**20:.1f} MiB of blobs per item), the GPU has {free / 2**30:.1f} GiB free; "
                f"batches up to about {fits} fit")
        self._allocated_batch = batch

"""The ONNX Runtime backend: one InferenceSession per worker, on a graph converted from the Caffe net.

The graph comes from `choose_accelerated` (loading/selection.py), which converted it, cached it and
proved it equal to pycaffe; this module only runs it. Sessions are built here and nowhere else, so the
parity gate checks exactly the session options and execution providers that serve.
"""

from __future__ import annotations

import json

import numpy as np

from ..cpus import available_cpus
from ..errors import ModelLoadError
from .base import BlobInfo, NetDescription


def session_options(instances: int):
    """Split the CPUs between the `instances` sessions; no idle spinning (the HTTP loop needs the CPU)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, available_cpus() // max(1, instances))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: a served model's log is not the place for graph warnings
    return so


def tensorrt_available() -> bool:
    import onnxruntime as ort

    return "TensorrtExecutionProvider" in ort.get_available_providers()


def providers(device_kind: str, device_id: int = 0, tensorrt: bool = True) -> list:
    """Execution providers for the device (TensorRT first where installed and wanted);
    ModelLoadError when `gpu` cannot be honoured."""
    import onnxruntime as ort

    if device_kind != "gpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ModelLoadError(
            "device kind 'gpu' was requested but this onnxruntime has no CUDAExecutionProvider "
            f"(it has {', '.join(available)}); install onnxruntime-gpu, or use device.kind: cpu"
        )
    chosen: list = []
    if tensorrt and "TensorrtExecutionProvider" in available:
        chosen.append(("TensorrtExecutionProvider", {"device_id": device_id}))
    # TF32 convolutions would move results by ~1e-3: keep full float32, as pycaffe computes
    chosen.append(("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": 0}))
    return chosen + ["CPUExecutionProvider"]


def make_session(model: str | bytes, device_kind: str, device_id: int, instances: int, tensorrt: bool = False):
    """An InferenceSession for a model file or serialized model, on the configured device.

    TensorRT is used only when asked for: the parity gate tries it first and says whether it passed.
    """
    import onnxruntime as ort

    chosen = providers(device_kind, device_id, tensorrt)
    try:
        sess = ort.InferenceSession(model, sess_options=session_options(instances), providers=chosen)
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise ModelLoadError(f"onnxruntime could not load the converted graph: {e}") from None
    if device_kind == "gpu" and "CUDAExecutionProvider" not in sess.get_providers():
        raise ModelLoadError(
            f"device kind 'gpu' was requested but onnxruntime could not start CUDA on GPU {device_id} "
            "(is a GPU visible to this container?)"
        )
    return sess


def recorded_info(sess) -> dict:
    """What the converter recorded in the graph's metadata (Caffe I/O shapes, layer types)."""
    from ..loading.convert.net import METADATA_KEY

    raw = sess.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise ModelLoadError("the ONNX file was not written by the caffe-serving converter")
    return json.loads(raw)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, cfg, choice):
        if not choice.artifact:
            raise ModelLoadError("the onnxruntime backend needs a converted graph (BackendChoice.artifact)")
        self.session = make_session(choice.artifact, cfg.device.kind, cfg.device.id, cfg.instances,
                                    tensorrt=bool(choice.details.get("onnx_tensorrt")))
        self.info = recorded_info(self.session)

    def describe(self) -> NetDescription:
        return NetDescription(
            inputs=[BlobInfo(n, tuple(s)) for n, s in self.info["inputs"]],
            outputs=[BlobInfo(n, tuple(s)) for n, s in self.info["outputs"]],
            layer_types=list(self.info["layer_types"]),
            parameters={"backend": self.name},
        )

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        return dict(zip(outputs, self.session.run(outputs, feed), strict=True))

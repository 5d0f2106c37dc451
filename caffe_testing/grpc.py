"""A plain grpc client over our own OIP messages (inference_server.grpc.messages), for the gRPC tests.

The standard clients (tritonclient.grpc, kserve) run in their own processes (test_grpc_clients.py);
this one is for status codes, messages and trailers, which those clients reword.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from caffe_testing.servers import ServerProcess, free_port
from inference_server.grpc import messages as pb


def grpc_server(config, tmp_dir, **kw) -> ServerProcess:
    """A ServerProcess that also serves gRPC, on `.grpc_port`."""
    port = free_port()
    server = ServerProcess(config, tmp_dir, args=["--grpc-port", str(port), *kw.pop("args", [])], **kw)
    server.grpc_port = port
    return server


class OIPClient:
    def __init__(self, port: int, max_message_bytes: int = 256 * 1024 * 1024, host: str = "127.0.0.1",
                 root_certificates: bytes | None = None, target_name: str | None = None):
        """`root_certificates`: TLS, trusting those CAs (PEM); `target_name`: the name the server's
        certificate must carry, when it is not `host` (a pod called by its address)."""
        options: list[tuple[str, int | str]] = [("grpc.max_send_message_length", max_message_bytes),
                                                ("grpc.max_receive_message_length", max_message_bytes)]
        if target_name:
            options.append(("grpc.ssl_target_name_override", target_name))
        target = f"{host}:{port}"
        self.channel = (grpc.insecure_channel(target, options=options) if root_certificates is None else
                        grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options=options))
        self.stubs = {
            name: self.channel.unary_unary(f"/{pb.SERVICE}/{name}", request_serializer=req.SerializeToString,
                                           response_deserializer=resp.FromString)
            for name, (req, resp) in pb.METHODS.items()}

    def call(self, method: str, request, timeout: float = 30, **kw):
        return self.stubs[method](request, timeout=timeout, **kw)

    def call_raw(self, method: str, data: bytes, timeout: float = 30):
        """Send bytes as they are (a malformed message, an unknown method)."""
        stub: Any = self.channel.unary_unary(f"/{pb.SERVICE}/{method}", request_serializer=None,
                                        response_deserializer=None)
        return stub(data, timeout=timeout)

    def infer(self, request, timeout: float = 30, **kw):
        return self.call("ModelInfer", request, timeout, **kw)

    def error(self, method: str, request, **kw) -> grpc.RpcError:
        """The RpcError a call must end with."""
        try:
            self.call(method, request, **kw)
        except grpc.RpcError as e:
            return e
        raise AssertionError(f"{method} succeeded; an error was expected")

    def close(self):
        self.channel.close()


def infer_request(model: str, inputs: dict[str, np.ndarray], raw: bool = True, outputs=None, version: str = "",
                  request_id: str = ""):
    """A ModelInferRequest of float32 arrays: raw contents, or typed fp32_contents."""
    msg = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, arr in inputs.items():
        t = msg.inputs.add(name=name, datatype="FP32", shape=arr.shape)
        if raw:
            msg.raw_input_contents.append(np.ascontiguousarray(arr, np.float32).tobytes())
        else:
            t.contents.fp32_contents.extend(arr.ravel().tolist())
    for o in outputs or []:
        if isinstance(o, tuple):
            msg.outputs.add(name=o[0]).parameters["classification"].int64_param = o[1]
        else:
            msg.outputs.add(name=o)
    return msg


def output(resp, name: str) -> np.ndarray:
    """An output of a ModelInferResponse as numpy, raw or typed."""
    for i, o in enumerate(resp.outputs):
        if o.name != name:
            continue
        shape = list(o.shape)
        if resp.raw_output_contents:
            data = resp.raw_output_contents[i]
            if o.datatype == "BYTES":
                import struct

                items, pos = [], 0
                while pos < len(data):
                    (n,) = struct.unpack_from("<I", data, pos)
                    items.append(data[pos + 4 : pos + 4 + n])
                    pos += 4 + n
                return np.array(items, dtype=object).reshape(shape)
            return np.frombuffer(data, np.float32).reshape(shape)
        if o.datatype == "BYTES":
            return np.array(list(o.contents.bytes_contents), dtype=object).reshape(shape)
        return np.array(o.contents.fp32_contents, np.float32).reshape(shape)
    raise KeyError(name)


def assert_status(err: grpc.RpcError, code: grpc.StatusCode, *words: str) -> str:
    assert err.code() == code, (err.code(), err.details())
    details = err.details()
    assert isinstance(details, str) and details
    for w in words:
        assert w in details, f"{w!r} not in {details!r}"
    return details

"""An empty unary handler on grpc.aio or on our HTTP/2 transport: the floor of each, for bench/protocols.py.

    .venv/bin/python bench/empty_grpc.py grpcio|h2 PORT

Serves `/inference.GRPCInferenceService/ModelInfer` answering an empty message, on uvloop as the model
server runs, until killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from caffe_http.lifecycle import install_uvloop  # noqa: E402
from inference_server.grpc import messages as pb  # noqa: E402

PATH = f"/{pb.SERVICE}/ModelInfer"


async def empty(data: bytes, context) -> bytes:
    return b""


async def serve(kind: str, port: int) -> None:
    if kind == "grpcio":
        import grpc

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            pb.SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(empty)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
    else:
        from inference_server.grpc.transport import GRPCTransportServer

        await GRPCTransportServer({PATH.encode(): empty}, 1 << 26).start("127.0.0.1", port)
    print("serving", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    install_uvloop()
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))

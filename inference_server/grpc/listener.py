"""A grpc.aio server for one generic handler: the model server's service and the gateway's forwarder
listen the same way (the message limit, no shared ports, bind errors as OSError)."""

from __future__ import annotations

import grpc


class GRPCListener:
    """Binds `handler()` (a grpc.GenericRpcHandler factory); its largest request is `max_message_bytes`."""

    def __init__(self, handler, max_message_bytes: int, interceptors: tuple = ()):
        self.handler = handler
        self.interceptors = interceptors  # grpc.aio.ServerInterceptor: none unless a feature needs one
        self.max_message_bytes = max_message_bytes
        self.server: grpc.aio.Server | None = None

    async def start(self, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
        """Bind and start (TLS with `credentials`); returns the bound port. OSError when it cannot be bound."""
        self.server = grpc.aio.server(interceptors=self.interceptors or None, options=[
            ("grpc.max_receive_message_length", self.max_message_bytes),  # beyond: RESOURCE_EXHAUSTED
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ])
        self.server.add_generic_rpc_handlers((self.handler(),))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = (self.server.add_insecure_port(address) if credentials is None
                     else self.server.add_secure_port(address, credentials))
        except RuntimeError as e:  # grpc raises this when it cannot bind
            raise OSError(f"cannot listen for gRPC on {address}: {e}") from None
        if not bound:
            raise OSError(f"cannot listen for gRPC on {address}")
        await self.server.start()
        return bound

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls at once, let those in flight finish within `grace_s`, then cancel them."""
        if self.server is not None:
            await self.server.stop(grace_s)

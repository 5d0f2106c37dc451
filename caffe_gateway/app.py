"""The running gateway: discovery feeding the balancer, the proxy served by our HTTP server and
(with a gRPC port) the gRPC proxy on our HTTP/2 transport (grpc.aio with CAFFESERVE_GRPC_TRANSPORT=grpcio),
both over the one balancer.

`caffeserve gateway` (main.py) and local mode (`caffeserve up`) both start one of these.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from caffe_http.access_log import AccessLog, log_refusal, with_access_log
from caffe_http.encoding import with_content_coding
from caffe_http.server import HTTPServer, Request, ServerLimits

from .auth import Guard, with_guard
from .balancer import Balancer, BalancerSettings
from .proxy import MODELS_PREFIX, Gateway, ProxySettings
from .stats import ALL_STATS_PATH, stats_target
from .tracing import GatewayTracing

if TYPE_CHECKING:
    from caffe_http.tls import ReloadingTLS

    from .grpc_proxy import GRPCGatewayServer

log = logging.getLogger(__name__)


def forwarded_unread(req: Request) -> bool:
    """Model requests go upstream with their body still compressed: the server decompresses it and
    applies its own limit to the decompressed size (the gateway never holds the inflated body)."""
    path = req.path
    return (path.startswith(MODELS_PREFIX) and path.rstrip("/") != ALL_STATS_PATH
            and stats_target(path) is None)


class GatewayApp:
    def __init__(self, discovery, balancer_settings: BalancerSettings | None = None,
                 proxy_settings: ProxySettings | None = None, limits: ServerLimits | None = None,
                 access_log: AccessLog | None = None, tracing: GatewayTracing | None = None,
                 guard: Guard | None = None, tls: ReloadingTLS | None = None):
        self.discovery = discovery
        self.balancer = Balancer(balancer_settings)
        self.gateway = Gateway(self.balancer, proxy_settings, ready=self.ready, tracing=tracing)
        limits = limits or ServerLimits()
        access = access_log or AccessLog("gateway")
        # who may call (auth.py): by default nobody is authenticated and the admin calls are off
        self.guard = guard or Guard()
        self.gateway.metrics.registry.register(self.guard)
        self.tls = tls  # None: plain REST and gRPC
        handler = with_access_log(with_guard(
            with_content_coding(self.gateway.handle, limits.max_body_bytes, passthrough=forwarded_unread),
            self.guard), access)
        # A client that went away cancels its request: it leaves the queue, or its upstream
        # connection is closed (never reused half-read) and the server drops the work too.
        # Eager: a request is sent upstream from the parser's callback, a loop turn sooner (nothing on the
        # forwarding path needs a current task before its first wait: balancer.py, caffe_http/upstream.py).
        self.server = HTTPServer(handler, limits, cancel_on_disconnect=True, eager=True)
        self.server.on_refuse = log_refusal(access)
        self.limits = limits
        self.grpc_server: GRPCGatewayServer | None = None  # once started with a gRPC port
        self._discovery_task: asyncio.Task | None = None
        self._tls_task: asyncio.Task | None = None
        self.port: int | None = None
        self.grpc_port: int | None = None

    def ready(self) -> bool:
        return self.discovery.synced.is_set() and not self.server.stopping

    async def start(self, host: str, port: int, sock=None, grpc_port: int | None = None) -> int:
        """Start discovery and listen (REST on `port`, gRPC on `grpc_port` unless None); returns
        the bound REST port (`self.grpc_port` is the bound gRPC port). OSError when a port is taken."""
        if grpc_port is not None:
            from .grpc_proxy import GRPCGateway, GRPCGatewayServer  # grpcio only when gRPC is on

            grpc_gateway = GRPCGateway(self.gateway.forwarder, self.ready, self.gateway.version, self.gateway.tracing,
                                       index=self.gateway.index_entries)
            self.grpc_server = GRPCGatewayServer(grpc_gateway, self.guard, self.limits.max_body_bytes, self.tls)
            self.grpc_port = await self.grpc_server.start(host, grpc_port)
        self._discovery_task = asyncio.create_task(self.discovery.run(self.balancer), name="gateway-discovery")
        self._discovery_task.add_done_callback(_log_crash)
        if self.tls is not None:
            self._tls_task = asyncio.create_task(self.tls.watch(), name="gateway-tls-reload")
        try:
            self.port = await self.server.start(host, port, sock=sock,
                                                ssl=self.tls.context if self.tls is not None else None)
        except BaseException:
            await self.stop(0)
            raise
        return self.port

    async def stop(self, grace_s: float = 30.0) -> None:
        """Refuse new requests, let those in flight finish (up to `grace_s`), then close upstreams."""
        stopping = [self.server.stop(grace_s)]
        if self.grpc_server is not None:  # REST and gRPC drain together, within the same grace period
            stopping.append(self.grpc_server.stop(grace_s))
        await asyncio.gather(*stopping)
        if self._tls_task is not None:
            self._tls_task.cancel()
        await self.guard.close()
        if self._discovery_task is not None:
            self._discovery_task.cancel()
            try:
                await self._discovery_task
            except (asyncio.CancelledError, Exception):
                pass
        await self.discovery.stop()
        self.balancer.close()


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("discovery stopped: %r", task.exception())

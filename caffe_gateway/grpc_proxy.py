"""The gateway's gRPC side: `inference.GRPCInferenceService` forwarded to each model's servers.

What a client sees (tritonclient.grpc, KServe's InferenceGRPCClient, any OIP gRPC client):
- ServerLive, ServerReady and ServerMetadata are the gateway's own answers, as REST's
  `/v2/health/*` and `GET /v2` are. ModelInfer, ModelReady and ModelMetadata go to a ready server
  of the model their request names (field 1, `model_name` or `name`), and so does ModelConfig;
  ModelStatistics is summed over the model's replicas (grpc_stats.py); other methods are UNIMPLEMENTED.
- Bytes in, bytes out: one generic handler per method takes the request as bytes, reads only the
  model name (a scan of the message's top-level fields that skips the others by their length:
  tensors are never decoded) and forwards the same bytes; the server's answer comes back as it
  was sent. Request metadata is passed on (not gRPC's own `grpc-*` and transport headers), with
  `x-forwarded-for`; the server's initial and trailing metadata come back, and so do its status
  code and message (retry information included).
- The balancer is REST's: least request, the per-model queue and its limits, ejection; a server's
  REST and gRPC requests share its slots. A server counts as failing on INTERNAL, UNKNOWN,
  DATA_LOSS and DEADLINE_EXCEEDED (REST's 5xx other than 503); UNAVAILABLE from the server says
  "busy" or "loading" and does not count.
- Deadline: the client's gRPC deadline or `--request-timeout`, whichever is sooner, passed on to
  the server (grpc-timeout). A call whose deadline passes while it waits in the gateway is
  DEADLINE_EXCEEDED and never forwarded.
- A connection failure (the server cannot be reached, or its connection closed before any answer)
  is retried on another server, within the retry budget and the deadline, as REST's is.
- The gateway's own errors: NOT_FOUND for an unknown model (ModelReady answers ready: false, as a
  server does); UNAVAILABLE with retry information (RetryInfo, grpc-retry-pushback-ms, retry-after)
  when the model has no ready server or is overloaded, REST's 503; UNIMPLEMENTED for a model
  whose servers serve no gRPC; INVALID_ARGUMENT for a request that does not parse.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import grpc

from inference_server.grpc import messages as pb
from inference_server.grpc.listener import GRPCListener
from inference_server.grpc.status import retry_trailers

from .balancer import Balancer, DeadlinePassed, Endpoint, ModelRoute, NoEndpoints, Overloaded
from .grpc_stats import model_statistics
from .metrics import GatewayMetrics
from .proxy import FORWARDED_EXTENSIONS, GATEWAY_NAME, ProxySettings

SERVICE = pb.SERVICE
OWN_METHODS = ("ServerLive", "ServerReady", "ServerMetadata")
# field 1 of each request names the model; every replica of a model serves the same config
MODEL_METHODS = ("ModelInfer", "ModelReady", "ModelMetadata", "ModelConfig")

Code = grpc.StatusCode
# The status codes that count as a server failing (outlier detection).
FAILURE_CODES = frozenset({Code.INTERNAL, Code.UNKNOWN, Code.DATA_LOSS, Code.DEADLINE_EXCEEDED})
# gRPC's own words when a call ended with no answer from the server: it could not be reached, or the
# connection closed before it answered (the process died, or its shutdown cancelled the call).
TRANSPORT_FAILURES = ("failed to connect to all addresses", "Socket closed", "Connection reset", "Broken pipe",
                      "Connection refused", "GOAWAY", "Cancelling all calls")
# Request metadata gRPC sets itself on the upstream call, and reply metadata it sets on ours.
_REQUEST_OWN = frozenset({"user-agent", "te", "content-type", "host", "x-forwarded-for"})
_REPLY_OWN = frozenset({"content-type", "grpc-status", "grpc-message", "grpc-encoding", "grpc-accept-encoding",
                        "date", "server"})

CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", -1),  # the gateway's own server caps what comes in
    ("grpc.max_receive_message_length", -1),
    # a server that restarts is found again within a second (gRPC's default backoff grows to 120 s)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class Malformed(ValueError):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise Malformed("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise Malformed("varint longer than 10 bytes")


def model_name(data: bytes) -> str:
    """Field 1 (a string) of a protobuf message: ModelInferRequest.model_name, ModelReadyRequest.name,
    ModelMetadataRequest.name. The top-level fields are skipped by their length, never decoded; the
    last occurrence wins (protobuf's rule); absent is "". Malformed when the message does not parse."""
    name = b""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise Malformed("field number 0")
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _varint(data, pos)
            if field == 1:
                name = data[pos:pos + n]
            pos += n
        else:
            raise Malformed(f"unsupported wire type {wire}")
    if pos > end:
        raise Malformed("truncated message")
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("the model name is not UTF-8") from None


class _Abort(Exception):
    """End the call with this status (the gateway's own, or the server's passed through)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()):
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, trailing


class _ConnectFailed(Exception):
    """No answer from the server at all: safe to retry on another."""


class Upstream:
    """A channel to one server's gRPC port, with a callable per method."""

    def __init__(self, host: str, port: int):
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.channel = grpc.aio.insecure_channel(self.target, options=list(CHANNEL_OPTIONS))
        self._methods: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}

    def method(self, name: str) -> grpc.aio.UnaryUnaryMultiCallable:
        call = self._methods.get(name)
        if call is None:  # no (de)serializers: bytes in, bytes out
            call = self._methods[name] = self.channel.unary_unary(f"/{SERVICE}/{name}")
        return call

    async def connected(self, timeout_s: float) -> bool:
        """Whether the channel is (or gets) connected within `timeout_s`; False once an attempt fails."""
        ch = self.channel
        state = ch.get_state(try_to_connect=True)
        if state == grpc.ChannelConnectivity.READY:
            return True
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                while state != grpc.ChannelConnectivity.READY:
                    if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
                        return False
                    await ch.wait_for_state_change(state)
                    state = ch.get_state(try_to_connect=True)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        try:
            asyncio.get_running_loop().create_task(self.channel.close())
        except RuntimeError:  # no loop any more: the process is ending
            pass


def _peer_ip(peer: str) -> str | None:
    """`ipv4:10.0.0.1:5555` → 10.0.0.1; `ipv6:[::1]:5555` → ::1; None for other transports."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return None


def _reply_metadata(md) -> tuple:
    return tuple((k, v) for k, v in md or () if not k.startswith(":") and k not in _REPLY_OWN)


class GRPCGateway:
    """The RPC handlers; `handler()` is what the gateway's grpc server registers."""

    def __init__(self, balancer: Balancer, metrics: GatewayMetrics, settings: ProxySettings | None = None,
                 ready: Callable[[], bool] = lambda: True, version: str = "0.1.0"):
        self.balancer = balancer
        self.metrics = metrics
        self.settings = settings or ProxySettings()
        self.is_ready = ready
        self._live = pb.ServerLiveResponse(live=True).SerializeToString()
        self._server_metadata = pb.ServerMetadataResponse(
            name=GATEWAY_NAME, version=version, extensions=FORWARDED_EXTENSIONS).SerializeToString()

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {name: grpc.unary_unary_rpc_method_handler(getattr(self, name)) for name in OWN_METHODS}
        for name in MODEL_METHODS:
            methods[name] = grpc.unary_unary_rpc_method_handler(self._forwarder(name))
        methods["ModelStatistics"] = grpc.unary_unary_rpc_method_handler(self.ModelStatistics)
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    # --- the gateway's own
    async def ServerLive(self, data: bytes, context) -> bytes:
        return self._live

    async def ServerReady(self, data: bytes, context) -> bytes:
        return pb.ServerReadyResponse(ready=self.is_ready()).SerializeToString()

    async def ServerMetadata(self, data: bytes, context) -> bytes:
        return self._server_metadata

    async def ModelStatistics(self, data: bytes, context) -> bytes:
        """Summed over the model's replicas (grpc_stats.py), as REST's /stats is."""
        return await model_statistics(self.balancer, data, context)

    # --- forwarded
    def _forwarder(self, method: str):
        async def forward(data: bytes, context) -> bytes:
            return await self._forward(method, data, context)

        forward.__name__ = method
        return forward

    async def _forward(self, method: str, data: bytes, context) -> bytes:
        model, code = "", "OK"
        try:
            try:
                model = model_name(data)
            except Malformed as e:
                raise _Abort(Code.INVALID_ARGUMENT, f"malformed {method}Request: {e}") from None
            route = self.balancer.models.get(model)
            if method == "ModelReady" and (route is None or not route.ready_count()):
                return pb.ModelReadyResponse(ready=False).SerializeToString()
            if route is None:
                raise _Abort(Code.NOT_FOUND, f"model '{model}' is not known to the gateway")
            return await self._forward_to(route, method, data, context)
        except _Abort as e:
            code = e.code.name
            await context.abort(e.code, e.details, trailing_metadata=e.trailing)
        except asyncio.CancelledError:
            code = "CANCELLED"  # the client went away or its deadline passed; the upstream call is cancelled
            raise
        finally:
            self.metrics.count_grpc(model if model in self.balancer.models else "", method, code)

    def _unavailable(self, message: str) -> _Abort:
        seconds = int(self.settings.retry_after_s)
        return _Abort(Code.UNAVAILABLE, message, retry_trailers(Code.UNAVAILABLE, message, seconds))

    def _request_metadata(self, context) -> tuple:
        md = [(k, v) for k, v in context.invocation_metadata() or ()
              if not k.startswith((":", "grpc-")) and k not in _REQUEST_OWN]
        ip = _peer_ip(context.peer() or "")
        if ip:
            prior = next((v for k, v in context.invocation_metadata() or () if k == "x-forwarded-for"), None)
            md.append(("x-forwarded-for", f"{prior}, {ip}" if prior else ip))
        return tuple(md)

    async def _forward_to(self, route: ModelRoute, method: str, data: bytes, context) -> bytes:
        loop = asyncio.get_running_loop()
        timeout = self.settings.request_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining)
        deadline = loop.time() + timeout
        metadata = self._request_metadata(context)
        exclude = frozenset(e.address for e in route.endpoints if e.grpc_port is None)
        if route.endpoints and len(exclude) == len(route.endpoints):
            raise _Abort(Code.UNIMPLEMENTED, f"model '{route.name}' is not served over gRPC: its servers expose "
                                             "no gRPC port (spec.runtime.grpc.enabled is false?)")
        retries = 0
        holds_retry = False
        last_failure = ""
        route.active += 1
        try:
            while True:
                try:
                    ep = await route.acquire(deadline, exclude)
                except (NoEndpoints, Overloaded) as e:
                    raise self._unavailable(f"cannot reach model '{route.name}': {last_failure}; {e}"
                                            if last_failure else str(e)) from None
                except DeadlinePassed as e:
                    raise _Abort(Code.DEADLINE_EXCEEDED, str(e)) from None
                if loop.time() >= deadline:
                    route.release(ep, None)
                    raise _Abort(Code.DEADLINE_EXCEEDED,
                                 f"request deadline passed before it could be forwarded to model '{route.name}'")
                if ep.grpc_port is None:  # discovery changed the endpoint while the call waited
                    route.release(ep, None)
                    exclude = exclude | {ep.address}
                    continue
                t0 = time.perf_counter()
                try:
                    resp, initial, trailing = await self._call(ep, method, data, metadata, deadline, loop)
                except _ConnectFailed as e:
                    route.unreachable(ep)
                    route.release(ep, True)
                    last_failure = str(e)
                    exclude = exclude | {ep.address}
                    if holds_retry:
                        route.end_retry()
                        holds_retry = False
                    if retries >= self.settings.max_retries or loop.time() >= deadline:
                        raise self._unavailable(f"cannot reach model '{route.name}': {e}") from None
                    if not route.try_start_retry():
                        raise self._unavailable(f"cannot reach model '{route.name}' (retry budget exhausted): {e}") from None
                    holds_retry = True
                    retries += 1
                    continue
                except grpc.aio.AioRpcError as e:  # the server's own status: passed through
                    route.release(ep, e.code() in FAILURE_CODES)
                    details = e.details() or ""
                    if e.code() == Code.DEADLINE_EXCEEDED and loop.time() >= deadline:
                        details = f"model '{route.name}' did not answer within {timeout:g} s"
                    raise _Abort(e.code(), details, _reply_metadata(e.trailing_metadata())) from None
                except BaseException:
                    route.release(ep, None)
                    raise
                self.metrics.observe_upstream(route.name, time.perf_counter() - t0)
                route.release(ep, False)
                if initial := _reply_metadata(initial):
                    await context.send_initial_metadata(initial)
                if trailing := _reply_metadata(trailing):
                    context.set_trailing_metadata(trailing)
                return resp
        finally:
            route.active -= 1
            if holds_retry:
                route.end_retry()

    async def _call(self, ep: Endpoint, method: str, data: bytes, metadata: tuple, deadline: float, loop):
        """One call on `ep`: (answer, initial metadata, trailing metadata); _ConnectFailed when the
        server gave no answer at all; grpc.aio.AioRpcError with the server's status otherwise."""
        upstream = ep.grpc
        if upstream is None:
            upstream = ep.grpc = Upstream(ep.pool.host, ep.grpc_port)
        connect_s = min(self.balancer.settings.connect_timeout_s, deadline - loop.time())
        if not await upstream.connected(connect_s):
            raise _ConnectFailed(f"cannot connect to {upstream.target}")
        call = upstream.method(method)(data, timeout=max(deadline - loop.time(), 0.001), metadata=metadata)
        try:
            resp = await call
        except grpc.aio.AioRpcError as e:
            details = e.details() or ""
            if e.code() == Code.UNAVAILABLE and any(w in details for w in TRANSPORT_FAILURES):
                raise _ConnectFailed(f"{upstream.target}: {details}") from None
            raise
        return resp, await call.initial_metadata(), await call.trailing_metadata()


class GRPCGatewayServer(GRPCListener):
    """The gateway's grpc.aio server; its largest request message is `max_message_bytes`."""

    def __init__(self, gateway: GRPCGateway, max_message_bytes: int):
        super().__init__(gateway.handler, max_message_bytes)
        self.gateway = gateway

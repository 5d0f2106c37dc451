"""The gateway's gRPC side: `inference.GRPCInferenceService` forwarded to each model's servers.

What a client sees (tritonclient.grpc, KServe's InferenceGRPCClient, any OIP gRPC client):
- ServerLive, ServerReady and ServerMetadata are the gateway's own answers, as REST's
  `/v2/health/*` and `GET /v2` are. ModelInfer, ModelReady and ModelMetadata go to a ready server
  of the model their request names (field 1, `model_name` or `name`), and so does ModelConfig;
  ModelStatistics is summed over the model's replicas (grpc_stats.py); Triton's RepositoryIndex is the
  gateway's own (REST's index), RepositoryModelLoad and RepositoryModelUnload go to every server of the
  model (repository.py); other methods are UNIMPLEMENTED.
- Bytes in, bytes out: one generic handler per method takes the request as bytes, reads only the
  model name (a scan of the message's top-level fields that skips the others by their length:
  tensors are never decoded) and forwards the same bytes; the server's answer comes back as it
  was sent. Request metadata is passed on (not gRPC's own `grpc-*` and transport headers), with
  `x-forwarded-for`; the server's initial and trailing metadata come back, and so do its status
  code and message (retry information included).
- The forwarding rules are REST's, from the one loop in forward.py: the canary split and a pinned
  version (`model_version`, or `version` of ModelReady/ModelMetadata), the hold while a model is
  scaled to zero, the fallback to the other variant, least request, the per-model queue and its
  limits, ejection, the retry budget; a server's REST and gRPC requests share its slots. This
  module sends one attempt and maps the outcome to a gRPC status (`REFUSALS`).
- A server counts as failing on INTERNAL, UNKNOWN, DATA_LOSS and DEADLINE_EXCEEDED (REST's 5xx
  other than 503); UNAVAILABLE from the server says "busy" or "loading" and does not count.
- Deadline: the client's gRPC deadline or `--request-timeout` (plus a cold start's hold), whichever
  is sooner, passed on to the server (grpc-timeout). A call whose deadline passes while it waits in
  the gateway is DEADLINE_EXCEEDED and never forwarded.
- Retried on another server, within the retry budget and the deadline: a connection failure (the
  server cannot be reached, or its connection closed before any answer), an UNAVAILABLE that says
  the server did not start the call (its `caffe-not-run` trailer, or "shutting down"), and a call
  waiting on a server whose readiness probe then failed (hung: the call is cancelled there).
- The gateway's own errors: NOT_FOUND for an unknown model (ModelReady answers ready: false, as a
  server does); UNAVAILABLE with retry information (RetryInfo, grpc-retry-pushback-ms, retry-after)
  when the model has no ready server or is overloaded, REST's 503; UNIMPLEMENTED for a model
  whose servers serve no gRPC; INVALID_ARGUMENT for a request that does not parse.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from inference_server.grpc import messages as pb
from inference_server.grpc.listener import GRPCListener
from inference_server.grpc.status import NOT_RUN_KEY, retry_trailers
from inference_server.grpc.transport import GRPCTransportServer

from .balancer import Endpoint, ModelRoute
from .forward import BROKEN, DEADLINE, NOT_SERVED, UNAVAILABLE, UNKNOWN, Forwarder, Lost, NotRun, Refused, Unreachable
from .grpc_auth import guarded, hooks
from .grpc_stats import model_statistics
from .grpc_upstream import H2Upstream, Taken
from .proxy import FORWARDED_EXTENSIONS, GATEWAY_NAME
from .repository import broadcast, endpoints_of, unknown_model
from .tracing import GatewayTracing, TracedTransport, with_trace_context

if TYPE_CHECKING:
    from caffe_http.tls import ClientTLS, ReloadingTLS

    from .auth import Guard

SERVICE = pb.SERVICE
OWN_METHODS = ("ServerLive", "ServerReady", "ServerMetadata")
# field 1 of each request names the model; every replica of a model serves the same config
MODEL_METHODS = ("ModelInfer", "ModelReady", "ModelMetadata", "ModelConfig")

Code = grpc.StatusCode
# The status codes that count as a server failing (outlier detection).
FAILURE_CODES = frozenset({Code.INTERNAL, Code.UNKNOWN, Code.DATA_LOSS, Code.DEADLINE_EXCEEDED})
_FAILURE_NAMES = frozenset(c.name for c in FAILURE_CODES)
# The gateway's own answers (forward.Refused kinds) as gRPC codes; UNAVAILABLE carries retry information.
REFUSALS = {UNKNOWN: Code.NOT_FOUND, UNAVAILABLE: Code.UNAVAILABLE, DEADLINE: Code.DEADLINE_EXCEEDED,
            BROKEN: Code.UNAVAILABLE, NOT_SERVED: Code.UNIMPLEMENTED}
# gRPC's own words when a call ended with no answer from the server: it could not be reached, or the
# connection closed before it answered (the process died, or its shutdown cancelled the call).
TRANSPORT_FAILURES = ("failed to connect to all addresses", "Socket closed", "Connection reset", "Broken pipe",
                      "Connection refused", "GOAWAY", "Cancelling all calls")
# Request metadata gRPC sets itself on the upstream call, and reply metadata it sets on ours; the
# client's credentials are the gateway's to check (auth.py), not passed on to the servers.
_REQUEST_OWN = frozenset({"user-agent", "te", "content-type", "host", "x-forwarded-for", "authorization"})
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


def model_and_version(data: bytes) -> tuple[str, str]:
    """Fields 1 and 2 (strings) of a protobuf message: the model's name and version in
    ModelInferRequest (`model_name`, `model_version`), ModelReadyRequest and ModelMetadataRequest
    (`name`, `version`). The top-level fields are skipped by their length, never decoded; the last
    occurrence wins (protobuf's rule); absent is "". Malformed when the message does not parse."""
    name = version = b""
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
            elif field == 2:
                version = data[pos:pos + n]
            pos += n
        else:
            raise Malformed(f"unsupported wire type {wire}")
    if pos > end:
        raise Malformed("truncated message")
    try:
        return str(name, "utf-8"), str(version, "utf-8")  # bytes or, from our HTTP/2 transport, a memoryview
    except UnicodeDecodeError:
        raise Malformed("the model name or version is not UTF-8") from None


def model_name(data: bytes) -> str:
    """Field 1 of a request: the model's name (see model_and_version)."""
    return model_and_version(data)[0]


class _Abort(Exception):
    """End the call with this status (the gateway's own, or the server's passed through)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()):
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, trailing


class Upstream:
    """A channel to one server's gRPC port, with a callable per method and the calls in flight on it."""

    def __init__(self, host: str, port: int, tls: ClientTLS | None = None):
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if tls is None:
            self.channel = grpc.aio.insecure_channel(self.target, options=list(CHANNEL_OPTIONS))
        else:  # the pod's certificate is checked against the CA and the name all pods' certificates carry
            self.channel = grpc.aio.secure_channel(
                self.target, grpc.ssl_channel_credentials(tls.ca_file.read_bytes()),
                options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", tls.server_name)])
        self._methods: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self.calls: set[grpc.aio.UnaryUnaryCall] = set()
        self.lost: dict[grpc.aio.UnaryUnaryCall, str] = {}  # calls aborted by `abort`, with the reason

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

    def abort(self, reason: str) -> int:
        """Cancel every call in flight here (the server stopped answering): each ends in forward.Lost
        and goes to another server. Returns how many there were."""
        calls = list(self.calls)
        for call in calls:
            self.lost[call] = reason
            call.cancel()
        return len(calls)

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


# A server's answer: (status code, the message (OK) or the status details, initial metadata,
# trailing metadata). A plain tuple: one is made per call on the hot path.
Answer = tuple[grpc.StatusCode, bytes | str, Any, Any]  # code, payload or details, initial and trailing metadata
_OK = Code.OK


class GRPCTransport:
    """forward.Transport over gRPC: one attempt is one call on the endpoint's channel; the request
    is (method, message bytes, metadata)."""

    needs_grpc = True
    cancelled_code = "CANCELLED"

    upstream_class: type = Upstream  # what _upstream makes for an endpoint

    def __init__(self, connect_timeout_s: float, request_timeout_s: float):
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s

    def _upstream(self, ep: Endpoint) -> Any:
        """The endpoint's connection for this transport's calls, made on its first call."""
        if ep.grpc is None:
            assert ep.grpc_port is not None  # the forwarder sends gRPC only to endpoints with a gRPC port
            ep.grpc = self.upstream_class(ep.pool.host, ep.grpc_port, ep.pool.tls)
        return ep.grpc

    async def send(self, route: ModelRoute, ep: Endpoint, request: tuple, deadline: float) -> Answer:
        method, data, metadata = request
        upstream = self._upstream(ep)
        assert isinstance(upstream, Upstream)
        loop = asyncio.get_running_loop()
        if not await upstream.connected(min(self.connect_timeout_s, deadline - loop.time())):
            raise Unreachable(f"cannot reach model '{route.name}': cannot connect to {upstream.target}")
        call = upstream.method(method)(data, timeout=max(deadline - loop.time(), 0.001), metadata=metadata)
        upstream.calls.add(call)
        try:
            resp = await call
            return _OK, resp, await call.initial_metadata(), await call.trailing_metadata()
        except asyncio.CancelledError:
            reason = upstream.lost.pop(call, None)
            if reason is None:
                raise  # the client went away or its deadline passed: the upstream call is cancelled
            raise Lost(f"model '{route.name}' at {reason}") from None
        except grpc.aio.AioRpcError as e:
            return self._status(route, ep, e, upstream.lost.pop(call, None), deadline, loop)
        finally:
            upstream.calls.discard(call)

    def _status(self, route: ModelRoute, ep: Endpoint, e: grpc.aio.AioRpcError, lost: str | None, deadline: float,
                loop) -> Answer:
        """The server's status as an answer to pass through, or the exception that says what it means."""
        code, details = e.code(), e.details() or ""
        if lost is not None:
            raise Lost(f"model '{route.name}' at {lost}")
        if code == Code.UNAVAILABLE and any(w in details for w in TRANSPORT_FAILURES):
            raise Unreachable(f"cannot reach model '{route.name}': {upstream_target(ep)}: {details}")
        return self._refused(route, ep, (code, details, (), e.trailing_metadata() or ()), deadline, loop)

    def _refused(self, route: ModelRoute, ep: Endpoint, answer: Answer, deadline: float, loop) -> Answer:
        """A server's non-OK status: passed through, or NotRun (it did not start the call), or the
        gateway's own DEADLINE_EXCEEDED."""
        code, details, _, trailing = answer
        details = str(details)
        if code == Code.UNAVAILABLE:
            if "shutting down" in details or any(k == NOT_RUN_KEY for k, _ in trailing):
                raise NotRun(f"model '{route.name}' at {ep.address} did not run the request: {details}")
        if code == Code.DEADLINE_EXCEEDED and loop.time() >= deadline:
            raise Refused(DEADLINE, f"model '{route.name}' did not answer within {self.request_timeout_s:g} s")
        return code, details, (), trailing

    @staticmethod
    def with_trace_context(request: tuple, context: dict[str, str]) -> tuple:
        """`request` carrying the trace context `context` (tracing.py) in its metadata, in place of the client's."""
        method, data, metadata = request
        return method, data, tuple(with_trace_context(metadata, context))

    @staticmethod
    def failed(answer: Answer) -> bool:
        code = answer[0]
        return code is not _OK and code in FAILURE_CODES

    @staticmethod
    def code(answer: Answer) -> str:
        code = answer[0]
        return "OK" if code is _OK else code.name

    @staticmethod
    def refused_code(kind: str) -> str:
        return REFUSALS[kind].name


class H2Transport(GRPCTransport):
    """GRPCTransport over HTTP/2 framing of our own (grpc_upstream.py) instead of a grpc.aio channel."""

    upstream_class = H2Upstream

    async def send(self, route: ModelRoute, ep: Endpoint, request: tuple, deadline: float) -> Answer:
        method, data, metadata = request
        upstream = self._upstream(ep)
        try:
            assert isinstance(upstream, H2Upstream)
            answer = await upstream.call(method, data, metadata, deadline, self.connect_timeout_s)
        except Taken as e:
            raise Lost(f"model '{route.name}' at {e}") from None
        except Unreachable as e:
            raise Unreachable(f"cannot reach model '{route.name}': {e}") from None
        if answer[0] is _OK:
            return answer
        return self._refused(route, ep, answer, deadline, asyncio.get_running_loop())


def upstream_target(ep: Endpoint) -> str:
    return ep.grpc.target if ep.grpc is not None else f"{ep.pool.host}:{ep.grpc_port}"


class GRPCGateway:
    """The RPC handlers; `handler()` is what the gateway's grpc server registers."""

    def __init__(self, forwarder: Forwarder, ready: Callable[[], bool] = lambda: True, version: str = "0.1.0",
                 tracing: GatewayTracing | None = None, index: Callable[[bool], Awaitable[list[dict]]] | None = None):
        self.forwarder = forwarder
        self.index = index  # the REST gateway's repository index (Gateway.index_entries)
        self.balancer = forwarder.balancer
        self.metrics = forwarder.metrics
        self.settings = forwarder.settings
        kind = H2Transport if transport_kind() == "h2" else GRPCTransport
        self.transport = kind(self.balancer.settings.connect_timeout_s, self.settings.request_timeout_s)
        self.is_ready = ready
        self.tracing = tracing  # None: tracing off (tracing.py)
        self._forwarded_md: dict[int, tuple[Any, str, tuple]] = {}  # see _request_metadata
        self._live = pb.ServerLiveResponse(live=True).SerializeToString()
        self._not_ready = pb.ModelReadyResponse(ready=False).SerializeToString()
        self._server_metadata = pb.ServerMetadataResponse(
            name=GATEWAY_NAME, version=version, extensions=FORWARDED_EXTENSIONS).SerializeToString()

    def methods(self) -> dict[str, Callable[[bytes, Any], Awaitable[bytes]]]:
        """Each RPC the gateway serves, by method name."""
        out: dict[str, Callable[[bytes, Any], Awaitable[bytes]]] = {name: getattr(self, name) for name in OWN_METHODS}
        for name in MODEL_METHODS:
            out[name] = self._forwarder(name)
        out["ModelStatistics"] = self.ModelStatistics
        for name in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"):
            out[name] = getattr(self, name)
        return out

    def handler(self) -> grpc.GenericRpcHandler:
        """The RPCs as grpc.aio's generic handler (CAFFESERVE_GRPC_TRANSPORT=grpcio)."""
        return grpc.method_handlers_generic_handler(
            SERVICE, {name: grpc.unary_unary_rpc_method_handler(f) for name, f in self.methods().items()})

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

    # --- Triton's model repository extension (repository.py)
    async def RepositoryIndex(self, data: bytes, context) -> bytes:
        try:
            req = pb.RepositoryIndexRequest.FromString(data)
        except Exception as e:  # noqa: BLE001 (protobuf's DecodeError and friends)
            await context.abort(Code.INVALID_ARGUMENT, f"malformed RepositoryIndexRequest: {e}")
        resp = pb.RepositoryIndexResponse()
        for entry in await self.index(req.ready) if self.index is not None else []:
            resp.models.add(**entry)
        return resp.SerializeToString()

    async def RepositoryModelLoad(self, data: bytes, context) -> bytes:
        return await self._repository_call("RepositoryModelLoad", data, context)

    async def RepositoryModelUnload(self, data: bytes, context) -> bytes:
        return await self._repository_call("RepositoryModelUnload", data, context)

    async def _repository_call(self, method: str, data: bytes, context) -> bytes:
        """Sent to every server of the model (field 2 names it); OK when every one answers OK."""
        model, code = "", "OK"
        try:
            try:
                model = model_and_version(data)[1]  # field 1 is repository_name, field 2 model_name
            except Malformed as e:
                raise _Abort(Code.INVALID_ARGUMENT, f"malformed {method}Request: {e}") from None
            targets = endpoints_of(self.balancer, model, grpc=True)
            if not targets:
                raise _Abort(Code.NOT_FOUND, unknown_model(model))
            payload: bytes | str = b""
            for address, answer in await broadcast(self.transport, targets,
                                                   (method, data, self._request_metadata(context))):
                if isinstance(answer, Refused):
                    raise _Abort(REFUSALS[answer.kind], f"{method} of model '{model}' at {address}: {answer.message}")
                if isinstance(answer, Exception):
                    raise self._unavailable(f"{method} of model '{model}' at {address}: {answer}")
                status, payload, _, trailing = answer
                if status is not _OK:  # the server's own status, passed through
                    raise _Abort(status, str(payload), _reply_metadata(trailing))
            return payload if isinstance(payload, bytes) else b""
        except _Abort as e:
            code = e.code.name
            await context.abort(e.code, e.details, trailing_metadata=e.trailing)
            raise AssertionError("unreachable: context.abort raises") from None
        finally:
            self.metrics.count_grpc(model if model in self.balancer.models else "", method, code)

    # --- forwarded
    def _forwarder(self, method: str):
        async def forward(data: bytes, context) -> bytes:
            return await self._forward(method, data, context)

        forward.__name__ = method
        return forward

    async def _forward(self, method: str, data: bytes, context) -> bytes:
        model, code = "", "OK"
        traced: TracedTransport | None = None
        try:
            try:
                model, version = model_and_version(data)
            except Malformed as e:
                raise _Abort(Code.INVALID_ARGUMENT, f"malformed {method}Request: {e}") from None
            if method == "ModelReady" and not self._any_ready(model):
                return self._not_ready
            now = asyncio.get_running_loop().time()
            remaining = context.time_remaining()
            transport: GRPCTransport | TracedTransport = self.transport
            if self.tracing is not None:
                traced = transport = self.tracing.grpc(self.transport, method, context.invocation_metadata(), model,
                                                       now)
            try:
                answer = await self.forwarder.forward(transport, (method, data, self._request_metadata(context)),
                                                      model, version or None, now,
                                                      None if remaining is None else now + remaining)
            except Refused as e:
                raise self._refusal(e) from None
            status, payload, initial, trailing = answer
            if status is not _OK:  # the server's own status, passed through
                raise _Abort(status, payload, _reply_metadata(trailing))
            if initial := _reply_metadata(initial):
                await context.send_initial_metadata(initial)
            if trailing := _reply_metadata(trailing):
                context.set_trailing_metadata(trailing)
            return payload
        except _Abort as e:
            code = e.code.name
            await context.abort(e.code, e.details, trailing_metadata=e.trailing)
            raise AssertionError("unreachable: context.abort raises") from None
        except asyncio.CancelledError:
            code = "CANCELLED"  # the client went away or its deadline passed; the upstream call is cancelled
            raise
        finally:
            self.metrics.count_grpc(model if model in self.balancer.models else "", method, code)
            if traced is not None:
                traced.end(code, code in _FAILURE_NAMES)

    def _any_ready(self, model: str) -> bool:
        route, canary = self.balancer.models.get(model), self.balancer.canaries.get(model)
        return bool((route is not None and route.endpoints) or (canary is not None and canary.endpoints))

    def _refusal(self, e: Refused) -> _Abort:
        code = REFUSALS[e.kind]
        return self._unavailable(e.message) if code is Code.UNAVAILABLE else _Abort(code, e.message)

    def _unavailable(self, message: str) -> _Abort:
        seconds = int(self.settings.retry_after_s)
        return _Abort(Code.UNAVAILABLE, message, retry_trailers(Code.UNAVAILABLE, message, seconds))

    def _request_metadata(self, context) -> tuple:
        """The metadata passed on to the server: the client's (not gRPC's own), and x-forwarded-for. Kept
        for the client's metadata object and peer of the last calls: our transport gives calls with the same
        header block the same tuple, so a client's repeated calls cost a dict lookup."""
        given = context.invocation_metadata() or ()
        peer = context.peer() or ""
        kept = self._forwarded_md.get(id(given))
        if kept is not None and kept[0] is given and kept[1] == peer:
            return kept[2]
        md = [(k, v) for k, v in given if not k.startswith((":", "grpc-")) and k not in _REQUEST_OWN]
        ip = _peer_ip(peer)
        if ip:
            prior = next((v for k, v in given if k == "x-forwarded-for"), None)
            md.append(("x-forwarded-for", f"{prior}, {ip}" if prior else ip))
        out = tuple(md)
        if len(self._forwarded_md) >= 256:
            self._forwarded_md.clear()
        self._forwarded_md[id(given)] = (given, peer, out)
        return out


def transport_kind() -> str:
    """h2 (our HTTP/2 framing, the default) or grpcio (grpc.aio): CAFFESERVE_GRPC_TRANSPORT, as the server reads it."""
    kind = os.environ.get("CAFFESERVE_GRPC_TRANSPORT") or "h2"
    if kind not in ("h2", "grpcio"):
        raise ValueError(f"CAFFESERVE_GRPC_TRANSPORT must be h2 or grpcio, not {kind!r}")
    return kind


class GRPCGatewayServer:
    """The gateway's gRPC listener: our HTTP/2 transport (the model server's), or grpc.aio with
    CAFFESERVE_GRPC_TRANSPORT=grpcio; the guard's rules on each call; its largest request is `max_message_bytes`."""

    def __init__(self, gateway: GRPCGateway, guard: Guard, max_message_bytes: int, tls: ReloadingTLS | None = None):
        self.gateway, self.tls = gateway, tls
        self.kind = transport_kind()
        self.server: GRPCListener | GRPCTransportServer
        if self.kind == "grpcio":
            handler, interceptors = hooks(guard, gateway.handler)
            self.server = GRPCListener(handler, max_message_bytes, interceptors)
        else:
            paths = {f"/{SERVICE}/{name}".encode(): f for name, f in guarded(gateway.methods(), guard).items()}
            # eager: a call goes upstream from the transport's read callback (nothing before its first wait needs
            # a current task: balancer.py, grpc_upstream.py), as the REST side's requests do
            self.server = GRPCTransportServer(paths, max_message_bytes, eager=True)

    async def start(self, host: str, port: int) -> int:
        """Bind and start (TLS when the gateway has it); returns the bound port. OSError when it cannot be bound."""
        if isinstance(self.server, GRPCListener):
            return await self.server.start(host, port, self.tls.grpc_credentials() if self.tls is not None else None)
        return await self.server.start(host, port, self.tls.h2_context if self.tls is not None else None)

    async def stop(self, grace_s: float) -> None:
        await self.server.stop(grace_s)

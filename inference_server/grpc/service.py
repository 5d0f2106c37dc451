"""`inference.GRPCInferenceService` on grpc.aio, in the REST server's event loop and process.

The handlers call the same DataPlane and Model as the REST routes (app.py), so readiness, the
executor's queue, deadlines, cancellation and metrics are one. Each InferenceError becomes a gRPC
status through the one table in errors.py, its message as the status details; a full queue also
says when to retry (status.py, which the gateway shares).

Messages travel as bytes through grpc (no (de)serializer registered): a request that does not parse
is an INVALID_ARGUMENT we word ourselves, and each response is serialized once, by us.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import orjson
from google.protobuf.message import DecodeError
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ..errors import BadRequest, InferenceError, NotFound, Unavailable, grpc_status_name
from ..serving.dataplane import DataPlane
from ..serving.metrics import ServerMetrics
from ..serving.repository import Repository, config_parameter
from . import messages as pb
from .codec import (
    decode_infer_request,
    decode_laid_out,
    decode_scanned,
    encode_infer_response,
    known_inputs,
    laid_out,
    learn_inputs,
    learn_layout,
    scan_infer_request,
)
from .inline_call import learn_call
from .listener import GRPCListener
from .status import RETRY_INFO_TYPE, error_status  # noqa: F401 (RETRY_INFO_TYPE: re-exported)
from .transport import GRPCTransportServer
from .triton import config_response, statistics_response

if TYPE_CHECKING:
    from caffe_http.tls import ReloadingTLS

log = logging.getLogger(__name__)


def _parse(cls, data: bytes):
    try:
        return cls.FromString(data)
    except DecodeError as e:
        raise BadRequest(f"malformed {cls.DESCRIPTOR.name}: {e}") from None


class GRPCService:
    """The OIP's six RPCs, Triton's ModelConfig and ModelStatistics, and Triton's repository RPCs over one
    DataPlane and its Repository; `handler()` is what a grpc server registers."""

    def __init__(self, plane: DataPlane, repository: Repository):
        self.plane, self.repository = plane, repository
        metrics = plane.fallback_metrics
        meta = orjson.loads(plane.server_metadata)
        self._server_metadata = pb.ServerMetadataResponse(
            name=meta["name"], version=meta["version"], extensions=meta["extensions"]).SerializeToString()
        self._live = pb.ServerLiveResponse(live=True).SerializeToString()
        self._model_metadata: dict[str, tuple[bytes, bytes]] = {}  # name -> (the JSON it came from, serialized)
        self._model_config: dict[str, tuple[bytes, bytes]] = {}  # the same, for ModelConfig
        self._rpc_codes = _CallCounts()
        metrics.registry.register(self._rpc_codes)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            pb.SERVICE, {name: grpc.unary_unary_rpc_method_handler(getattr(self, name)) for name in pb.METHODS})

    # --- health and metadata
    async def ServerLive(self, data: bytes, context) -> bytes:
        return self._live

    async def ServerReady(self, data: bytes, context) -> bytes:
        return pb.ServerReadyResponse(ready=self.plane.ready()).SerializeToString()

    async def ModelReady(self, data: bytes, context) -> bytes:
        """ready: false, not an error, for a model that is loading, failed or unknown (as Triton answers)."""
        try:
            req = _parse(pb.ModelReadyRequest, data)
            m = self.plane.get(req.name, req.version or None)
            ready = m.state == "ready" and not self.plane.draining
        except (NotFound, Unavailable):  # unknown, or known and not loaded here
            ready = False
        except InferenceError as e:
            return await self._abort(context, e)
        return pb.ModelReadyResponse(ready=ready).SerializeToString()

    async def ServerMetadata(self, data: bytes, context) -> bytes:
        return self._server_metadata

    async def ModelMetadata(self, data: bytes, context) -> bytes:
        try:
            req = _parse(pb.ModelMetadataRequest, data)
            m = self.plane.get(req.name, req.version or None)
            m.check_ready()  # UNAVAILABLE with the loader's message while loading or after a failed load
        except InferenceError as e:
            return await self._abort(context, e)
        cached = self._model_metadata.get(m.name)
        if cached is None or cached[0] is not m.metadata:
            meta = orjson.loads(m.metadata)
            resp = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
            for kind in ("inputs", "outputs"):
                for t in meta[kind]:
                    getattr(resp, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            cached = self._model_metadata[m.name] = (m.metadata, resp.SerializeToString())
        return cached[1]

    # --- Triton's extensions, as REST's /v2/models/{m}/config and /stats answer them (stats.py)
    async def ModelConfig(self, data: bytes, context) -> bytes:
        try:
            req = _parse(pb.ModelConfigRequest, data)
            m = self.plane.get(req.name, req.version or None)
            m.check_ready()  # the config describes a loaded model: UNAVAILABLE with the reason until then
        except InferenceError as e:
            return await self._abort(context, e)
        cached = self._model_config.get(m.name)
        if cached is None or cached[0] is not m.config_json:
            cached = self._model_config[m.name] = (m.config_json, config_response(orjson.loads(m.config_json)))
        return cached[1]

    async def ModelStatistics(self, data: bytes, context) -> bytes:
        """One model's counters, or every model's for an empty name; they exist loaded or not (as REST's)."""
        try:
            req = _parse(pb.ModelStatisticsRequest, data)
            if req.name:
                models = [self.plane.get(req.name, req.version or None)]
            else:
                models = list(self.plane.models.values())
        except InferenceError as e:
            return await self._abort(context, e)
        return statistics_response([m.stats_json() for m in models])

    # --- Triton's model repository extension (admin.py names these RPCs for whoever guards them)
    async def RepositoryIndex(self, data: bytes, context) -> bytes:
        try:
            req = _parse(pb.RepositoryIndexRequest, data)
            resp = pb.RepositoryIndexResponse()
            for entry in self.repository.index(ready_only=req.ready):
                resp.models.add(**entry)
        except InferenceError as e:
            return await self._abort(context, e)
        return resp.SerializeToString()

    async def RepositoryModelLoad(self, data: bytes, context) -> bytes:
        try:
            req = _parse(pb.RepositoryModelLoadRequest, data)
            params = {key: getattr(p, p.WhichOneof("parameter_choice") or "string_param")
                      for key, p in req.parameters.items()}
            await self.repository.load(req.model_name, config_parameter(params))
        except InferenceError as e:
            return await self._abort(context, e)
        return pb.RepositoryModelLoadResponse().SerializeToString()

    async def RepositoryModelUnload(self, data: bytes, context) -> bytes:
        try:
            req = _parse(pb.RepositoryModelUnloadRequest, data)
            await self.repository.unload(req.model_name)
        except InferenceError as e:
            return await self._abort(context, e)
        return pb.RepositoryModelUnloadResponse().SerializeToString()

    # --- inference
    async def ModelInfer(self, data: bytes, context) -> bytes:
        start = time.monotonic()
        # the usual request, with inputs seen before, is decoded without protobuf (codec.py's fast path), and one
        # laid out as a request seen before without even a scan of its fields (codec.laid_out)
        lay = laid_out(data)
        scanned = known = None
        if lay is None:
            scanned = scan_infer_request(data)
            known = None if scanned is None else known_inputs(scanned)
        msg = None
        if lay is not None:
            model_name, model_version = lay.model_name, lay.model_version
        elif known is None:
            try:
                msg = _parse(pb.ModelInferRequest, data)
            except InferenceError as e:
                self.plane.fallback_metrics.count(e.status_code)
                self._count(self.plane.fallback_metrics, grpc_status_name(e.status_code))
                return await self._abort(context, e)
            model_name, model_version = msg.model_name, msg.model_version
        else:
            assert scanned is not None
            model_name, model_version = scanned.model_name, scanned.model_version
        metrics = self.plane.metrics_of(model_name)
        metrics.in_flight.inc()
        code, error = 200, None
        trace = None
        try:
            plane = self.plane
            m = plane.get(model_name, model_version or None)
            if m.tracing is not None:
                trace = m.tracing.grpc(m, context.invocation_metadata(), start)
            if plane.draining:
                raise InferenceError("the server is shutting down", 503, {"Retry-After": "1"})
            m.check_ready()
            remaining = context.time_remaining()
            deadline = None if remaining is None else start + remaining
            req = None
            if lay is not None:
                call = lay.call
                if call is not None and call.model is m:  # the usual call, in one step (inline_call.py)
                    answer = call.answer(data, deadline)
                    if answer is not None:
                        return answer
                req = decode_laid_out(data, lay, m.max_elements)
            elif known is not None and scanned is not None:
                req = decode_scanned(scanned, known, m.max_elements)
                if req is not None:
                    learn_layout(data, scanned, known)
            if req is None:
                if msg is None:
                    msg = _parse(pb.ModelInferRequest, data)
                req = decode_infer_request(msg, m.max_elements)
                if scanned is not None:
                    learn_inputs(scanned, req)
            outs = m.run_now(req, deadline)  # a short forward, run here: no coroutine, no wait
            if outs is None:
                outs = await m.run(req, deadline, trace)
            elif lay is not None:
                learn_call(lay, m, req, outs)
            return encode_infer_response(m.name, m.version, req.id, outs, req.binary_output)
        except InferenceError as e:
            code, error = e.status_code, e
        except asyncio.CancelledError as e:
            code = 499  # the client went away or its deadline passed: grpc cancelled us, the queued work is dropped
            if trace is not None:
                trace.end(e)
                trace = None
            raise
        except Exception as e:  # a bug of ours: INTERNAL with the message, and the server keeps serving
            log.exception("ModelInfer failed")
            code, error = 500, InferenceError(f"inference failed: {type(e).__name__}: {e}")
        finally:
            if trace is not None:
                trace.end(error)
            metrics.in_flight.dec()
            metrics.count(code)
            metrics.request_seconds.observe(time.monotonic() - start)
            self._count(metrics, grpc_status_name(code) if code != 200 else "OK")
        return await self._abort(context, error)

    def _count(self, metrics: ServerMetrics, name: str) -> None:
        counts = self._rpc_codes.counts
        key = (metrics, name)
        n = counts.get(key)
        if n is None:
            self._rpc_codes.created[key] = time.time()
            n = 0
        counts[key] = n + 1

    @staticmethod
    async def _abort(context, e: InferenceError):
        code, details, trailing = error_status(e)
        await context.abort(code, details, trailing_metadata=trailing)


class _CallCounts(Collector):
    """caffeserve_grpc_requests: ModelInfer calls by model and gRPC status code, plain integers updated on
    the event loop and made a Prometheus family when scraped (a prometheus_client Counter takes a lock
    per call), as serving/metrics.py keeps the REST counts."""

    def __init__(self) -> None:
        self.counts: dict[tuple[ServerMetrics, str], int] = {}
        self.created: dict[tuple[ServerMetrics, str], float] = {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("caffeserve_grpc_requests", "gRPC ModelInfer calls by gRPC status code.",
                                     labels=["model", "version", "grpc_code"])
        merged: dict[tuple[str, str, str], tuple[int, float]] = {}  # a model reloaded has new ServerMetrics
        for key, n in list(self.counts.items()):
            metrics, code = key
            labels = (metrics.labels["model"], metrics.labels["version"], code)
            total, created = merged.get(labels, (0, self.created[key]))
            merged[labels] = (total + n, min(created, self.created[key]))
        for labels, (n, created) in merged.items():
            family.add_metric(list(labels), n, created=created)
        yield family


class GRPCServer:
    """The gRPC listener of one DataPlane; its largest request message is `max_message_bytes`.

    Our own HTTP/2 framing (transport.py) by default: it costs about half of grpc.aio's CPU per call
    (bench/protocols.py). CAFFESERVE_GRPC_TRANSPORT=grpcio serves the same service on grpc.aio instead.
    """

    def __init__(self, plane: DataPlane, repository: Repository, max_message_bytes: int):
        self.service = GRPCService(plane, repository)
        self.transport = os.environ.get("CAFFESERVE_GRPC_TRANSPORT") or "h2"
        if self.transport not in ("h2", "grpcio"):
            raise ValueError(f"CAFFESERVE_GRPC_TRANSPORT must be h2 or grpcio, not {self.transport!r}")
        self.server: GRPCListener | GRPCTransportServer
        if self.transport == "grpcio":
            self.server = GRPCListener(self.service.handler, max_message_bytes)
        else:
            paths = {f"/{pb.SERVICE}/{name}".encode(): getattr(self.service, name) for name in pb.METHODS}
            self.server = GRPCTransportServer(paths, max_message_bytes, eager=True)  # no handler needs a task

    async def start(self, host: str, port: int, tls: ReloadingTLS | None = None) -> int:
        """Bind and start (over TLS with `tls`); returns the bound port. OSError when the port cannot be bound."""
        if isinstance(self.server, GRPCListener):
            return await self.server.start(host, port, tls.grpc_credentials() if tls is not None else None)
        return await self.server.start(host, port, tls.h2_context if tls is not None else None)

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls at once, let those in flight finish within `grace_s`, then cancel them."""
        await self.server.stop(grace_s)

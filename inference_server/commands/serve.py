"""`caffeserve serve --config FILE | --model_dir DIR | --model-repository DIR`: models over the Open Inference Protocol.

`--config FILE` (or a KServe model folder, `--model_dir`) serves one model (a repository of one);
`--model-repository DIR` every model folder in DIR (`DIR/NAME/server.yaml` and its files), with Triton's
`--model-control-mode none|explicit` and `--load-model NAME`. Starts listening at once (liveness true),
loads the models in a background thread (one model: readiness true when it is loaded, false with the
loader's message when it failed; a repository: true once the start-up loads are done, each model having its
own readiness). On SIGTERM readiness turns 503 at once, the listener stays open for the drain delay (every
response then closes its connection), then closes; every request received is finished, and the process
exits 0 within drain delay + grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from caffe_http.access_log import AccessLog, add_logging_arguments, configure_logging, log_refusal, with_access_log
from caffe_http.encoding import with_content_coding
from caffe_http.lifecycle import install_uvloop
from caffe_http.server import HTTPServer, ServerLimits, serve_until_signalled
from caffe_http.tracing import TracingUnavailable, endpoint as tracing_endpoint, start as start_tracer

from ..config import ConfigError, Grpc, Limits, Tracing
from ..cpus import share_blas_threads
from ..model_dir import config_from
from ..serving.app import create_app
from ..serving.dataplane import DataPlane, Model
from ..serving.memory import DEFAULT_GPU_RESERVE, MemoryBudget
from ..serving.metrics import MetricFamilies, ServerMetrics
from ..serving.repository import CONTROL_MODES, Repository
from ..serving.tracing import SERVICE_NAME, ServerTracing

log = logging.getLogger("caffeserve")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="caffeserve serve", description=__doc__.splitlines()[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--config", metavar="FILE",
                       help="the server config YAML: its fields are in the README, section 'The inference server'")
    model.add_argument("--model_dir", "--model-dir", metavar="DIR",
                       help="a model folder, as KServe's runtimes take it (/mnt/models): its server.yaml, else its "
                            "prototxt and caffemodel with the net's own inputs and outputs (docs/kserve.md)")
    model.add_argument("--model-repository", metavar="DIR",
                       help="serve the models in DIR: each a folder DIR/NAME holding its server.yaml and files "
                            "(docs/repository.md)")
    p.add_argument("--model-control-mode", choices=CONTROL_MODES, default="none",
                   help="none (default): load every model at start, refuse load and unload calls; explicit: load "
                   "the --load-model models at start and take the repository API's load and unload calls")
    p.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="with explicit control: a model to load at start (repeatable; '*': every model; default: none)")
    p.add_argument("--memory-bytes", type=int, default=None, metavar="N",
                   help="host memory the loaded models may hold together (measured RSS growth at each load); a load "
                   "past it is refused with 507 (default: no budget)")
    p.add_argument("--gpu-memory-bytes", type=int, default=None, metavar="N",
                   help="GPU memory the loaded models may hold (default: the GPU's free memory at the first GPU "
                   "load, less --gpu-memory-reserve-bytes)")
    p.add_argument("--gpu-memory-reserve-bytes", type=int, default=DEFAULT_GPU_RESERVE, metavar="N",
                   help="GPU memory left out of the default GPU budget (default %(default)s: workspaces, the CUDA "
                   "context, forward passes)")
    p.add_argument("--model_name", "--model-name", metavar="NAME",
                   help="the model's name in URLs, replacing the config's (KServe passes the InferenceService's name; "
                        "default: the config's name, or the model folder's)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", "--http_port", type=int, default=8080,
                   help="REST port (default %(default)s; 0: any free port, printed in the log)")
    p.add_argument("--grpc-port", "--grpc_port", type=int, default=None, metavar="PORT",
                   help="gRPC port, overriding the config's grpc.port (and turning gRPC on); 0: any free port "
                   "(default: the config's grpc.port, 8081 unless it says otherwise)")
    p.add_argument("--grace-period", type=float, default=30.0, metavar="S",
                   help="seconds to finish in-flight requests on SIGTERM, after the drain delay (default %(default)g)")
    p.add_argument("--drain-delay", type=float, default=0.0, metavar="S",
                   help="on SIGTERM, readiness turns 503 at once while the listener stays open this long (each "
                        "response closing its connection), so that routing stops before it closes "
                        "(default %(default)g: close at once; in Kubernetes a few seconds, the operator sets 5)")
    p.add_argument("--otlp-endpoint", metavar="URL",
                   help="send OpenTelemetry traces of infer requests to this OTLP/HTTP base URL (e.g. "
                        "http://otel-collector:4318), overriding the config's tracing.endpoint (default: the config's, "
                        "else $OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing; docs/tracing.md)")
    p.add_argument("--tls-dir", metavar="DIR",
                   help="serve REST and gRPC over TLS with DIR/tls.crt and DIR/tls.key (a kubernetes.io/tls Secret's "
                        "layout), reloaded when they change (docs/security.md, 'To the model pods')")
    add_logging_arguments(p)
    return p.parse_args(argv)


def _bind_error(host: str, port: int) -> str:
    """Why `host:port` cannot be bound, in the OS's words (e.g. "Address already in use")."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as e:
        return e.strerror or str(e)
    return "the port could be bound a moment later"


def build(cfg, access_log: bool = True, repository_dir: str | None = None, source: str | None = None,
          name: str | None = None, mode: str = "none", budget: MemoryBudget | None = None,
          tracing: ServerTracing | None = None) -> tuple[DataPlane, HTTPServer, Repository]:
    """The data plane, the REST server and the repository: one model (`cfg`, read from `source`, a config
    file or a model folder) or the models of `repository_dir` (none loaded yet)."""
    families = MetricFamilies()
    if repository_dir is None:
        plane = DataPlane(Model(cfg, ServerMetrics(cfg.name, cfg.version, families)))
        path = Path(source or ".")
        repo = Repository(plane, families, single=path, reread=lambda: config_from(path, name)[0], mode=mode,
                          budget=budget, tracing=tracing)
        repo.adopt(plane.models[cfg.name])
        limits = cfg.limits
    else:
        plane = DataPlane([], ServerMetrics("", "", families), strict=False)
        repo = Repository(plane, families, root=Path(repository_dir), mode=mode, budget=budget, tracing=tracing)
        limits = Limits()  # the transport's limits; each model's own apply to its requests
    server_limits = ServerLimits(
        max_body_bytes=limits.max_request_bytes,
        header_timeout_s=limits.header_timeout_s,
        body_timeout_s=limits.body_timeout_s,
        max_inflight_bytes=limits.max_inflight_bytes,
    )
    # request bodies in gzip/deflate are decompressed up to maxRequestBytes (413 beyond); answers are
    # compressed when the client asks; one access line per request (caffe_http.access_log)
    access = AccessLog("server", access_log)
    handler = with_access_log(with_content_coding(create_app(plane, repo), limits.max_request_bytes), access)
    server = HTTPServer(handler, server_limits, cancel_on_disconnect=True, eager=True)
    server.on_refuse = log_refusal(access)
    return plane, server, repo


def start_tracing(tracing: Tracing, flag: str | None) -> ServerTracing | None:
    """The server's tracer when an OTLP endpoint is set (flag, config, environment), else None; the
    OpenTelemetry SDK is imported only then."""
    url = tracing_endpoint(flag or tracing.endpoint)
    if url is None:
        return None
    return ServerTracing(start_tracer(url, SERVICE_NAME, tracing.sample_ratio))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    budget = MemoryBudget(args.memory_bytes, args.gpu_memory_bytes, args.gpu_memory_reserve_bytes)
    cfg = None
    try:
        if args.model_repository is not None:
            if not os.path.isdir(args.model_repository):
                raise ConfigError(f"--model-repository {args.model_repository} is not a folder")
        else:
            if args.model_dir and not os.path.isdir(args.model_dir):
                raise ConfigError(f"--model_dir {args.model_dir} is not a folder")
            cfg, source = config_from(args.config or args.model_dir, args.model_name)
    except ConfigError as e:
        print(f"caffeserve serve: {e}", file=sys.stderr)
        return 2
    grpc_cfg = cfg.grpc if cfg is not None else Grpc()  # a repository's: the flags' (each model's is ignored)
    if args.grpc_port is not None:
        grpc_cfg.enabled, grpc_cfg.port = True, args.grpc_port
    if args.model_dir and cfg is not None:
        log.info("model folder %s: %s", args.model_dir, "its server.yaml" if source == "folder config" else
                 f"no server.yaml, serving {cfg.model.prototxt} and {cfg.model.weights} with the net's own inputs "
                 "and outputs")
    blas = share_blas_threads(cfg.instances if cfg is not None else 1)
    try:
        tracing = start_tracing(cfg.tracing if cfg is not None else Tracing(), args.otlp_endpoint)
    except TracingUnavailable as e:
        print(f"caffeserve serve: {e}", file=sys.stderr)
        return 2
    tls = None
    if args.tls_dir:
        from caffe_http.tls import ReloadingTLS, TLSFiles

        try:
            tls = ReloadingTLS(TLSFiles.from_dir(args.tls_dir))
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError: a pair that does not load
            print(f"caffeserve serve: --tls-dir {args.tls_dir}: cannot load tls.crt/tls.key: {e}", file=sys.stderr)
            return 2
    plane, server, repo = build(cfg, args.access_log, args.model_repository, args.config or args.model_dir,
                                args.model_name, args.model_control_mode, budget, tracing)
    install_uvloop()
    grpc_server = None
    if grpc_cfg.enabled:
        from ..grpc.service import GRPCServer  # grpcio is imported only when gRPC is on

        max_message = cfg.limits.max_request_bytes if cfg is not None else Limits().max_request_bytes
        grpc_server = GRPCServer(plane, repo, max_message)
    start_names = [cfg.name] if cfg is not None else repo.start_names(args.load_model)

    def listening(port: int) -> None:
        what = f"model {cfg.name}" if cfg is not None else f"repository {args.model_repository}"
        log.info("listening on %s://%s:%d (%s loading %s; control mode %s; %d BLAS thread(s) per instance)",
                 "https" if tls else "http", args.host, port, what, ", ".join(start_names) or "nothing",
                 args.model_control_mode, blas)
        plane.starting = True
        repo.loop = asyncio.get_running_loop()
        threading.Thread(target=repo.load_at_start, args=(start_names,), name="model-loader", daemon=True).start()

    signalled: list[float] = []
    stopping: list[asyncio.Task] = []

    def draining() -> None:
        signalled.append(time.monotonic())
        plane.draining = True
        log.info("shutting down: readiness is 503; draining for %g s, then finishing the requests received",
                 args.drain_delay)
        if grpc_server is not None:  # REST and gRPC drain together, within the same grace period
            stopping.append(asyncio.ensure_future(grpc_server.stop(args.grace_period)))

    async def run() -> int:
        if grpc_server is not None:
            try:
                port = await grpc_server.start(args.host, grpc_cfg.port, tls)
            except OSError as e:  # grpc says only "Failed to bind": the OS says why
                log.error("%s (%s); choose another --grpc-port", e, _bind_error(args.host, grpc_cfg.port))
                return 2
            log.info("listening for gRPC on %s:%d", args.host, port)
        reload = asyncio.ensure_future(tls.watch()) if tls is not None else None
        try:
            await serve_until_signalled(server, args.host, args.port, listening, args.grace_period, draining,
                                        args.drain_delay, ssl=tls.context if tls is not None else None)
        except OSError as e:  # the REST port is taken (or not ours to bind): a configuration error
            log.error("cannot listen for REST on %s:%d: %s; choose another --port", args.host, args.port,
                      e.strerror or e)
            if grpc_server is not None:
                await grpc_server.stop(0)
            return 2
        finally:
            if reload is not None:
                reload.cancel()
        if stopping:
            await stopping[0]
        return 0

    rc = asyncio.run(run())
    if tracing is not None:
        tracing.shutdown()  # the spans still queued go out before the exit
    if rc != 0:
        logging.shutdown()  # the log lines that say why, written before the exit
        return rc
    # The grace period bounds the whole shutdown: a forward pass still running when it ends does
    # not hold the exit (the workers are daemon threads; os._exit skips interpreter teardown, which
    # is not safe while a worker is inside Caffe).
    budget = args.grace_period + args.drain_delay
    left = budget - (time.monotonic() - signalled[0]) if signalled else args.grace_period
    end = time.monotonic() + max(0.0, left)
    closed = [m.close(timeout=max(0.0, end - time.monotonic())) for m in list(plane.models.values())]
    if not all(closed):
        log.warning("stopped with a forward pass still running at the end of the grace period")
        logging.shutdown()
        os._exit(0)
    log.info("stopped")
    return 0

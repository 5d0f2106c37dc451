"""`caffeserve gateway`: forward Open Inference Protocol requests to each model's ready servers.

    caffeserve gateway --static digits=http://127.0.0.1:8001,http://127.0.0.1:8002
    caffeserve gateway --kubernetes [--namespace NS | --all-namespaces] [--kubeconfig FILE]

Each request to /v2/models/{m}/... goes to the ready server of model m with the fewest requests
in flight (two random choices), at most --max-concurrency per server; the others wait in a
per-model queue. Overload (queue full, or no free server within --max-wait) and a model with no
ready server are answered 503 with an integer Retry-After; a request whose deadline
(--request-timeout) passes in the queue is answered 504 and never forwarded. Connection failures
are retried on another server (retry budget: 20% of active requests, at least 3); 5 consecutive
failures eject a server for 30 s. A model scaled to zero (its Service labelled with a cold-start
time) holds requests until a server is ready; a canary takes its labelled share of the requests;
`GET /autoscaling/MODEL` serves the load signal KEDA scales on (docs/traffic.md). In a cluster the
gateway needs `list` and `watch` on discovery.k8s.io endpointslices, nothing else.

gRPC (`inference.GRPCInferenceService`, port --grpc-port) is forwarded the same way, to the
servers' gRPC ports (EndpointSlice port `grpc`; `--static m=http://host:8001?grpc=8002`).

Security (docs/security.md): `--tls-dir` serves both over TLS, reloading the certificate when its
Secret changes; `--auth tokens|tokenreview` asks for bearer tokens (health stays open); the admin
calls (repository load/unload, log and trace settings) are refused unless `--admin-api`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from caffe_http.access_log import AccessLog, add_logging_arguments, configure_logging
from caffe_http.lifecycle import install_uvloop, stop_event
from caffe_http.tracing import TracingUnavailable

from .app import GatewayApp
from .balancer import Address
from .discovery import EndpointSliceWatcher, KubeConfig, StaticDiscovery, parse_static
from .settings import add_arguments, add_security_arguments, guard_from, settings_from, tls_from, upstream_tls_from
from .tracing import start_tracing

log = logging.getLogger("caffeserve.gateway")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="caffeserve gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only, as `serve` and `up`; "
                        "0.0.0.0: every interface, as the Helm chart runs it in a pod)")
    p.add_argument("--port", type=int, default=8080, help="REST port (default %(default)s; 0: any free port)")
    p.add_argument("--grpc-port", type=int, default=8081, metavar="PORT",
                   help="gRPC port (default %(default)s; 0: any free port)")
    p.add_argument("--no-grpc", action="store_true", help="serve REST only")
    src = p.add_argument_group("discovery (one of)")
    src.add_argument("--static", action="append", default=[], metavar="MODEL=URL[,URL...]",
                     help="a model's servers, given directly (repeat per model; default: none, then --kubernetes)")
    src.add_argument("--kubernetes", action="store_true",
                     help="watch EndpointSlices labelled caffeserving.io/model (default inside a cluster)")
    src.add_argument("--namespace", help="namespace to watch (default: the pod's, or the kubeconfig context's)")
    src.add_argument("--all-namespaces", action="store_true", help="watch every namespace (needs a ClusterRole)")
    src.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                     help="kubeconfig file (default $KUBECONFIG; in a cluster the service-account token)")
    src.add_argument("--context", help="kubeconfig context (default: current-context)")
    add_arguments(p)
    p.add_argument("--otlp-endpoint", metavar="URL",
                   help="send OpenTelemetry traces of forwarded requests to this OTLP/HTTP base URL (e.g. "
                        "http://otel-collector:4318; default $OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing)")
    p.add_argument("--trace-sample-ratio", type=float, default=1.0, metavar="R",
                   help="share of new traces recorded (default %(default)s); a request's own sampled flag wins")
    add_security_arguments(p)
    p.add_argument("--grace", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, how long requests in flight may take to finish (default %(default)s)")
    p.add_argument("--drain-delay", type=float, default=0.0, metavar="S",
                   help="on SIGTERM, readiness turns 503 at once while REST and gRPC keep serving this long (each "
                        "REST response closing its connection), so that the Service stops routing here before the "
                        "listeners close (default %(default)g: close at once; the Helm chart sets 5)")
    add_logging_arguments(p)
    return p


def make_discovery(args, p: argparse.ArgumentParser):
    if args.static and args.kubernetes:
        p.error("use either --static or --kubernetes, not both")
    if args.static:
        models: dict[str, set[Address]] = {}
        for spec in args.static:
            try:
                name, addrs = parse_static(spec)
            except ValueError as e:
                p.error(f"--static: {e}")
            models.setdefault(name, set()).update(addrs)
        return StaticDiscovery(models)
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if not (args.kubernetes or in_cluster):
        p.error("give --static MODEL=URL[,URL...] or --kubernetes")
    kube = KubeConfig.from_kubeconfig(args.kubeconfig, args.context) if args.kubeconfig else KubeConfig.in_cluster()
    namespace = None if args.all_namespaces else (args.namespace or kube.namespace)
    return EndpointSliceWatcher(kube, namespace)


def api_server(args) -> KubeConfig | None:
    """The API server to ask (TokenReview): the kubeconfig's, or the pod's own; None when neither."""
    if args.kubeconfig:
        return KubeConfig.from_kubeconfig(args.kubeconfig, args.context)
    return KubeConfig.in_cluster() if os.environ.get("KUBERNETES_SERVICE_HOST") else None


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    discovery = make_discovery(args, p)
    balancer, proxy, limits = settings_from(args)
    try:
        tracing = start_tracing(args.otlp_endpoint, args.trace_sample_ratio)
        guard = guard_from(args, api_server(args) if args.auth == "tokenreview" else None)
        tls = tls_from(args)
        balancer.upstream_tls = upstream_tls_from(args)
    except TracingUnavailable as e:
        p.error(str(e))
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError: a pair that does not load
        p.error(str(e))
    app = GatewayApp(discovery, balancer, proxy, limits, AccessLog("gateway", args.access_log), tracing, guard, tls)
    install_uvloop()

    grpc_port = None if args.no_grpc else args.grpc_port
    rc = asyncio.run(run_until_signalled(app, args.host, args.port, args.grace, grpc_port, args.drain_delay))
    if tracing is not None:
        tracing.shutdown()  # the spans still queued go out before the exit
    logging.shutdown()  # every queued log line written before the exit
    return rc


async def run_until_signalled(app: GatewayApp, host: str, port: int, grace_s: float,
                              grpc_port: int | None = None, drain_delay_s: float = 0.0) -> int:
    """Serve until SIGTERM/SIGINT, then drain: not ready but serving for `drain_delay_s` (endpoints
    controllers stop routing here), then refuse new requests and finish those in flight."""
    stop = stop_event()
    try:
        bound = await app.start(host, port, grpc_port=grpc_port)
    except OSError as e:
        log.error("gateway cannot listen on %s (port %d, gRPC %s): %s; choose another --port / --grpc-port",
                  host, port, grpc_port, e.strerror or e)
        return 2  # a port that cannot be bound is a configuration error (README, "Exit codes")
    log.info("gateway listening on %s://%s:%d", "https" if app.tls else "http", host, bound)
    if app.grpc_port is not None:
        log.info("gateway listening for gRPC on %s:%d", host, app.grpc_port)
    await stop.wait()
    if drain_delay_s > 0:
        app.server.begin_drain()  # readiness 503 from now on; still serving
        log.info("stopping: not ready, still serving for %g s (--drain-delay)", drain_delay_s)
        await asyncio.sleep(drain_delay_s)
    log.info("stopping: finishing requests in flight (up to %.0f s)", grace_s)
    await app.stop(grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())

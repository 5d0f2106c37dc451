"""`caffeserve serve --config FILE`: one model over the Open Inference Protocol.

Starts listening at once (liveness true), loads the model in a background thread (readiness true
when it is loaded, false with the loader's message when it failed). On SIGTERM readiness turns 503
at once, the listener stays open for the drain delay (every response then closes its connection),
then closes; every request received is finished, and the process exits 0 within drain delay + grace
period.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time

from caffe_http.lifecycle import install_uvloop
from caffe_http.server import HTTPServer, ServerLimits, serve_until_signalled

from .app import create_app
from .config import ConfigError, load_config
from .cpus import share_blas_threads
from .dataplane import DataPlane, Model
from .metrics import ServerMetrics

log = logging.getLogger("caffeserve")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="caffeserve serve", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE",
                   help="the server config YAML: its fields are in the README, section 'The inference server'")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8080, help="REST port (0: any free port, printed in the log)")
    p.add_argument("--grace-period", type=float, default=30.0, metavar="S",
                   help="seconds to finish in-flight requests on SIGTERM, after the drain delay")
    p.add_argument("--drain-delay", type=float, default=0.0, metavar="S",
                   help="on SIGTERM, readiness turns 503 at once while the listener stays open this long (each "
                        "response closing its connection), so that routing stops before it closes; "
                        "in Kubernetes a few seconds (the operator sets 5)"),
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log threshold")
    return p.parse_args(argv)


def build(cfg) -> tuple[DataPlane, HTTPServer, Model]:
    metrics = ServerMetrics(cfg.name, cfg.version)
    model = Model(cfg, metrics)
    plane = DataPlane(model)
    limits = ServerLimits(
        max_body_bytes=cfg.limits.max_request_bytes,
        header_timeout_s=cfg.limits.header_timeout_s,
        body_timeout_s=cfg.limits.body_timeout_s,
        max_inflight_bytes=cfg.limits.max_inflight_bytes,
    )
    return plane, HTTPServer(create_app(plane, metrics), limits, cancel_on_disconnect=True), model


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"caffeserve serve: {e}", file=sys.stderr)
        return 2
    blas = share_blas_threads(cfg.instances)
    plane, server, model = build(cfg)
    install_uvloop()

    def listening(port: int) -> None:
        log.info("listening on http://%s:%d (model %s loading; %d instance(s), %d BLAS thread(s) each)",
                 args.host, port, cfg.name, cfg.instances, blas)
        threading.Thread(target=model.load, name="model-loader", daemon=True).start()

    signalled: list[float] = []

    def draining() -> None:
        signalled.append(time.monotonic())
        plane.draining = True
        log.info("shutting down: readiness is 503; draining for %g s, then finishing the requests received",
                 args.drain_delay)

    asyncio.run(serve_until_signalled(server, args.host, args.port, listening, args.grace_period, draining,
                                      args.drain_delay))
    # The grace period bounds the whole shutdown: a forward pass still running when it ends does
    # not hold the exit (the workers are daemon threads; os._exit skips interpreter teardown, which
    # is not safe while a worker is inside Caffe).
    budget = args.grace_period + args.drain_delay
    left = budget - (time.monotonic() - signalled[0]) if signalled else args.grace_period
    if not model.close(timeout=max(0.0, left)):
        log.warning("stopped with a forward pass still running at the end of the grace period")
        logging.shutdown()
        os._exit(0)
    log.info("stopped")
    return 0

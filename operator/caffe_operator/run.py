"""`caffeserve operator`: run the kopf operator for CaffeModelServices.

    caffeserve operator --all-namespaces
    caffeserve operator --namespace ml --namespace staging [--kubeconfig FILE]

Namespaced or cluster-wide by flag (one is required, so the scope is always a decision), kopf's
liveness endpoint on (--liveness, default http://0.0.0.0:8081/healthz), kopf standalone (no peering
objects). With --leader-elect several replicas run and one reconciles: the holder of a Lease
(leader.py); the others wait, answering liveness, and one takes over when the holder stops or dies.
Environment: POD_NAME (the identity in the Lease, default host name and pid), POD_NAMESPACE (the
Lease's namespace, default "default"), CAFFESERVE_SERVER_IMAGE (default server image),
CAFFESERVE_GATEWAY_URL (status.url points there), CAFFESERVE_RESYNC_SECONDS (default 300),
CAFFESERVE_LOAD_RECHECK_SECONDS (first follow-up look at a model whose pods are not ready yet,
default 10, backing off to 16x; 0 turns follow-ups off), CAFFESERVE_OTLP_ENDPOINT (model pods' OpenTelemetry
traces go there unless a CR sets spec.runtime.tracing.endpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from typing import Any


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="caffeserve operator", description="Run the CaffeModelService operator (kopf).")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                       help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    p.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", metavar="URL",
                   help="kopf's liveness endpoint (default http://0.0.0.0:8081/healthz); '' turns it off")
    p.add_argument("--leader-elect", action="store_true",
                   help="run as one of several replicas: reconcile only while holding the Lease --lease-name")
    p.add_argument("--lease-name", default="caffe-serving-operator", metavar="NAME",
                   help="the Lease (in $POD_NAMESPACE) the replicas elect a leader with (default %(default)s)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account, else $KUBECONFIG)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log threshold (default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (the same as --log-level DEBUG)")
    p.add_argument("--log-format", choices=["text", "json", "plain", "full"], default="text",
                   help="text (the default; kopf's 'full': with the object each line is about), json: one JSON "
                        "object per line; plain: without the object")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig

    import kopf

    from caffe_operator import handlers  # noqa: F401  (registers the handlers)

    fmt = "full" if args.log_format == "text" else args.log_format
    debug = args.verbose or args.log_level == "DEBUG"
    kopf.configure(verbose=debug, quiet=args.log_level in ("WARNING", "ERROR"), log_format=kopf.LogFormat[fmt.upper()])
    if args.log_level == "ERROR":
        logging.getLogger().setLevel(logging.ERROR)
    try:
        if args.leader_elect:
            return asyncio.run(run_elected(args))
        kopf.run(
            clusterwide=args.all_namespaces,
            namespaces=args.namespaces or (),
            liveness_endpoint=args.liveness or None,
            standalone=True,
        )
    except Exception as e:  # a failed startup (no CRD, no credentials): one line, exit 1, the pod restarts
        cause = e.__cause__ or e
        print(f"caffeserve operator: {type(cause).__name__}: {cause}", file=sys.stderr)
        return 1
    return 0


async def run_elected(args: argparse.Namespace) -> int:
    """Wait for the Lease (answering liveness meanwhile), run kopf while holding it. Exit 1 when it is
    lost (the pod restarts as a candidate: nothing of the old leader's state survives), 0 on SIGTERM."""
    import kopf

    from caffe_operator.handlers import login
    from caffe_operator.kube import KubeClient
    from caffe_operator.leader import LeaseElector

    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    client = KubeClient(lambda: login(kopf.OperatorSettings()), retries=0, timeout_s=5)
    elector = LeaseElector(client, os.environ.get("POD_NAMESPACE") or "default", args.lease_name, identity)
    logging.getLogger("caffe_operator.leader").info("leader election: %s waits for the Lease %s", identity,
                                                    args.lease_name)
    async with _liveness_while_waiting(args.liveness):
        await elector.acquire()
    stop = asyncio.Event()
    holder = asyncio.create_task(elector.hold())
    holder.add_done_callback(lambda _t: stop.set())
    try:
        await kopf.operator(clusterwide=args.all_namespaces, namespaces=args.namespaces or (),
                            liveness_endpoint=args.liveness or None, standalone=True, stop_flag=stop)
    finally:
        lost = holder.done()
        holder.cancel()
        if not lost:
            await elector.release()
        await client.close()
    return 1 if lost else 0


class _liveness_while_waiting:
    """A candidate is alive: answer the liveness URL until kopf, which serves it itself, starts."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.runner: Any = None  # an aiohttp.web.AppRunner while waiting

    async def __aenter__(self) -> _liveness_while_waiting:
        if not self.url:
            return self
        from urllib.parse import urlsplit

        from aiohttp import web

        async def alive(_request: web.Request) -> web.Response:
            return web.json_response({"waiting": "for the Lease"})

        u = urlsplit(self.url)
        app = web.Application()
        app.router.add_get(u.path or "/", alive)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, u.hostname, u.port or 80).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())

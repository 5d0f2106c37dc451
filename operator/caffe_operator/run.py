"""`caffeserve operator`: run the kopf operator for CaffeModelServices.

    caffeserve operator --all-namespaces
    caffeserve operator --namespace ml --namespace staging [--kubeconfig FILE]

Namespaced or cluster-wide by flag (one is required, so the scope is always a decision), kopf's
liveness endpoint on (--liveness, default http://0.0.0.0:8081/healthz), standalone (one replica;
no peering objects). Environment: CAFFESERVE_SERVER_IMAGE (default server image),
CAFFESERVE_GATEWAY_URL (status.url points there), CAFFESERVE_RESYNC_SECONDS (default 300),
CAFFESERVE_LOAD_RECHECK_SECONDS (first follow-up look at a model whose pods are not ready yet,
default 10, backing off to 16x; 0 turns follow-ups off), CAFFESERVE_OTLP_ENDPOINT (model pods' OpenTelemetry
traces go there unless a CR sets spec.runtime.tracing.endpoint).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="caffeserve operator", description="Run the CaffeModelService operator (kopf).")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                       help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    p.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", metavar="URL",
                   help="kopf's liveness endpoint (default http://0.0.0.0:8081/healthz); '' turns it off")
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


if __name__ == "__main__":
    sys.exit(main())

"""`caffeserve up MANIFEST [--port P]`: a CaffeModelService manifest on this machine, no cluster.

It reads the same manifest a user would `kubectl apply` (validated by the operator's own types),
starts `spec.replicas` `caffeserve serve` processes on loopback per model with the very server
config the operator would put in the pod (manifests.server_config, with this machine's folder for
/models; each replica on free REST and gRPC ports), puts the gateway in front (REST on --port,
gRPC on --grpc-port), prints where to send requests, and on Ctrl-C or SIGTERM stops the gateway (finishing requests in
flight), then the servers, and exits. Like a Deployment, it restarts a replica that dies, and
the gateway only sends to replicas that are ready.

Where the model files come from, per `spec.source`:
- `pvc: {claimName: C, path: P}`: the files are in `ROOT/C/P` when the folder `ROOT/C` exists,
  else in `ROOT/P`; ROOT is `--pvc-root` (default: the manifest's folder). So a manifest kept
  beside its model files (examples/digits/service.yaml) runs as it is.
- `url`: each file is downloaded by `caffeserve fetch` (sha256 checked) into
  `--cache-dir/NAME/` (default `$XDG_CACHE_HOME/caffe-serving/models`, `~/.cache/caffe-serving/models`
  without it: beside the converted ONNX graphs in `~/.cache/caffe-serving/onnx`); a file
  already there with the expected sha256 is not downloaded again (one without a sha256 in the
  manifest, e.g. labels, is downloaded at every start).
- `s3: {bucket, prefix, endpoint, region, secretRef}`: downloaded the same way as `url` (and into the
  same cache), from the bucket; the credentials are the `secretRef` Secret's keys when that Secret is
  in the same file (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), else this machine's (environment,
  ~/.aws), as the AWS SDK finds them.
- `configMap: {name: N}`: the ConfigMap `N` must be in the same file (`---`-separated); its
  `data` and `binaryData` keys are written to a temporary folder.

`spec.autoscaling` is honoured: each model's replica processes follow the gateway's load signal
(in-flight + queued requests per replica) between minReplicas and maxReplicas, down to zero, and
a request to a model at zero waits for a replica (up to coldStartTimeoutSeconds), then succeeds.
`spec.canary` runs a second set of replicas with its share of the requests. The manifest file is
watched: saving a change (promote or roll back a canary, change a weight or the bounds) is applied
without losing a request (replicas.py says how).

`--pool` runs every CaffeModelService of the file in one many-model server (`caffeserve serve
--model-repository`, each model's config in a folder of its own, explicit control mode: the pool server,
whose address is printed, takes load and unload calls), `--replicas` of them (default 1), as the
operator's pool does in a cluster; canaries need replicas of their own and are refused there, autoscaling
does not apply.

The gateway's security flags work here as on `caffeserve gateway` (docs/security.md): `--tls-dir`
serves REST and gRPC over TLS, `--auth tokens --auth-token-file F` asks each call for a bearer token
(`--auth tokenreview` needs an API server and is refused). The replicas listen on loopback only.

Runtime fields that only make sense in a cluster (image, GPU resource names, node selection) are
ignored. `--device cpu` runs a `device: gpu` manifest on this machine's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from caffe_gateway.settings import add_arguments, add_security_arguments, guard_from, settings_from, tls_from
from caffe_http.access_log import add_logging_arguments, configure_logging
from caffe_http.lifecycle import install_uvloop, stop_event

from .models import LocalError, default_cache_dir, local_models, pooled
from .replicas import LocalService


def parser(prog: str = "caffeserve up") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", type=Path, help="a CaffeModelService manifest (YAML; several documents allowed)")
    p.add_argument("--host", default="127.0.0.1",
                   help="gateway address (default %(default)s: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000,
                   help="gateway REST port (default %(default)s, Triton's, so that `caffeserve serve` can keep "
                        "8080 and 8081 beside it; 0: any free port)")
    p.add_argument("--grpc-port", type=int, default=8001,
                   help="gateway gRPC port (default %(default)s; 0: any free port); each replica gets free ports "
                        "of its own")
    p.add_argument("--no-grpc", action="store_true", help="the gateway serves REST only (default: REST and gRPC)")
    p.add_argument("--pvc-root", type=Path, help="folder that holds PVC claims (default: the manifest's folder)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where source.url and source.s3 files are downloaded (default: ~/.cache/caffe-serving/models, "
                        "or $XDG_CACHE_HOME/caffe-serving/models)")
    p.add_argument("--device", choices=["cpu", "gpu"],
                   help="override runtime.device, e.g. cpu on a laptop (default: the manifest's)")
    p.add_argument("--replicas", type=int, help="override spec.replicas (default: the manifest's; with --pool: 1)")
    p.add_argument("--pool", action="store_true",
                   help="serve every model of the manifest from one many-model server (serve --model-repository) "
                   "instead of replicas of their own")
    p.add_argument("--grace", type=float, default=30.0, metavar="S",
                   help="seconds to finish requests in flight on stop (default %(default)g)")
    add_arguments(p)
    add_security_arguments(p)
    add_logging_arguments(p)
    return p


async def run(args, on_ready=None) -> int:
    """Run until SIGTERM/SIGINT (or until `on_ready(port)` returns, when given); 0 on a clean stop."""
    tmp = Path(tempfile.mkdtemp(prefix="caffeserve-up-"))
    service = None
    try:
        try:  # the gateway's security flags, as `caffeserve gateway` takes them (no API server here)
            guard, tls = guard_from(args), tls_from(args)
        except ValueError as e:
            print(f"caffeserve up: {e}", file=sys.stderr, flush=True)
            return 2
        try:
            models = local_models(args.manifest, args.pvc_root, args.cache_dir or default_cache_dir(), tmp,
                                  args.device, args.replicas)
            if args.pool:
                models = [pooled(models, tmp / "pool", args.replicas or 1)]
        except LocalError as e:  # the manifest (or a file it names) is wrong (2), or a download failed (1)
            print(f"caffeserve up: {e}", file=sys.stderr, flush=True)
            return e.exit_code
        service = LocalService(models, tmp, settings_from(args), args.host, args.port, args.grace,
                               None if args.no_grpc else args.grpc_port, log_level=args.log_level,
                               access_log=args.access_log, guard=guard, tls=tls)
        stop = stop_event()
        starting = asyncio.create_task(service.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while starting
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            print("stopping", flush=True)
            return 0
        port = starting.result()
        print(service.banner(port), flush=True)
        watcher = asyncio.create_task(watch_manifest(args, tmp, service))
        try:
            if on_ready is not None:
                result = await on_ready(port)
                stopped.cancel()
                return result
            await stopped
        finally:
            watcher.cancel()
        print("stopping: finishing requests in flight, then the servers", flush=True)
        return 0
    except LocalError as e:  # a replica that does not come up (1), a port that cannot be bound (2)
        print(f"caffeserve up: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        if service is not None:
            await service.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def watch_manifest(args, tmp: Path, service: LocalService, interval_s: float = 0.5) -> None:
    """Apply the manifest again whenever its file changes (a bad edit is reported and ignored)."""
    path = args.manifest
    if not path.is_file():
        return  # /dev/stdin, a pipe: nothing to watch
    if args.pool:  # what a pool holds changes through the repository API, not by rolling its servers
        return

    def stamp():
        try:
            st = path.stat()
            return (st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    seen = stamp()
    while True:
        await asyncio.sleep(interval_s)
        now = stamp()
        if now is None or now == seen:
            continue
        seen = now
        try:
            models = await asyncio.to_thread(local_models, path, args.pvc_root, args.cache_dir or default_cache_dir(),
                                             tmp, args.device, args.replicas)
        except LocalError as e:
            print(f"caffeserve up: {path} changed but cannot be applied: {e}; keeping what runs", flush=True)
            continue
        print(f"{path} changed: applying", flush=True)
        await service.apply(models)
        print("manifest applied", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    install_uvloop()
    rc = asyncio.run(run(args))
    logging.shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""The gateway's own CPU per forwarded request, REST and gRPC, with the upstream answered in memory.

bench/gateway.py measures the gateway whole (sockets, HTTP parsing, gRPC's C core) and on a shared
2-core machine its figures move by ±10 % from run to run. This one measures only what the
gateway's Python decides per request: route, choose the variant, acquire, forward, release,
count, answer. The servers' sockets are replaced by an answer in memory (EndpointPool.request
and the gRPC channel's call are patched), so a request never waits and N requests take N times
the CPU of one: a steady figure to compare two builds with.

    .venv/bin/python bench/gateway_core.py [--baseline DIR] [--requests 50000] [--rounds 7]

`--baseline DIR`: another checkout (e.g. `git archive main | tar -x -C DIR`) measured in the same
run; each round runs every build in a fresh process, in alternating order; figures are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def inner(requests: int) -> dict[str, float]:
    """Runs in the build's own checkout (its working directory): µs of CPU per request."""
    from caffe_gateway import grpc_proxy
    from caffe_gateway.app import GatewayApp
    from caffe_gateway.balancer import BalancerSettings
    from caffe_gateway.discovery import StaticDiscovery
    from caffe_gateway.proxy import ProxySettings
    from caffe_http.server import Request
    from caffe_http.upstream import EndpointPool, UpstreamResponse
    from inference_server.grpc import messages as pb

    rest_answer = UpstreamResponse(200, [("content-type", "application/json")], b'{"model_name":"m","outputs":[]}')
    grpc_answer = pb.ModelInferResponse(model_name="m", model_version="1").SerializeToString()

    async def request(self, method, target, headers, body, deadline):
        return rest_answer

    EndpointPool.request = request

    async def done():
        return grpc_answer

    async def no_metadata():
        return ()

    class Call:  # a grpc.aio call that has already answered
        def __await__(self):
            return done().__await__()

        initial_metadata = trailing_metadata = staticmethod(no_metadata)

    def upstream_init(self, host, port):
        self.target, self._methods, self.calls, self.lost = f"{host}:{port}", {}, set(), {}

    async def connected(self, timeout_s):
        return True

    grpc_proxy.Upstream.__init__ = upstream_init
    grpc_proxy.Upstream.connected = connected
    grpc_proxy.Upstream.method = lambda self, name: lambda data, timeout, metadata: Call()
    grpc_proxy.Upstream.close = lambda self: None
    try:  # the HTTP/2 client of our own framing (issue 29), the gateway's default: answered in memory too
        from caffe_gateway import grpc_upstream
    except ImportError:  # a build from before it
        grpc_upstream = None
    if grpc_upstream is not None:
        import grpc as _grpc

        async def h2_call(self, method, message, metadata, deadline, connect_timeout_s):
            return _grpc.StatusCode.OK, grpc_answer, (), ()

        grpc_upstream.H2Upstream.call = h2_call

    class Context:
        def invocation_metadata(self):
            return (("x-request-id", "r1"),)

        def peer(self):
            return "ipv4:127.0.0.1:5555"

        def time_remaining(self):
            return None

        async def send_initial_metadata(self, md):
            pass

        def set_trailing_metadata(self, md):
            pass

        async def abort(self, code, details, trailing_metadata=()):
            raise RuntimeError(f"{code}: {details}")

    async def run() -> dict[str, float]:
        app = GatewayApp(StaticDiscovery({"m": {("127.0.0.1", 1, 2)}}), BalancerSettings(), ProxySettings())
        await app.discovery.run(app.balancer)
        gw = app.gateway
        if "forwarder" in inspect.signature(grpc_proxy.GRPCGateway).parameters:
            ggw = grpc_proxy.GRPCGateway(gw.forwarder)
        else:
            ggw = grpc_proxy.GRPCGateway(app.balancer, gw.metrics, gw.settings)
        loop = asyncio.get_running_loop()
        body = b'{"inputs":[]}'
        data = pb.ModelInferRequest(model_name="m").SerializeToString()
        ctx = Context()

        async def rest():
            req = Request("POST", "/v2/models/m/infer", "", {"content-type": "application/json"}, body,
                          client="127.0.0.1:5555", arrived=loop.time())
            resp = await gw.handle(req)
            assert resp.status == 200, resp

        async def grpc():
            assert await ggw._forward("ModelInfer", data, ctx) == grpc_answer

        out = {}
        for name, one in (("REST", rest), ("gRPC", grpc)):
            for _ in range(2000):  # warm-up
                await one()
            t0 = time.thread_time()
            for _ in range(requests):
                await one()
            out[name] = (time.thread_time() - t0) / requests * 1e6
        return out

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout, measured in the same run")
    ap.add_argument("--requests", type=int, default=50000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        print(json.dumps(inner(args.requests)))
        return
    builds = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in builds}
    order = list(builds)
    for _ in range(args.rounds):
        for name in order:
            # `python FILE` puts the file's folder first on sys.path; the build's packages come from
            # its checkout, the working directory, put first by -c
            me = str(Path(__file__).resolve())
            code = (f"import sys; sys.argv = [{me!r}, '--inner', '--requests', '{args.requests}']; "
                    f"sys.path.insert(0, '.'); exec(compile(open({me!r}).read(), {me!r}, 'exec'), "
                    f"{{'__name__': '__main__', '__file__': {me!r}}})")
            out = subprocess.run([sys.executable, "-c", code], cwd=builds[name], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name}: {out.stderr}")
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        order.reverse()
    print(f"the gateway's own CPU per forwarded request, upstream answered in memory "
          f"({args.requests} requests per round, median of {args.rounds} rounds, min-max)")
    print(f"{'build':<10} {'REST µs':>9} {'range':>13} {'gRPC µs':>9} {'range':>13}")
    for name, runs in results.items():
        cells = []
        for proto in ("REST", "gRPC"):
            xs = [r[proto] for r in runs]
            cells.append(f"{statistics.median(xs):>9.2f} {f'{min(xs):.2f}-{max(xs):.2f}':>13}")
        print(f"{name:<10} {' '.join(cells)}")


if __name__ == "__main__":
    main()

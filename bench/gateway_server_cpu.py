"""The model server's CPU per gRPC call when the calls come through the gateway, with and without a client deadline.

A client with a deadline makes the gateway send each call's remaining time (grpc-timeout), so the server sees a
header block that differs per call in that value only; without one the gateway sends its own request timeout, the
same every call. This prints the server's CPU per call (user + system, from /proc) for both, h2load at one call in
flight through a gateway of this checkout, each figure the median of `--rounds` rounds. `--baseline DIR` also
measures a server from another checkout (e.g. `git archive main | tar -x -C DIR`) behind its own gateway of this
checkout, in the same rounds, interleaved.

    .venv/bin/python bench/gateway_server_cpu.py [--seconds 4] [--rounds 3] [--deadline 20S] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from caffe_testing.grpc import grpc_server  # noqa: E402
from gateway import CONFIG, ENV, Gateway, digits_input  # noqa: E402
from inference_server.grpc import messages as pb  # noqa: E402
from protocols import bodies, cpu_s, h2load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--deadline", default="20S", help="the client's grpc-timeout in the 'with a deadline' rows")
    ap.add_argument("--baseline", type=Path, default=None, metavar="DIR")
    args = ap.parse_args()
    body, headers = bodies("digits", "data", digits_input())["gRPC"]
    cases = {"no client deadline": headers, f"client deadline {args.deadline}": {**headers,
                                                                               "grpc-timeout": args.deadline}}
    roots = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    figures: dict[tuple[str, str], list[float]] = {}
    with ExitStack() as stack:
        pairs = {}
        for name, root in roots.items():
            server = stack.enter_context(grpc_server(CONFIG, Path("/tmp"), env=ENV, root=root))
            gateway = Gateway(server)
            stack.callback(gateway.stop)
            pairs[name] = (psutil.Process(server.proc.pid), f"http://127.0.0.1:{gateway.grpc_port}/{pb.SERVICE}/ModelInfer")
        for _ in range(args.rounds):
            for case, case_headers in cases.items():
                for name, (ps, url) in pairs.items():
                    h2load(url, body, case_headers, 1, None, requests=300)  # warm: connections, the seen layouts
                    before = cpu_s(ps)
                    r = h2load(url, body, case_headers, 1, args.seconds)
                    assert r["ok"] == r["n"], r["raw"]
                    figures.setdefault((case, name), []).append(1000 * (cpu_s(ps) - before) / r["n"])
    print(f"model server CPU per gRPC call through the gateway (ms, median of {args.rounds} rounds of "
          f"{args.seconds:g} s, one call in flight; load average {psutil.getloadavg()[0]:.1f})")
    for (case, name), values in figures.items():
        print(f"  {case:<26} {name:<9} {statistics.median(values):.3f}   rounds: "
              + " ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()

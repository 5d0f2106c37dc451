"""REST JSON vs REST binary vs gRPC on one server, for the digits net and an inception-size input.

One server process answers all three (REST and gRPC share the data plane and workers), so the
figures differ only by protocol. Beside it: the same config on a second server whose gRPC runs on
grpc.aio (CAFFESERVE_GRPC_TRANSPORT=grpcio), and an empty handler on each gRPC transport
(bench/empty_grpc.py), the floor each transport puts under a call. For each model and concurrency
(1 and 8 connections) it prints p50 and p99 latency, requests/s and the server's CPU time per request
(user + system over all its threads, from /proc), then each row's ratios to REST binary. The targets
are measured in turns (`--rounds`), so that the machine's load falls alike on all of them.

Load comes from `h2load` (nghttp2-client, a C client like wrk, cheap beside the server on 2 cores):
HTTP/1.1 keep-alive for REST, HTTP/2 with gRPC framing for gRPC, one request in flight per connection;
its per-request log gives the percentiles. h2load does not read grpc-status, so the answers of all
three are checked against each other before measuring, and the server's gRPC counter must show every
measured call OK.

    .venv/bin/python bench/protocols.py [--seconds 10] [--rounds 2] [--models digits,inception] [--concurrency 1,8]
    .venv/bin/python bench/protocols.py --models large [--baseline DIR]

`--models large`: the transports alone with a large message, an inception-size input (1x3x224x224 FP32,
602 kB as a gRPC message) sent to the empty handler on each gRPC transport. `--baseline DIR` adds a model
server and the empty handler of our transport from another checkout (e.g. `git worktree add DIR main`),
measured in the same turns: a change's before and after (rows `* base`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import inception_net  # noqa: E402
from caffe_testing.grpc import OIPClient, grpc_server, infer_request, output  # noqa: E402
from caffe_testing.servers import free_port, http  # noqa: E402
from inference_server.grpc import messages as pb  # noqa: E402

PROTOCOLS = ("REST JSON", "REST binary", "gRPC")


def bodies(model: str, name: str, x: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    """Each protocol's request body and headers for one FP32 input."""
    shape = list(x.shape)
    rest_json = orjson.dumps({"inputs": [{"name": name, "shape": shape, "datatype": "FP32",
                                          "data": x.ravel().tolist()}]})
    head = orjson.dumps({"inputs": [{"name": name, "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}})
    msg = infer_request(model, {name: x}).SerializeToString()
    return {
        "REST JSON": (rest_json, {"content-type": "application/json"}),
        "REST binary": (head + x.tobytes(), {"content-type": "application/octet-stream",
                                             "inference-header-content-length": str(len(head))}),
        "gRPC": (b"\0" + struct.pack(">I", len(msg)) + msg, {"content-type": "application/grpc", "te": "trailers"}),
    }


def check_answers(server, model: str, name: str, out: str, x: np.ndarray, cases) -> np.ndarray:
    """The three protocols give the same answer for the same input (raises otherwise)."""
    status, _, body = http("POST", f"{server.url}/v2/models/{model}/infer", cases["REST JSON"][0],
                           {"Content-Type": "application/json"})
    assert status == 200, body[:300]
    resp = orjson.loads(body)["outputs"][0]
    rest = np.array(resp["data"], np.float32).reshape(resp["shape"])
    status, headers, body = http("POST", f"{server.url}/v2/models/{model}/infer", cases["REST binary"][0],
                                 {k.title(): v for k, v in cases["REST binary"][1].items()})
    assert status == 200, body[:300]
    n = int({k.lower(): v for k, v in headers.items()}["inference-header-content-length"])
    binary = np.frombuffer(body[n:], np.float32).reshape(rest.shape)
    client = OIPClient(server.grpc_port)
    grpc_out = output(client.infer(infer_request(model, {name: x}, outputs=[out])), out)
    client.close()
    for label, got in (("REST binary", binary), ("gRPC", grpc_out)):
        assert got.shape == rest.shape and np.abs(got - rest).max() <= 1e-6, f"{label} disagrees with REST JSON"
    return rest


def grpc_ok(server) -> float:
    """The server's count of gRPC ModelInfer calls answered OK."""
    text = http("GET", server.url + "/metrics")[2].decode()
    for line in text.splitlines():
        if line.startswith("caffeserve_grpc_requests_total{") and 'grpc_code="OK"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def h2load(url: str, body: bytes, headers: dict[str, str], connections: int, seconds: float | None,
           requests: int | None = None, h1: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as d:
        body_file, log_file = Path(d) / "body", Path(d) / "log"
        body_file.write_bytes(body)
        cmd = ["h2load", f"-c{connections}", "-m1", "-t1", "-d", str(body_file), f"--log-file={log_file}"]
        cmd += [f"-D{max(1, round(seconds))}"] if seconds else [f"-n{requests}"]  # h2load: whole seconds
        cmd += ["--h1"] if h1 else []
        for k, v in headers.items():
            cmd += ["-H", f"{k}: {v}"]
        out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
        rows = [line.split("\t") for line in log_file.read_text().splitlines() if line]
    lat = np.array([int(r[2]) for r in rows]) / 1000.0  # ms
    codes = [r[1] for r in rows]
    first = min(int(r[0]) for r in rows) / 1e6
    last = max(int(r[0]) / 1e6 + int(r[2]) / 1e6 for r in rows)
    return {"n": len(rows), "ok": sum(c == "200" for c in codes), "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "rps": len(rows) / max(last - first, 1e-9), "raw": out,
            "lat": lat}


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class Target:
    """One protocol on one server process, measured in turns with the others."""

    label: str
    url: str
    body: bytes
    headers: dict[str, str]
    h1: bool
    proc: psutil.Process
    grpc_server: object | None = None  # a model server whose gRPC counter must confirm the calls


def targets(server, grpcio_server, empty: dict[str, tuple[int, psutil.Process]], model: str, cases,
            base_server=None) -> list[Target]:
    """REST JSON, REST binary and gRPC on the model server (our HTTP/2 transport), gRPC on a second model
    server running grpc.aio, and an empty handler on each gRPC transport (the floor of each); with
    `base_server` (--baseline's checkout), its REST binary and gRPC too."""
    rest_url = f"{server.url}/v2/models/{model}/infer"
    proc = psutil.Process(server.proc.pid)
    out = [Target(p, rest_url, *cases[p], True, proc) for p in ("REST JSON", "REST binary")]
    path = f"/{pb.SERVICE}/ModelInfer"
    out.append(Target("gRPC", f"http://127.0.0.1:{server.grpc_port}{path}", *cases["gRPC"], False, proc, server))
    if grpcio_server is not None:
        out.append(Target("gRPC grpc.aio", f"http://127.0.0.1:{grpcio_server.grpc_port}{path}", *cases["gRPC"], False,
                          psutil.Process(grpcio_server.proc.pid), grpcio_server))
    if base_server is not None:
        base_proc = psutil.Process(base_server.proc.pid)
        out.append(Target("REST bin base", f"{base_server.url}/v2/models/{model}/infer", *cases["REST binary"], True,
                          base_proc))
        out.append(Target("gRPC base", f"http://127.0.0.1:{base_server.grpc_port}{path}", *cases["gRPC"], False,
                          base_proc, base_server))
    out += empty_targets(empty, cases)
    return out


def empty_targets(empty: dict[str, tuple[int, psutil.Process]], cases) -> list[Target]:
    path = f"/{pb.SERVICE}/ModelInfer"
    labels = {"h2": "empty h2", "grpcio": "empty grpc.aio", "h2 baseline": "empty h2 base"}
    return [Target(labels[kind], f"http://127.0.0.1:{port}{path}", *cases["gRPC"], False, eproc)
            for kind, (port, eproc) in empty.items()]


def measure(model: str, tgts: list[Target], concurrency: list[int], seconds: float, rounds: int) -> list[dict]:
    """Each target for `seconds`, in `rounds` turns taken in rotation (so the machine's load falls alike
    on all of them); requests, CPU time and latencies summed over the turns."""
    rows = []
    for conc in concurrency:
        acc: dict[str, dict] = {t.label: {"n": 0, "cpu": 0.0, "span": 0.0, "lat": []} for t in tgts}
        for t in tgts:  # warm-up
            h2load(t.url, t.body, t.headers, conc, None, requests=max(20, 10 * conc), h1=t.h1)
        for _ in range(rounds):
            for t in tgts:
                ok_before = grpc_ok(t.grpc_server) if t.grpc_server is not None else 0.0
                cpu_before = cpu_s(t.proc)
                r = h2load(t.url, t.body, t.headers, conc, seconds / rounds, h1=t.h1)
                cpu = cpu_s(t.proc) - cpu_before
                if t.grpc_server is not None:  # HTTP 200 says nothing of grpc-status: the server's count must agree
                    served = grpc_ok(t.grpc_server) - ok_before
                    assert served >= r["ok"], f"{t.label}: {r['ok']} HTTP 200s but only {served:.0f} OK calls"
                assert r["ok"] == r["n"], f"{t.label}: {r['n'] - r['ok']} of {r['n']} requests failed\n{r['raw']}"
                a = acc[t.label]
                a["n"] += r["n"]
                a["cpu"] += cpu
                a["span"] += r["n"] / r["rps"]
                a["lat"].append(r["lat"])
        for t in tgts:
            a = acc[t.label]
            lat = np.concatenate(a["lat"])
            row = {"model": model, "protocol": t.label, "concurrency": conc, "rps": a["n"] / a["span"],
                   "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                   "cpu_ms": 1000 * a["cpu"] / max(a["n"], 1), "body_bytes": len(t.body)}
            rows.append(row)
            print(f"  {model:<10} c={conc:<2} {t.label:<14} {row['rps']:8.1f} req/s  p50 {row['p50_ms']:8.3f} ms  "
                  f"p99 {row['p99_ms']:8.3f} ms  cpu {row['cpu_ms']:7.3f} ms/req", flush=True)
    return rows


def report(rows: list[dict]) -> None:
    print()
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    print(f"{'model':<10} {'conc':>4} {'protocol':<14} {'body B':>9} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} "
          f"{'CPU ms/req':>10} {'×req/s':>7} {'×p50':>6} {'×CPU':>6}")
    for r in rows:
        same = [b for b in rows if b["model"] == r["model"] and b["concurrency"] == r["concurrency"]]
        rest = "REST bin base" if r["protocol"] == "gRPC base" else "REST binary"  # each server's own REST
        base = next((b for b in same if b["protocol"] == rest), None) or next(
            b for b in same if b["protocol"] in ("empty grpc.aio", "empty h2"))
        print(f"{r['model']:<10} {r['concurrency']:>4} {r['protocol']:<14} {r['body_bytes']:>9} {r['rps']:>9.1f} "
              f"{r['p50_ms']:>9.3f} {r['p99_ms']:>9.3f} {r['cpu_ms']:>10.3f} {r['rps'] / base['rps']:>7.2f} "
              f"{r['p50_ms'] / base['p50_ms']:>6.2f} {r['cpu_ms'] / base['cpu_ms']:>6.2f}")
    print("(× columns: ratio to REST binary at the same model and concurrency, this run (model large: to empty "
          "grpc.aio, or empty h2 with --no-grpcio); gRPC is our HTTP/2 transport, gRPC grpc.aio the same service on "
          "grpc.aio, empty *: a handler that answers nothing; * base: --baseline's checkout, its gRPC's ratios to "
          "its own REST binary)")


def model_configs(tmp: Path, names: list[str], backend: str | None) -> list[tuple[str, Path, str, str, list[int]]]:
    """(model name, config path, input name, output name, input shape) for each benchmarked model."""
    out = []
    if "digits" in names:
        cfg = yaml.safe_load((ROOT / "examples/digits/server.yaml").read_text())
        cfg["model"] = {k: (str(ROOT / "examples/digits" / v) if k in ("prototxt", "weights", "labels") else v)
                        for k, v in cfg["model"].items()}
        if backend:
            cfg["backend"] = backend
        path = tmp / "digits.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out.append(("digits", path, "data", "prob", [1, 1, 8, 8]))
    if "inception" in names:
        proto, weights = inception_net.write(tmp / "inception")
        cfg = {"name": "inception", "model": {"prototxt": str(proto), "weights": str(weights)}}
        if backend:
            cfg["backend"] = backend
        path = tmp / "inception.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out.append(("inception", path, "data", "prob", list(inception_net.INPUT_SHAPE)))
    return out


@contextmanager
def empty_servers(kinds: list[str], baseline: Path | None = None):
    """Empty-handler gRPC servers (bench/empty_grpc.py), one process per transport: {kind: (port, process)};
    with `baseline`, also that checkout's h2 (kind "h2 baseline")."""
    procs, out = [], {}
    try:
        for kind in kinds + (["h2 baseline"] if baseline else []):
            port = free_port()
            root = baseline if kind == "h2 baseline" else ROOT
            assert root is not None
            p = subprocess.Popen([sys.executable, str(root / "bench" / "empty_grpc.py"), kind.split()[0], str(port)],
                                 cwd=root, stdout=subprocess.PIPE, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
            procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == b"serving", f"empty {kind} did not start"
            out[kind] = (port, psutil.Process(p.pid))
        yield out
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10, help="measurement per protocol and concurrency")
    ap.add_argument("--rounds", type=int, default=2, help="turns the seconds are split into, in rotation")
    ap.add_argument("--models", default="digits,inception")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--backend", default=None, help="override the configs' backend (pycaffe, onnxruntime, auto)")
    ap.add_argument("--no-grpcio", action="store_true", help="leave out grpc.aio (the second server, the empty one)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout whose model server (REST binary, gRPC) and empty h2 handler run beside ours")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH",
                    help="also write the rows here (bench/targets.py)")
    args = ap.parse_args()
    if shutil.which("h2load") is None:
        raise SystemExit("h2load is not installed: apt-get install nghttp2-client (scripts/system/debian-packages.txt)")
    conc = [int(c) for c in args.concurrency.split(",")]
    rows = []
    env = {"OPENBLAS_NUM_THREADS": "1"}
    models = args.models.split(",")
    with tempfile.TemporaryDirectory() as d, \
            empty_servers(["h2"] if args.no_grpcio else ["h2", "grpcio"], args.baseline) as empty:
        if "large" in models:
            x = np.random.default_rng(0).random(inception_net.INPUT_SHAPE, dtype=np.float32)
            cases = bodies("large", "data", x)
            print(f"large: input {list(x.shape)}, a {len(cases['gRPC'][0])} B gRPC message to the empty handlers; "
                  "measuring", flush=True)
            rows += measure("large", empty_targets(empty, cases), conc, args.seconds, args.rounds)
        for model, path, name, out, shape in model_configs(Path(d), models, args.backend):
            x = np.random.default_rng(0).random(shape, dtype=np.float32)
            with ExitStack() as stack:
                server = stack.enter_context(grpc_server(path, Path(d), env=env, args=["--log-level", "WARNING"]))
                grpcio = None if args.no_grpcio else stack.enter_context(grpc_server(
                    path, Path(d), env={**env, "CAFFESERVE_GRPC_TRANSPORT": "grpcio"}, args=["--log-level", "WARNING"]))
                base = None if args.baseline is None else stack.enter_context(grpc_server(
                    path, Path(d), env=env, args=["--log-level", "WARNING"], root=args.baseline.resolve()))
                backend = orjson.loads(http("GET", f"{server.url}/v2/models/{model}")[2])["parameters"]["backend"]
                cases = bodies(model, name, x)
                check_answers(server, model, name, out, x, cases)
                print(f"{model}: input {shape}, backend {backend}; the three protocols agree; measuring", flush=True)
                rows += measure(model, targets(server, grpcio, empty, model, cases, base), conc, args.seconds,
                                args.rounds)
            time.sleep(0.5)
    report(rows)
    if args.json:
        args.json.write_bytes(orjson.dumps({"loadavg": os.getloadavg()[0], "rows": rows}, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()

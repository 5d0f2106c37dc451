"""How much the server adds to a forward pass, and what its access log, metrics and statistics cost.

Prints, for one model in one run:
- the direct pycaffe forward p50;
- REST binary and REST JSON at concurrency 1 and 8 (load from h2load, see protocols.py): requests/s,
  p50/p99 and the server's CPU time per request, on two servers measured in turns: the default (access
  log on at INFO) and `--no-access-log`, so the access line's cost is the difference of the two;
- the overhead = HTTP p50 − forward p50 at concurrency 1;
- what each bookkeeping step costs the request path, timed in this process on the server's own objects:
  the access line (held, then made into a record and written, amortized per line), the Prometheus
  metrics of one request and the Triton statistics of one request.

    .venv/bin/python bench/server_overhead.py [--config examples/digits/server.yaml] [--seconds 10] [--rounds 2]

`--baseline DIR` adds a third server run from another checkout (e.g. a worktree at main: the "before" of a
change, measured in the same turns). `--profile` adds where the default server's CPU goes, per request:
py-spy samples the GIL holder while h2load sends REST binary requests at concurrency 1, each sample is put
in one part of the request path (HTTP parse, routing, codec, forward, bookkeeping, the write, ...) and each
thread's CPU time is read from /proc (see `profile_breakdown`).

    .venv/bin/python bench/server_overhead.py --protocols "REST binary" --baseline ../main --profile

`--tracing` measures what OpenTelemetry tracing costs instead (docs/tracing.md): the same server with
tracing off, on (every request sampled: 5 spans each, exported over OTLP/HTTP to a receiver on
loopback that only counts them, as a collector elsewhere would cost nothing here) and on with
sampleRatio 0.1 (a tenth of the requests recorded), and with `--baseline DIR` a server run from another
checkout (e.g. one without the tracing code). Rounds are interleaved (off, on, ..., then the reverse
order), each figure the median over `--rounds`, the ratios against "off" from the same run.

    .venv/bin/python bench/server_overhead.py --tracing [--baseline ../main] [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from caffe_testing.servers import ServerProcess  # noqa: E402
from inference_server.config import load_config  # noqa: E402
from protocols import cpu_s, h2load  # noqa: E402
from wrk import run_wrk  # noqa: E402

VARIANTS = {"access log on": [], "access log off": ["--no-access-log"]}

SOCKET_WRITE = "HTTP: socket write"
# Where a GIL sample goes: its leaf-most frame that names a part (by "function (file" as py-spy writes a
# frame; the first rule in this order that matches that frame). A sample in a metrics call made by the
# data plane is "metrics"; the lines of a wrapper itself are the wrapper's.
PROFILE_PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("access log: writer thread (format, write)", ("QueueListener._monitor",)),
    ("access log: request path (hold, flush)", ("AccessLog.", "new_request_id", "access_log.py")),
    ("metrics (prometheus)", ("prometheus_client/", "serving/metrics.py")),
    ("statistics (Triton's)", ("serving/stats.py",)),
    ("tracing", ("tracing.py",)),
    ("forward: backend (pycaffe's Python side)", ("backends/", "caffe/pycaffe.py")),
    ("executor (queue, inline run)", ("serving/executor.py",)),
    ("decode request (binary/JSON codec)", ("decode_request", "jsonscan.py")),
    ("encode answer (codec)", ("encode_response (inference_server",)),
    ("data plane (checks, blobs, timing)", ("serving/dataplane.py",)),
    ("routing + handler wrappers", ("serving/app.py", "caffe_http/encoding.py")),
    ("HTTP: response head", ("encode_response (caffe_http",)),
    (SOCKET_WRITE, ("_Connection._serve_pending",)),  # what is left there: transport.write
    ("HTTP: parse (httptools callbacks)", ("_Connection.",)),
]


def direct_forward_p50(cfg, x: np.ndarray, iterations: int = 2000) -> float:
    import caffe

    caffe.set_mode_cpu()
    net = caffe.Net(str(cfg.path(cfg.model.prototxt)), caffe.TEST, weights=str(cfg.path(cfg.model.weights)))
    name = net.inputs[0]
    net.blobs[name].reshape(*x.shape)
    net.reshape()
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        net.blobs[name].data[...] = x
        net.forward()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def bodies(name: str, x: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    shape = list(x.shape)
    head = orjson.dumps({"inputs": [{"name": name, "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}})
    return {
        "REST binary": (head + x.tobytes(), {"content-type": "application/octet-stream",
                                             "inference-header-content-length": str(len(head))}),
        "REST JSON": (orjson.dumps({"inputs": [{"name": name, "shape": shape, "datatype": "FP32",
                                                "data": x.ravel().tolist()}]}), {"content-type": "application/json"}),
    }


def per_call_us(fn, n: int = 20000) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def bookkeeping_costs(cfg) -> dict[str, float]:
    """µs per request of each bookkeeping step, on the server's own classes, in this process."""
    from caffe_http.access_log import AccessLog, TextFormatter, configure_logging
    from inference_server.serving.metrics import ServerMetrics
    from inference_server.serving.stats import ModelStats

    configure_logging("INFO", "text", io.StringIO())
    access = AccessLog("server")
    path = f"/v2/models/{cfg.name}/infer"
    access._scheduled = True  # as between two flushes on the event loop: a line is only held

    def line():
        access.write("POST", path, 200, 120, 0.0003, "0123456789abcdef", "127.0.0.1:5555")

    held_us = per_call_us(line)
    lines = access._held[:5000]
    access._held.clear()
    text = TextFormatter()
    t = time.perf_counter()
    text.access_lines("server", lines)
    format_us = (time.perf_counter() - t) / len(lines) * 1e6

    metrics = ServerMetrics(cfg.name, cfg.version)

    def one_request_metrics():
        metrics.in_flight.inc()
        metrics.queue_seconds.observe(0.00001)
        metrics.observe_batch(1, 0.00002)
        metrics.in_flight.dec()
        metrics.count(200)
        metrics.request_seconds.observe(0.0003)

    stats = ModelStats()

    def one_request_stats():
        stats.execution(1, 20000)
        stats.success(300000, 1000, 20000, 20000, 5000, 1, 1)

    out = {"access line: held (request path)": held_us,
           "access line: formatted (each flush, text format)": format_us,
           "metrics (in-flight, count, 4 histograms)": per_call_us(one_request_metrics),
           "statistics (Triton's, one success and one execution)": per_call_us(one_request_stats)}
    logging.shutdown()
    return out


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """CPU seconds (user, system) of each thread of `pid`, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[int(task.name)] = (int(fields[11]) / tick, int(fields[12]) / tick)
    return out


def served(url: str, model: str) -> int:
    """Requests the model has answered (its Triton statistics' success count)."""
    from caffe_testing.servers import http

    status, _, body = http("GET", f"{url}/v2/models/{model}/stats")
    return orjson.loads(body)["model_stats"][0]["inference_stats"]["success"]["count"]


def profile_breakdown(server, model: str, body: bytes, headers: dict[str, str], seconds: float) -> None:
    """Where the server's CPU goes per request: py-spy `--gil` samples (which thread holds the GIL, and
    where) under h2load at concurrency 1, and each thread's CPU time from /proc over the same window.
    py-spy often shows a coroutine chain the loop has just resumed by its outer frame alone, at an `await`
    line (38% of the samples once, at the access-log wrapper's `await handler(req)`): such samples are
    counted apart, as unattributed, and `--native` (which sees the whole chain) slows the server ten-fold.

    A part's time per request = its share of the GIL samples × the server's CPU time per request: the
    split is an estimate (what runs without the GIL, the Net's C++ forward in our pycaffe build and the
    event loop's socket reads, is spread over the parts), the total is measured.
    """
    import re
    import subprocess
    import tempfile
    import threading

    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        print("--profile needs py-spy: pip install -e '.[bench]'")
        return
    pid, rate = server.proc.pid, 500
    url = f"{server.url}/v2/models/{model}/infer"
    load = threading.Thread(target=h2load, args=(url, body, headers, 1, seconds + 3), kwargs={"h1": True})
    load.start()
    time.sleep(1.0)
    with tempfile.TemporaryDirectory() as d:
        raw = Path(d) / "profile.raw"
        n0, cpu0, t0 = served(server.url, model), thread_cpu(pid), time.monotonic()
        spy_run = subprocess.run([str(spy), "record", "-p", str(pid), "-d", str(round(seconds)), "-r", str(rate),
                                  "--gil", "--threads", "-f", "raw", "-o", str(raw)], capture_output=True, text=True)
        n1, cpu1, t1 = served(server.url, model), thread_cpu(pid), time.monotonic()
        load.join()
        if spy_run.returncode != 0 or not raw.exists():
            print(f"py-spy failed: {spy_run.stderr.strip()[-500:]}")
            return
        rows = []
        for line in raw.read_text().splitlines():
            stack, count = line.rsplit(" ", 1)
            rows.append((stack.split(";"), int(count)))
    n = max(1, n1 - n0)
    span = t1 - t0
    per_thread = {tid: sum(cpu1.get(tid, c)) - sum(c) for tid, c in cpu0.items()}
    main_cpu = per_thread.get(pid, 0.0)
    main_sys = cpu1[pid][1] - cpu0[pid][1]
    parts: dict[str, int] = {}
    main_gil = 0
    for frames, count in rows:
        thread = int(re.search(r"\((\d+)\)", frames[0]).group(1)) if frames[0].startswith("thread") else pid
        main_gil += count if thread == pid else 0
        parts[part_of(frames)] = parts.get(part_of(frames), 0) + count
    cpu_us = 1e6 * sum(per_thread.values()) / n
    kernel_us = 1e6 * main_sys / n
    gil_us = 1e6 * sum(parts.values()) / rate / n  # py-spy samples `rate` times a second
    print(f"\nprofile: REST binary, concurrency 1, {span:.1f} s, {n} requests, load average "
          f"{os.getloadavg()[0]:.1f}; py-spy --gil at {rate} Hz: {sum(parts.values())} samples")
    print(f"  server CPU per request: {cpu_us / 1000:.3f} ms (the main thread {1000 * main_cpu / n:.3f}, other "
          f"threads {(cpu_us - 1e6 * main_cpu / n) / 1000:.3f}); the GIL held {gil_us / 1000:.3f} ms per request "
          f"({1000 * main_gil / (rate * n):.3f} by the main thread; wall time, which a busy machine stretches)")
    # The samples in the socket write are mostly the thread waiting for the CPU it gave the woken client:
    # the write's CPU is in the kernel time, measured. The rest of the CPU is split as the other samples are.
    write = parts.pop(SOCKET_WRITE, 0)
    total = max(1, sum(parts.values()))
    user_us = cpu_us - kernel_us
    print(f"  {'part':<50} {'µs/req':>7} {'share':>6}")
    kernel = "kernel: socket reads and writes, epoll (measured)"
    print(f"  {kernel:<50} {kernel_us:7.1f} {100 * kernel_us / cpu_us:5.1f}%")
    for part, count in sorted(parts.items(), key=lambda kv: -kv[1]):
        us = user_us * count / total
        print(f"  {part:<50} {us:7.1f} {100 * us / cpu_us:5.1f}%")
    print(f"  (each part: its share of the GIL samples x the user CPU per request; {write} samples in the socket "
          "write left out)")


CUT_CHAIN = "unattributed: a coroutine chain py-spy cut at an await"


def _source_line(frame: str) -> str:
    """The source line a py-spy frame "function (path:line)" names ('' when it cannot be read)."""
    import linecache
    import re

    m = re.search(r"\((.+):(\d+)\)$", frame)
    if m is None:
        return ""
    path = m.group(1) if os.path.isabs(m.group(1)) else str(ROOT / m.group(1))
    return linecache.getline(path, int(m.group(2)))


def part_of(frames: list[str]) -> str:
    """The PROFILE_PARTS name of one sampled stack (root first, as py-spy writes it); a thread's own part
    (the log writer's) wins over its frames; a leaf at an `await` is a chain py-spy cut."""
    for name, needles in PROFILE_PARTS[:1]:
        if any(needle in frame for frame in frames for needle in needles):
            return name
    if "await " in _source_line(frames[-1]):
        return CUT_CHAIN
    for frame in reversed(frames):
        for name, needles in PROFILE_PARTS:
            if any(needle in frame for needle in needles):
                return name
    return "other (event loop, task steps, glue)"


def request_path_costs(config: str, body: bytes, headers: dict[str, str]) -> dict[str, float]:
    """CPU µs (this thread's CPU time, so other jobs on the machine do not inflate it) of each stage of one
    REST request, on the server's own objects in this process, no sockets: the HTTP parse (httptools and
    the connection's callbacks), the whole handler chain (access log, content coding, routing, data plane,
    the forward run inline, the answer), and inside it the codec, the forward and the bookkeeping."""
    import asyncio

    from caffe_http.access_log import configure_logging
    from caffe_http.server import Request, Response, _Connection, encode_response as http_head
    from inference_server.commands.serve import build
    from inference_server.model_dir import config_from
    from inference_server.serving.codecs import STREAM_MIN_BYTES, decode_request, encode_response

    configure_logging("INFO", "text", io.StringIO())
    cfg, _ = config_from(config, None)
    plane, server, _repo = build(cfg, True, None, config, None, "none")
    m = plane.models[cfg.name]
    m.load()
    path = f"/v2/models/{cfg.name}/infer"
    hdrs = {"host": "127.0.0.1", "user-agent": "h2load", **{k.lower(): v for k, v in headers.items()},
            "content-length": str(len(body))}
    raw = (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n").encode() + body
    n = 5000
    out: dict[str, float] = {}

    def cpu_us(what: str, fn) -> None:
        fn()
        t = time.thread_time()
        for _ in range(n):
            fn()
        out[what] = (time.thread_time() - t) / n * 1e6

    async def run() -> None:
        loop = asyncio.get_running_loop()

        async def chain(k: int) -> None:
            for i in range(k):
                await server.handler(Request("POST", path, "", dict(hdrs), body, "127.0.0.1:1", 0.0))
                if i % 100 == 0:
                    await asyncio.sleep(0)  # the access log's flush runs, as it would between requests

        await chain(200)
        t = time.thread_time()
        await chain(n)
        out["handler chain: all of it (below)"] = (time.thread_time() - t) / n * 1e6
        inline = m.executor.inline_backend
        if inline is not None:
            # The parts below are each timed alone, in a loop that keeps their code and data in the caches;
            # in the chain they run between the others (and, in the server, between the kernel's socket work
            # and other processes), so each costs more there. The forward is the largest such part: timed
            # inside the chain (its CPU time around backend.infer), and the chain again without it (a stub
            # that answers the same arrays).
            real = inline.infer
            spent = [0.0]

            def timed(blobs, outputs):
                t0 = time.thread_time()
                try:
                    return real(blobs, outputs)
                finally:
                    spent[0] += time.thread_time() - t0

            inline.infer = timed
            try:
                await chain(n)
                out["  the forward, timed inside the chain"] = spent[0] / n * 1e6
                answer = real({t.name: t.array for t in decode_request(body, hdrs, m.max_elements).inputs},
                              m.outputs)
                inline.infer = lambda blobs, outputs: {k: v.copy() for k, v in answer.items()}
                t = time.thread_time()
                await chain(n)
                out["  the chain without the forward (a stub answers)"] = (time.thread_time() - t) / n * 1e6
            finally:
                inline.infer = real
        cpu_us("  decode the request (codec)",
               lambda: decode_request(body, hdrs, m.max_elements, m._check_input, STREAM_MIN_BYTES, m.plans))
        req = decode_request(body, hdrs, m.max_elements, m._check_input, STREAM_MIN_BYTES, m.plans)
        backend = m.executor.inline_backend
        if backend is not None:
            blobs = {t.name: t.array for t in req.inputs}
            cpu_us("  the forward alone, in a loop (backend.infer)", lambda: backend.infer(blobs, m.outputs))
        outs, _ = await m._run_timed(req, None, time.perf_counter_ns())
        cpu_us("  encode the answer (codec)", lambda: encode_response(m.name, m.version, req.id, outs))
        cpu_us("  statistics (one success)", lambda: m.stats.success(1, 1, 1, 1, 1, 1, 1))
        resp = Response(200, b"x" * 200, "application/octet-stream",
                        {"Inference-Header-Content-Length": "150", "X-Caffeserve-Backend": "pycaffe",
                         "X-Request-Id": "0123456789abcdef"})
        cpu_us("HTTP response head", lambda: http_head(resp, True))

        class Transport:  # what _Connection asks of a socket's transport
            def get_extra_info(self, name):
                return ("127.0.0.1", 1)

            def write(self, data) -> None:
                pass

        server.loop = loop
        conn = _Connection(server)
        conn.connection_made(Transport())  # type: ignore[arg-type]
        conn.worker = object()  # type: ignore[assignment]  # parse only: no task is started

        def parse() -> None:
            conn.data_received(raw)
            conn.pending.clear()

        cpu_us("HTTP parse (httptools and the callbacks)", parse)
        conn.worker = None
        conn._cancel_timer()

    asyncio.run(run())
    m.close()
    return out


def tracing_cost(args, url_path: str, body: bytes) -> None:
    """--tracing: the same server with tracing off and on, interleaved rounds, medians and ratios."""
    from contextlib import ExitStack

    from caffe_testing.otlp import OTLPReceiver

    env = {"OPENBLAS_NUM_THREADS": "1", **{k: "" for k in os.environ if k.startswith("OTEL_")}}
    with ExitStack() as stack:
        receiver = stack.enter_context(OTLPReceiver(decode=False))
        on = {"CAFFESERVE__TRACING__ENDPOINT": receiver.endpoint}
        variants = {
            "off": ServerProcess(Path(args.config), env=env),
            "on, every request": ServerProcess(Path(args.config), env={**env, **on}),
            "on, sampleRatio 0.1": ServerProcess(Path(args.config),
                                                 env={**env, **on, "CAFFESERVE__TRACING__SAMPLE_RATIO": "0.1"}),
        }
        if args.baseline:
            variants["baseline"] = ServerProcess(Path(args.config), env=env, root=args.baseline.resolve())
        if args.only:
            variants = {k: v for k, v in variants.items() if k.split(",")[0] in args.only.split(",")}
        for server in variants.values():
            stack.enter_context(server)
            run_wrk(server.url + url_path, body, {"Content-Type": "application/json"}, 1, 2)  # warm-up
        results: dict[tuple[str, int], list[dict]] = {}
        names = list(variants)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                for conc in (1, 8):
                    results.setdefault((name, conc), []).append(
                        run_wrk(variants[name].url + url_path, body, {"Content-Type": "application/json"}, conc,
                                args.seconds))
        time.sleep(6)  # the exporter's last batch (its schedule delay is 5 s)
    print(f"tracing cost, median of {args.rounds} interleaved rounds of {args.seconds:g} s "
          f"(spans received: {receiver.posts} exports, {receiver.bytes / 1e6:.1f} MB)")
    print(f"{'server':>20} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s vs off':>12} "
          f"{'p50 vs off':>10} {'errors':>6}")
    for conc in (1, 8):
        off = results["off", conc]
        off_rps = statistics.median(x["rps"] for x in off)
        off_p50 = statistics.median(x["p50_ms"] for x in off)
        for name in names:
            rows = results[name, conc]
            rps, p50 = statistics.median(x["rps"] for x in rows), statistics.median(x["p50_ms"] for x in rows)
            p99 = statistics.median(x["p99_ms"] for x in rows)
            errors = sum(x["non2xx"] + x["socket_errors"] for x in rows)
            print(f"{name:>20} {conc:>4} {rps:>8.0f} {p50:>8.3f} {p99:>8.3f} {rps / off_rps:>12.3f} "
                  f"{p50 / off_p50:>10.3f} {errors:>6}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples/digits/server.yaml"))
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=2,
                    help="turns the seconds are split into, in rotation; with --tracing, interleaved rounds")
    ap.add_argument("--tracing", action="store_true", help="measure tracing off against on (module docstring)")
    ap.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                    help="also a server (access log on) run from the checkout DIR, measured in the same turns")
    ap.add_argument("--protocols", default="REST binary,REST JSON", help="comma-separated (default: both)")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated (default: 1,8)")
    ap.add_argument("--profile", action="store_true", help="where the default server's CPU goes (docstring)")
    ap.add_argument("--only", default="", metavar="NAMES",
                    help="with --tracing: only these servers, comma-separated: off, on, baseline (default: all)")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH",
                    help="also write the rows here (bench/targets.py)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    import caffe

    net = caffe.Net(str(cfg.path(cfg.model.prototxt)), caffe.TEST)
    name = net.inputs[0]
    shape = [1, *net.blobs[name].data.shape[1:]]
    del net
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    cases = bodies(name, x)
    binary_case = cases["REST binary"]
    cases = {k: v for k, v in cases.items() if k in args.protocols.split(",")}
    if args.tracing:
        tracing_cost(args, f"/v2/models/{cfg.name}/infer", cases["REST JSON"][0])
        return
    fwd = direct_forward_p50(cfg, x)
    print(f"model {cfg.name}: input {name} {shape}; direct pycaffe forward p50: {fwd:.4f} ms", flush=True)
    rows = {}
    with ExitStack() as stack:
        env = {"OPENBLAS_NUM_THREADS": "1"}
        servers = {v: stack.enter_context(ServerProcess(Path(args.config), env=env, args=a))
                   for v, a in VARIANTS.items()}
        if args.baseline:
            servers["baseline"] = stack.enter_context(ServerProcess(Path(args.config), env=env,
                                                                    root=args.baseline.resolve()))
        for conc in (int(c) for c in args.concurrency.split(",")):
            for proto, (body, headers) in cases.items():
                acc = {v: [0, 0.0, 0.0, []] for v in servers}
                for s in servers.values():  # warm-up
                    h2load(f"{s.url}/v2/models/{cfg.name}/infer", body, headers, conc, None, requests=200, h1=True)
                for _ in range(args.rounds):
                    for v, s in servers.items():
                        proc = psutil.Process(s.proc.pid)
                        c0 = cpu_s(proc)
                        r = h2load(f"{s.url}/v2/models/{cfg.name}/infer", body, headers, conc,
                                   args.seconds / args.rounds, h1=True)
                        assert r["ok"] == r["n"], r["raw"]
                        a = acc[v]
                        a[0] += r["n"]
                        a[1] += cpu_s(proc) - c0
                        a[2] += r["n"] / r["rps"]
                        a[3].append(r["lat"])
                for v, (n, cpu, span, lat) in acc.items():
                    lat_all = np.concatenate(lat)
                    rows[(conc, proto, v)] = (n / span, float(np.percentile(lat_all, 50)),
                                              float(np.percentile(lat_all, 99)), 1000 * cpu / n)
        if args.profile:
            profile_breakdown(servers["access log on"], cfg.name, *binary_case, max(4.0, args.seconds))
    costs = bookkeeping_costs(cfg)
    stages = request_path_costs(args.config, *binary_case)
    print(f"\nload average (1 min): {os.getloadavg()[0]:.1f}")
    print(f"{'conc':>4} {'protocol':<12} {'server':<15} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>10}")
    for (conc, proto, v), (rps, p50, p99, cpu) in rows.items():
        print(f"{conc:>4} {proto:<12} {v:<15} {rps:>8.0f} {p50:>8.3f} {p99:>8.3f} {cpu:>10.3f}")
    for proto in cases:
        if (1, proto, "access log on") not in rows:
            continue
        on, off = rows[(1, proto, "access log on")], rows[(1, proto, "access log off")]
        print(f"{proto}: overhead at concurrency 1 (HTTP p50 − forward p50): {on[1] - fwd:.3f} ms; "
              f"the access line costs {on[3] - off[3]:+.3f} ms of CPU per request (on − off)")
        if args.baseline:
            base = rows[(1, proto, "baseline")]
            print(f"{proto}: baseline {args.baseline} at concurrency 1: overhead {base[1] - fwd:.3f} ms, "
                  f"CPU {base[3]:.3f} ms per request; this checkout / baseline CPU: {on[3] / base[3]:.2f}")
    if args.json:
        args.json.write_bytes(orjson.dumps({
            "loadavg": os.getloadavg()[0], "forward_p50_ms": fwd, "baseline": str(args.baseline or ""),
            "rows": [{"concurrency": conc, "protocol": proto, "server": v, "rps": rps, "p50_ms": p50, "p99_ms": p99,
                      "cpu_ms": cpu} for (conc, proto, v), (rps, p50, p99, cpu) in rows.items()],
        }, option=orjson.OPT_INDENT_2))
    print("bookkeeping on the request path, µs per request (timed in-process):")
    for what, us in costs.items():
        print(f"  {what:<55} {us:7.2f}")
    print("a REST binary request's stages, µs of CPU each (in-process, no sockets):")
    for what, us in stages.items():
        print(f"  {what:<55} {us:7.2f}")


if __name__ == "__main__":
    main()

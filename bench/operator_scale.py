"""The operator at scale, against a real control plane: N CaffeModelServices on fake nodes.

    .venv/bin/python bench/operator_scale.py --count 1000 [--quiet-s 60] [--json out.json]

What runs: etcd, kube-apiserver, kube-controller-manager and kube-scheduler (scripts/kube/build.sh);
the node agent on `--nodes` nodes in "no processes" mode (pods are scheduled by the real scheduler
and turn Running/Ready at once, as kwok's do; the real EndpointSlice controller publishes them);
the chart's RBAC (real Helm); `caffeserve operator` and `caffeserve gateway --kubernetes` as local
processes with their ServiceAccounts' tokens (caffe_testing/kubestack.py).

It applies N CRs (one `kubectl apply` of N documents) and prints:
- the time until every CR says Ready=True (from the apply), and until the gateway routes all N;
- API requests per CR: the operator's ServiceAccount's requests in the API server's audit log
  (by verb), over the whole run, and over a quiet window afterwards (a hot loop shows there);
- the operator's RSS (peak, sampled each second) and CPU seconds (user + system);
- the gateway's RSS before the CRs and with N models discovered (its discovery memory).
Each CR asks for one replica on the CPU (the pods run nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from caffe_testing.cms import ready  # noqa: E402
from caffe_testing.kubestack import NAMESPACE, OPERATOR_SA, KubeStack, model  # noqa: E402
from caffe_testing.nodeagent import NodeSpec  # noqa: E402

CMS = "caffeserving.io/v1alpha1/caffemodelservices"
MODEL_NS = "scale"


class Sampler:
    """Peak RSS of a process, sampled every second in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(1.0)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1000, help="CaffeModelServices to create (default 1000)")
    ap.add_argument("--nodes", type=int, default=8, help="fake nodes, 250 pods each (default 8)")
    ap.add_argument("--quiet-s", type=float, default=60.0, help="seconds to count requests after all are Ready")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="give up after this long")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    n = args.count
    nodes = [NodeSpec(f"node-{i}", cpu="1000", memory="100Ti", pods="250") for i in range(args.nodes)]
    assert n <= 250 * args.nodes, "more CRs than the nodes have pod slots"
    figures: dict[str, object] = {"count": n, "nodes": args.nodes}
    with KubeStack(nodes=nodes, through_proxy=False) as stack:
        cp, op_pid, gw_pid = stack.cp, stack.operator.proc.pid, stack.gateway.proc.pid
        cp.create_namespace(MODEL_NS)
        user = f"system:serviceaccount:{NAMESPACE}:{OPERATOR_SA}"

        def audit() -> list[dict]:  # the operator's requests (only its lines parsed: the log grows large)
            out = []
            rotated = sorted(cp.audit_log.parent.glob("audit-*.log"))  # the API server rotates it at 100 MB
            for path in [*rotated, cp.audit_log]:
                with open(path, errors="replace") as f:
                    for line in f:
                        if user in line and '"ResponseComplete"' in line:
                            with contextlib.suppress(ValueError):
                                out.append(json.loads(line))
            return out
        before_requests = len(audit())
        time.sleep(3)
        gw_rss0, op_rss0, op_cpu0 = psutil.Process(gw_pid).memory_info().rss, psutil.Process(op_pid).memory_info().rss, cpu_s(op_pid)
        docs = "\n---\n".join(yaml.safe_dump(model(f"m{i:04d}", MODEL_NS)) for i in range(n))
        with Sampler(op_pid) as op_mem:
            start = time.monotonic()
            cp.kubectl("apply", "-f", "-", input=docs, timeout=args.timeout_s)
            figures["kubectl apply s"] = round(time.monotonic() - start, 1)
            print(f"applied {n} CRs in {figures['kubectl apply s']} s", flush=True)
            all_ready = gw_all = None
            last_print = 0.0
            while time.monotonic() - start < args.timeout_s:
                crs = cp.list_objects(CMS, MODEL_NS)
                n_ready = sum(ready(c).get("status") == "True" for c in crs)
                if all_ready is None and n_ready == n:
                    all_ready = time.monotonic() - start
                n_gw = len(stack.gateway_models())
                if gw_all is None and n_gw == n:
                    gw_all = time.monotonic() - start
                if time.monotonic() - last_print > 30:
                    print(f"  {time.monotonic() - start:6.0f} s: {n_ready}/{n} Ready, gateway routes {n_gw}", flush=True)
                    last_print = time.monotonic()
                if all_ready is not None and gw_all is not None:
                    break
                time.sleep(5)
            else:
                print(f"timed out: {n_ready}/{n} Ready, gateway routes {n_gw}", flush=True)
                print(stack.logs()[-5000:])
                return 1
            figures["all Ready s"] = round(all_ready, 1)
            figures["gateway routes all s"] = round(gw_all, 1)
            busy_events = audit()[before_requests:]
            figures["operator CPU s (to all Ready)"] = round(cpu_s(op_pid) - op_cpu0, 1)
            quiet_from = len(audit())
            quiet_cpu0 = cpu_s(op_pid)
            time.sleep(args.quiet_s)
            quiet = audit()[quiet_from:]
            figures["operator CPU s (quiet window)"] = round(cpu_s(op_pid) - quiet_cpu0, 1)
        figures["operator requests"] = len(busy_events)
        figures["operator requests per CR"] = round(len(busy_events) / n, 2)
        figures["operator requests per CR by verb"] = {
            k: round(v / n, 2) for k, v in Counter(e["verb"] for e in busy_events).most_common()}
        figures["operator requests by resource"] = dict(Counter(
            f"{e['verb']} {e.get('objectRef', {}).get('resource', '')}" for e in busy_events).most_common(12))
        figures[f"operator requests in the {args.quiet_s:.0f} s after"] = len(quiet)
        figures["... of which"] = dict(Counter(
            f"{e['verb']} {e.get('objectRef', {}).get('resource', '')}" for e in quiet).most_common(6))
        figures["operator RSS MiB (idle, peak)"] = (mib(op_rss0), mib(op_mem.peak))
        gw_rss1 = psutil.Process(gw_pid).memory_info().rss
        figures["gateway RSS MiB (0 models, N models)"] = (mib(gw_rss0), mib(gw_rss1))
        figures["gateway discovery KiB per model"] = round((gw_rss1 - gw_rss0) / n / 1024, 1)
        figures["API server RSS MiB"] = mib(psutil.Process(cp.components["kube-apiserver"].proc.pid).memory_info().rss)
        figures["load average (1 min) at the end"] = round(psutil.getloadavg()[0], 1)
        figures["cpus"] = psutil.cpu_count()
    for k, v in figures.items():
        print(f"{k}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

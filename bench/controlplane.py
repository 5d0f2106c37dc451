"""How long the tests' real Kubernetes control plane takes to start (caffe_testing/controlplane.py).

Starts etcd + kube-apiserver + kube-controller-manager + kube-scheduler `--runs` times, then the node
agent's four nodes, and prints when the API server answered /readyz, when the controllers ran
(the default ServiceAccount exists), when the nodes were registered, and when the first pod
(a Python HTTP server) was Ready on its own address. Binaries from scripts/kube/build.sh (cached).

    .venv/bin/python bench/controlplane.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from caffe_testing.controlplane import ControlPlane
from caffe_testing.nodeagent import TEST_NODES, NodeAgent


def one_run() -> dict[str, float]:
    t0 = time.monotonic()
    with ControlPlane() as cp:
        out = {"apiserver ready": cp.timings["apiserver ready"], "controllers running": cp.timings["controllers running"]}
        with NodeAgent(cp, TEST_NODES):
            out["4 nodes registered"] = time.monotonic() - t0
            cp.create("v1/pods", "default", {"metadata": {"name": "web"}, "spec": {"containers": [{
                "name": "web", "image": "python", "command": [sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0"],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}, "ports": [{"containerPort": 8080}]}]}})
            cp.wait_for(lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in
                                    (cp.get_object("v1/pods", "default", "web").get("status") or {}).get("conditions", [])),
                        timeout=60, interval=0.05, what="the pod Ready")
            out["first pod Ready"] = time.monotonic() - t0
    out["stopped"] = time.monotonic() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    runs = [one_run() for _ in range(args.runs)]
    print(f"control plane start, s from the first process (median of {args.runs}; min-max):")
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"  {key:22s} {statistics.median(values):5.1f}   ({min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()

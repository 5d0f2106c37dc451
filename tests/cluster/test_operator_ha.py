"""Two operators, one reconciling: `caffeserve operator --leader-elect` (operator/caffe_operator/leader.py)
against a real API server. One takes the Lease and reconciles; the other waits, answering liveness;
killed outright (SIGKILL) the leader is replaced within the lease duration plus a retry period, and
stopped cleanly (SIGTERM) sooner: it releases the Lease once kopf has stopped; the new leader
reconciles what changed meanwhile, and no child is ever written by two operators. Prints the
measured hand-over times (docs/kubernetes.md)."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from caffe_operator.leader import LEASE_DURATION_S, RETRY_PERIOD_S
from caffe_testing import REPO
from caffe_testing.cluster import CMS, CONFIGMAPS, DEPLOYMENTS
from caffe_testing.controlplane import ControlPlane
from caffe_testing.servers import CAFFESERVE, free_port, stop_process

pytestmark = pytest.mark.timeout(300)
NS, LEASE = "ml", "caffe-serving-operator"
LEASES = "coordination.k8s.io/v1/leases"
DIGITS = yaml.safe_load((REPO / "examples/digits/service.yaml").read_text())


class Operator:
    def __init__(self, cp: ControlPlane, name: str):
        self.name, self.port = name, free_port()
        fd, path = tempfile.mkstemp(prefix=f"operator-{name}-", suffix=".log")
        self.log_path = Path(path)
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                [*CAFFESERVE, "operator", "-n", NS, "--leader-elect", "--kubeconfig", str(cp.kubeconfig),
                 "--liveness", f"http://127.0.0.1:{self.port}/healthz", "--log-format", "plain"],
                cwd=REPO, env={**os.environ, "POD_NAME": name, "POD_NAMESPACE": NS}, stdout=log,
                stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc, 15)


def holder(cp: ControlPlane) -> str | None:
    lease = cp.get_object(LEASES, NS, LEASE)
    return ((lease or {}).get("spec") or {}).get("holderIdentity")


def apply_model(cp: ControlPlane, name: str) -> None:
    cms = copy.deepcopy(DIGITS)
    cms["metadata"] = {"name": name, "namespace": NS}
    cp.apply(cms)


def reconciled(cp: ControlPlane, name: str) -> bool:
    return (cp.get_object(DEPLOYMENTS, NS, f"{name}-predictor") is not None
            and cp.get_object(CONFIGMAPS, NS, f"{name}-config") is not None)


def writers(cp: ControlPlane, name: str) -> set[str]:
    """Who wrote the model's Deployment (managedFields managers with their operation)."""
    dep = cp.get_object(DEPLOYMENTS, NS, f"{name}-predictor") or {}
    return {f.get("manager", "") for f in dep["metadata"].get("managedFields") or []}


@pytest.fixture(scope="module")
def cluster():
    with ControlPlane() as cp:
        cp.kubectl("apply", "-f", str(REPO / "crds/caffemodelservices.yaml"))
        cp.create_namespace(NS)
        yield cp


def test_one_leader_reconciles_and_a_killed_leader_is_replaced_within_the_lease(cluster):
    cp = cluster
    a = Operator(cp, "op-a")
    time.sleep(1)  # a first, so that the first leader is known
    b = Operator(cp, "op-b")
    try:
        cp.wait_for(lambda: holder(cp) in ("op-a", "op-b"), timeout=60, what="a leader")
        leader, other = (a, b) if holder(cp) == "op-a" else (b, a)
        apply_model(cp, "first")
        cp.wait_for(lambda: reconciled(cp, "first"), timeout=60, what="first reconciled")
        cp.wait_for(other.alive, timeout=30, what="the waiting operator answers liveness")
        assert holder(cp) == leader.name
        assert "first" not in other.log(), other.log()  # the candidate never handled the model

        leader.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        apply_model(cp, "second")  # changed while nobody leads
        cp.wait_for(lambda: holder(cp) == other.name, timeout=LEASE_DURATION_S + 3 * RETRY_PERIOD_S + 10,
                    interval=0.1, what="the candidate takes the Lease")
        took = time.monotonic() - killed
        cp.wait_for(lambda: reconciled(cp, "second"), timeout=60, interval=0.1, what="second reconciled")
        reconciled_after = time.monotonic() - killed
        print(f"\nhand-over after SIGKILL: Lease taken {took:.1f} s, the change reconciled {reconciled_after:.1f} s")
        assert took <= LEASE_DURATION_S + 2 * RETRY_PERIOD_S + 2
        assert writers(cp, "first") == writers(cp, "second")  # the same field manager: no second writer

        # a clean stop (a rollout, a drain): the Lease is released and taken within a retry period
        c = Operator(cp, "op-c")
        cp.wait_for(c.alive, timeout=30, what="op-c waits, alive")
        other.proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        cp.wait_for(lambda: holder(cp) == "op-c", timeout=LEASE_DURATION_S + 10, interval=0.1,
                    what="op-c takes the released Lease")
        took = time.monotonic() - stopped
        assert other.proc.wait(30) == 0
        print(f"hand-over after SIGTERM: Lease taken {took:.1f} s")
        assert took < LEASE_DURATION_S - RETRY_PERIOD_S  # released, not left to expire
        apply_model(cp, "third")
        cp.wait_for(lambda: reconciled(cp, "third"), timeout=60, what="third reconciled")
        c.stop()
    finally:
        for op in (a, b):
            op.stop()
    assert cp.get_object(CMS, NS, "first") is not None

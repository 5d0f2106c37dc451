"""The chart's secured gateways on a real control plane: two gateways with TLS (a kubernetes.io/tls
Secret) and TokenReview, behind their Service's EndpointSlices, in front of the digits model.

- A client without a token gets 401 / UNAUTHENTICATED; with a ServiceAccount token it gets answers,
  over REST and gRPC, through TLS (the issue's "done when").
- Load spread over the Service's ready endpoints, as kube-proxy spreads it (this harness has no
  kube-proxy: the client reads the EndpointSlices itself, every 0.2 s): both gateways serve, and
  deleting one (the kubelet's SIGTERM: readiness false at once, serving through its 5 s
  `--drain-delay`, then exit) loses no request. A gateway killed outright (SIGKILL) loses the requests sent to it
  until its readiness probe fails; each succeeds when retried once on the other gateway.
Prints the figures docs/kubernetes.md quotes.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import ssl
import threading
import time
from collections import Counter
from typing import Any

import grpc
import numpy as np
import pytest

from caffe_testing.chart import helm_install
from caffe_testing.cluster import CMS, REPO
from caffe_testing.controlplane import ControlPlane
from caffe_testing.digits import DIGITS_DIR, digits_data
from caffe_testing.gateway import IMAGES, LABELS, infer_payload, predicted
from caffe_testing.grpc import OIPClient, infer_request
from caffe_testing.nodeagent import TEST_NODES, NodeAgent
from caffe_testing.pki import CA

pytestmark = pytest.mark.timeout(300)
RELEASE, NAMESPACE, MODEL_NS = "cs", "caffe-system", "ml"
PREFIX = f"{RELEASE}-caffe-serving"
SERVICE_NAME = f"{PREFIX}-gateway.{NAMESPACE}.svc"  # the name in the gateway's certificate
ENDPOINTSLICES = "discovery.k8s.io/v1/endpointslices"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
VALUES = {"gateway": {"tls": {"secretName": "gateway-tls"},
                      "auth": {"mode": "tokenreview", "groups": [f"system:serviceaccounts:{MODEL_NS}"]}}}
BODY = json.dumps(infer_payload(3)).encode()


class Cluster:
    cp: ControlPlane
    agent: NodeAgent
    ca: CA
    token: str

    def ready_gateways(self) -> list[str]:
        """The ready addresses of the gateway Service's EndpointSlices (what kube-proxy routes to)."""
        slices = self.cp.list_objects(ENDPOINTSLICES, NAMESPACE,
                                      labelSelector=f"kubernetes.io/service-name={PREFIX}-gateway")
        return sorted(a for s in slices for ep in s.get("endpoints") or []
                      if (ep.get("conditions") or {}).get("ready") for a in ep.get("addresses") or [])

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert_path))
        ctx.check_hostname = False  # by pod address; the chain is still verified against the CA
        return ctx

    def infer(self, ip: str, token: str | None, timeout: float = 30) -> tuple[int, Any]:
        conn = http.client.HTTPSConnection(ip, 8080, context=self.context(), timeout=timeout)
        try:
            headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
            conn.request("POST", "/v2/models/digits/infer", BODY, headers)
            r = conn.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            conn.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster()
    model_dir = tmp_path_factory.mktemp("digits-model")
    for f in DIGITS_DIR.iterdir():
        if f.is_file():
            shutil.copy(f, model_dir / f.name)
    with ControlPlane() as cp, NodeAgent(cp, TEST_NODES, pvcs={"digits-model": model_dir}) as agent:
        c.cp, c.agent = cp, agent
        for ns in (NAMESPACE, MODEL_NS):
            cp.create_namespace(ns, RESTRICTED)
        c.ca = CA(tmp_path_factory.mktemp("gateway-ca"))
        crt, key = c.ca.issue("gateway", SERVICE_NAME, server=True, hosts=(SERVICE_NAME,))
        cp.kubectl("create", "secret", "tls", "gateway-tls", f"--cert={crt}", f"--key={key}", "-n", NAMESPACE)
        cp.apply({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "digits-model"},
                  "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                           "storageClassName": "local-models", "hostPath": {"path": str(model_dir)},
                           "claimRef": {"namespace": MODEL_NS, "name": "digits-model"}}})
        cp.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                  "metadata": {"name": "digits-model", "namespace": MODEL_NS},
                  "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "local-models",
                           "volumeName": "digits-model", "resources": {"requests": {"storage": "1Gi"}}}})
        helm_install(cp, RELEASE, NAMESPACE, VALUES, real=True, wait=True)
        cp.kubectl("apply", "-n", MODEL_NS, "-f", str(REPO / "examples/digits/service.yaml"))
        cp.kubectl("create", "serviceaccount", "client", "-n", MODEL_NS)
        c.token = cp.kubectl("create", "token", "client", "-n", MODEL_NS).stdout.strip()
        cp.wait_for(lambda: (cp.get_object(CMS, MODEL_NS, "digits") or {}).get("status", {}).get("readyReplicas"),
                    timeout=180, what="digits ready")
        cp.wait_for(lambda: len(c.ready_gateways()) == 2, timeout=60, what="two ready gateways")
        cp.wait_for(lambda: all(c.infer(ip, c.token)[0] == 200 for ip in c.ready_gateways()), timeout=60,
                    what="both gateways route digits")
        yield c


def test_no_token_401_a_service_account_token_answers_over_rest_and_grpc_through_tls(cluster):
    c = cluster
    for ip in c.ready_gateways():
        status, body = c.infer(ip, None)
        assert status == 401 and "Authorization: Bearer" in body["error"]
        status, body = c.infer(ip, c.token)
        assert status == 200 and predicted(body) == LABELS[3]
        client = OIPClient(8081, host=ip, root_certificates=c.ca.cert_path.read_bytes(), target_name=SERVICE_NAME)
        try:
            request = infer_request("digits", {"data": digits_data.to_blob(IMAGES[:2]).astype(np.float32)})
            e = client.error("ModelInfer", request)
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = client.infer(request, metadata=(("authorization", f"Bearer {c.token}"),))
            probs = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, -1)
            assert list(probs.argmax(1)) == list(LABELS[:2])
        finally:
            client.close()


class Load:
    """Requests one after another over the Service's ready endpoints (round robin, refreshed every 0.2 s)."""

    def __init__(self, c: Cluster, threads: int = 2, retry: bool = False):
        self.c, self.retry = c, retry
        self.endpoints = c.ready_gateways()
        self.outcomes: list[tuple[str, int, float]] = []  # (gateway, status (0: no answer), time)
        self.retried: list[tuple[str, int]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._watch, daemon=True)]
        self.threads += [threading.Thread(target=self._send, args=(i,), daemon=True) for i in range(threads)]

    def _watch(self) -> None:
        while not self.stop.is_set():
            try:
                self.endpoints = self.c.ready_gateways()
            except Exception:  # the API server busy: keep the last list, as kube-proxy does
                pass
            time.sleep(0.2)

    def _send(self, n: int) -> None:
        i = n
        while not self.stop.is_set():
            eps = self.endpoints
            if not eps:
                time.sleep(0.05)
                continue
            ip = eps[i % len(eps)]
            i += 1
            status = self._one(ip)
            self.outcomes.append((ip, status, time.monotonic()))
            if status == 0 and self.retry and (others := [e for e in self.endpoints if e != ip]):
                self.retried.append((others[0], self._one(others[0])))

    def _one(self, ip: str) -> int:
        try:
            return self.c.infer(ip, self.c.token, timeout=10)[0]
        except OSError:
            return 0

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_two_gateways_share_the_load_and_a_deleted_one_loses_no_request(cluster):
    c = cluster
    before = c.ready_gateways()
    victim = next(w for w in c.agent.running(NAMESPACE, f"{PREFIX}-gateway-") if w.ip == before[0])
    with Load(c) as load:
        time.sleep(3)
        served_before = Counter(ip for ip, _, _ in load.outcomes)
        deleted = time.monotonic()
        c.cp.kubectl("delete", "pod", victim.name, "-n", NAMESPACE, "--wait=false")
        c.cp.wait_for(lambda: victim.ip not in load.endpoints, timeout=30, interval=0.05, what="victim unrouted")
        unrouted = time.monotonic() - deleted
        assert victim.gone.wait(60), "the deleted gateway did not exit"  # drained: 5 s, then its grace
        exited = time.monotonic() - deleted
        time.sleep(2)
    failed = [o for o in load.outcomes if o[1] != 200]
    print(f"\ngateway deleted under load: {len(load.outcomes)} requests, {len(failed)} failed; "
          f"out of the endpoints {unrouted:.1f} s, exited {exited:.1f} s; "
          f"served before by each: {dict(served_before)}")
    assert len(served_before) == 2 and min(served_before.values()) >= 3  # both shared the load
    assert len(load.outcomes) > 20 and not failed, failed[:5]


def test_a_gateway_killed_outright_loses_only_what_one_retry_recovers(cluster):
    c = cluster
    ips = c.ready_gateways()
    victim = next(w for w in c.agent.running(NAMESPACE, f"{PREFIX}-gateway-") if w.ip == ips[0])
    with Load(c, retry=True) as load:
        time.sleep(2)
        killed = time.monotonic()
        victim.container().proc.send_signal(signal.SIGKILL)
        c.cp.wait_for(lambda: victim.ip not in load.endpoints, timeout=30, interval=0.05, what="victim unrouted")
        unrouted = time.monotonic() - killed
        time.sleep(2)
    lost = [o for o in load.outcomes if o[1] != 200 and o[2] >= killed]
    print(f"\ngateway SIGKILLed under load: {len(load.outcomes)} requests, {len(lost)} without an answer, all "
          f"to it within {unrouted:.1f} s (until its readiness probe failed); retried once: "
          f"{Counter(s for _, s in load.retried)}")
    assert all(ip == victim.ip for ip, _, _ in lost)
    assert all(s == 200 for _, s in load.retried) and len(load.retried) == len(lost)

"""The operator's own calls to model and pool pods that serve over TLS (the chart's podTLS): health and model
metadata (pods.py, for the load errors and status.backend) and the pool's repository calls (repository.py), over
https, each pod's certificate checked against the Secret's ca.crt and the one name every pod's carries. A real
repository server with `--tls-dir` on loopback, certificates this test makes."""

from __future__ import annotations

import asyncio

import pytest

from caffe_http.tls import POD_SERVER_NAME
from caffe_operator.load_errors import LoadErrorProbe
from caffe_operator.pods import Pods, PodTLS, Target
from caffe_operator.repository import RepositoryClient
from caffe_testing.gateway import digits_config
from caffe_testing.pki import CA, write_secret_volume
from caffe_testing.repository import write_model
from caffe_testing.servers import ServerProcess


@pytest.fixture(scope="module")
def tls_pod(tmp_path_factory):
    root = tmp_path_factory.mktemp("pod-tls")
    ca = CA(root / "ca")
    crt, key = ca.issue(POD_SERVER_NAME, POD_SERVER_NAME, server=True, hosts=[POD_SERVER_NAME])
    write_secret_volume(root / "secret", {"tls.crt": crt.read_bytes(), "tls.key": key.read_bytes(),
                                          "ca.crt": ca.cert_path.read_bytes()})
    write_model(root / "repository", "digits", digits_config())
    args = ["--model-control-mode", "explicit", "--load-model", "digits", "--tls-dir", str(root / "secret")]
    with ServerProcess(None, repository=root / "repository", args=args, tls_ca=ca.cert_path,
                       tls_name=POD_SERVER_NAME) as server:
        yield server, ca, root


def test_the_operator_reads_a_tls_pods_repository_health_and_metadata(tls_pod):
    server, ca, _ = tls_pod
    base = f"http://127.0.0.1:{server.port}"  # as the operator finds a pod: its address, from the API

    async def ask():
        repo, pods = RepositoryClient(PodTLS(str(ca.cert_path))), Pods(None, tls=PodTLS(str(ca.cert_path)))
        try:
            return (await repo.index(base), await repo.memory(base, "digits", gpu=False),
                    await pods.get(f"{base}/v2/health/ready"))
        finally:
            await repo.close()
            await pods.close()

    index, memory, (status, body) = asyncio.run(ask())
    assert index is not None and [(e.name, e.state) for e in index] == [("digits", "READY")]
    assert memory is not None and memory > 0
    assert status == 200 and b'"ready":true' in body.replace(b" ", b"")


def test_a_pod_the_operator_cannot_trust_is_unreachable_with_why(tls_pod):
    server, ca, root = tls_pod
    base = f"http://127.0.0.1:{server.port}"
    other = CA(root / "other")

    async def ask():
        untrusted = RepositoryClient(PodTLS(str(other.cert_path)))
        misnamed = RepositoryClient(PodTLS(str(ca.cert_path), "someone-else"))
        plain = RepositoryClient()
        probe = LoadErrorProbe(pods=Pods(None, tls=PodTLS(str(other.cert_path))))
        try:
            health = await probe._probe(probe.pods.session(), Target("pod p", f"{base}/v2/health/ready"))
            return (await untrusted.index(base), await misnamed.index(base), await plain.index(base), health)
        finally:
            for c in (untrusted, misnamed, plain):
                await c.close()
            await probe.close()

    untrusted, misnamed, plain, health = asyncio.run(ask())
    assert untrusted is None and misnamed is None and plain is None  # no answer taken from an unchecked pod
    assert health.state == "unreachable" and "certificate verify failed" in health.message, health

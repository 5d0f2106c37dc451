"""The operator tests' fixtures: one emulated cluster with the CRD and one `caffeserve operator`
per test module (watching every namespace), and a namespace per test.

A module that wants the operator to look again sooner than its defaults (10 s follow-ups, 300 s
resync) overrides `operator_env`.
"""

from __future__ import annotations

import re

import pytest

from caffe_testing.cluster import OperatorProcess, cluster_with_crd


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    return {}


@pytest.fixture(scope="module")
def cluster():
    with cluster_with_crd() as c:
        yield c


@pytest.fixture(scope="module")
def operator(cluster, operator_env):
    op = OperatorProcess(cluster, all_namespaces=True, env=operator_env).start()
    yield op
    op.stop()
    assert "Traceback" not in op.logs(), op.logs()[-5000:]


@pytest.fixture()
def ns(request, operator) -> str:
    """A namespace of the test's own (the operator watches them all)."""
    return re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_"))[:40].strip("-")

"""The gateway tests' fixtures: two digits servers, and a gateway in front of them (one each per module)."""

from __future__ import annotations

import pytest

from caffe_testing.digits import DIGITS_DIR
from caffe_testing.gateway import GatewayProcess, static
from caffe_testing.servers import ServerProcess


@pytest.fixture(scope="module")
def servers():
    with ServerProcess(DIGITS_DIR / "server.yaml") as a, ServerProcess(DIGITS_DIR / "server.yaml") as b:
        yield a, b


@pytest.fixture(scope="module")
def gateway(servers):
    with GatewayProcess("--static", static("digits", *servers)) as g:
        yield g

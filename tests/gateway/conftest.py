"""The gateway tests' fixtures: two digits servers (REST only, or REST and gRPC), and a gateway in
front of them (one each per module)."""

from __future__ import annotations

import pytest

from caffe_testing.digits import DIGITS_DIR
from caffe_testing.gateway import GatewayProcess, digits_config, static
from caffe_testing.grpc import grpc_server
from caffe_testing.servers import ServerProcess


@pytest.fixture(scope="module")
def servers():
    with ServerProcess(DIGITS_DIR / "server.yaml") as a, ServerProcess(DIGITS_DIR / "server.yaml") as b:
        yield a, b


@pytest.fixture(scope="module")
def gateway(servers):
    with GatewayProcess("--static", static("digits", *servers)) as g:
        yield g


@pytest.fixture(scope="module")
def grpc_servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpc-gateway")
    with grpc_server(digits_config(), tmp) as a, grpc_server(digits_config(), tmp) as b:
        yield a, b

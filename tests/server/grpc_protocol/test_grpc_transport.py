"""The gRPC transport of our own (inference_server/grpc/transport.py) with real grpc clients: what
grpc.aio gave for free must still hold. A compressed request gets the uncompressed one's answer; an
answer larger than the client's flow-control window arrives whole; many calls at once on one
connection each get their own answer; a client that is not HTTP/2 is closed and the server serves on;
and CAFFESERVE_GRPC_TRANSPORT=grpcio serves the same answers on grpc.aio."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import caffe
import grpc
import numpy as np
import pytest
from caffe import layers as L

from caffe_testing.grpc import OIPClient, grpc_server, infer_request, output
from caffe_testing.nets import forward, save_net
from inference_server.grpc import messages as pb

WIDE = 40000  # output floats: 160 kB, over the 64 KiB window a client has without BDP probing


@pytest.fixture(scope="module")
def net_files(tmp_model_dir):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4]))
    n.ip = L.InnerProduct(n.data, num_output=WIDE, weight_filler=dict(type="gaussian", std=0.1))
    return save_net(n, tmp_model_dir, "wide")


@pytest.fixture(scope="module", params=["h2", "grpcio"])
def server(request, net_files, tmp_model_dir):
    proto, weights = net_files
    cfg = {"name": "wide", "model": {"prototxt": str(proto), "weights": str(weights)}, "backend": "pycaffe"}
    with grpc_server(cfg, tmp_model_dir, env={"CAFFESERVE_GRPC_TRANSPORT": request.param}) as s:
        yield s


def x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (1, 4)).astype(np.float32)


def expected(net_files, a: np.ndarray) -> np.ndarray:
    return forward(*net_files, {"data": a})["ip"]


def test_an_answer_over_the_clients_window_arrives_whole(server, net_files):
    client = OIPClient(server.grpc_port)
    small = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=[
        ("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 1 << 24)])
    stub = small.unary_unary(f"/{pb.SERVICE}/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                             response_deserializer=pb.ModelInferResponse.FromString)
    for i in range(3):
        got = output(stub(infer_request("wide", {"data": x(i)}), timeout=30), "ip")
        assert got.shape == (1, WIDE)
        assert np.abs(got - expected(net_files, x(i))).max() <= 1e-5
    small.close()
    client.close()


def test_a_gzip_request_gets_the_same_answer(server, net_files):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", compression=grpc.Compression.Gzip,
                                    options=[("grpc.max_receive_message_length", 1 << 24)])
    stub = channel.unary_unary(f"/{pb.SERVICE}/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                               response_deserializer=pb.ModelInferResponse.FromString)
    got = output(stub(infer_request("wide", {"data": x(7)}), timeout=30), "ip")
    assert np.abs(got - expected(net_files, x(7))).max() <= 1e-5
    channel.close()


def test_many_calls_at_once_on_one_connection_each_get_their_own_answer(server, net_files):
    client = OIPClient(server.grpc_port)  # one channel: one HTTP/2 connection, the calls are its streams
    futures = [client.stubs["ModelInfer"].future(infer_request("wide", {"data": x(i)}), timeout=30) for i in range(16)]
    for i, f in enumerate(futures):
        assert np.abs(output(f.result(), "ip") - expected(net_files, x(i))).max() <= 1e-5
    with ThreadPoolExecutor(4) as pool:  # and from several threads at once
        answers = list(pool.map(lambda i: output(client.infer(infer_request("wide", {"data": x(i)})), "ip"),
                                range(8)))
    for i, got in enumerate(answers):
        assert np.abs(got - expected(net_files, x(i))).max() <= 1e-5
    client.close()


def test_an_http1_client_is_closed_and_the_server_serves_on(server, net_files):
    with socket.create_connection(("127.0.0.1", server.grpc_port), timeout=10) as s:
        s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            while s.recv(4096):  # grpc.aio answers with its SETTINGS then closes; ours closes at once
                pass
        except ConnectionResetError:
            pass
    client = OIPClient(server.grpc_port)
    assert client.call("ServerReady", pb.ServerReadyRequest()).ready
    assert output(client.infer(infer_request("wide", {"data": x(1)})), "ip").shape == (1, WIDE)
    client.close()

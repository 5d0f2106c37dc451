"""The gateway's upstream pool when a connection does not come: the request's deadline and the connect timeout,
each said for what it is, also for a request started eagerly (the gateway's HTTP server starts them in its parser
callback, where `asyncio.timeout` cannot run).

A server that never completes a handshake is real here: a listening socket with a backlog of 0 that never
accepts takes one connection, and the kernel leaves later handshakes unanswered."""

from __future__ import annotations

import asyncio
import socket

import pytest

from caffe_http.eager import start_eagerly
from caffe_http.upstream import ConnectFailed, EndpointPool, UpstreamTimeout


@pytest.fixture
def unanswering_port():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))  # takes the backlog's one place
    yield port
    filler.close()
    listener.close()


def _request_eagerly(pool: EndpointPool, deadline_in: float):
    """pool.request started from a loop callback, as the gateway starts it; (exception, seconds taken)."""

    async def request() -> None:
        loop = asyncio.get_running_loop()
        await pool.request("POST", "/v2/models/m/infer", [], b"{}", loop.time() + deadline_in)

    async def run():
        loop = asyncio.get_running_loop()
        started: asyncio.Future = loop.create_future()
        t0 = loop.time()
        loop.call_soon(lambda: started.set_result(start_eagerly(loop, request())))
        task = await started
        assert task is not None  # it waits for the connection
        with pytest.raises((UpstreamTimeout, ConnectFailed)) as caught:
            await task
        return caught.value, loop.time() - t0

    return asyncio.run(run())


def test_a_deadline_that_passes_while_connecting_says_the_request_was_not_sent(unanswering_port):
    pool = EndpointPool("127.0.0.1", unanswering_port, connect_timeout_s=5)
    error, took = _request_eagerly(pool, 0.2)
    assert isinstance(error, UpstreamTimeout) and not error.sent, error
    assert "deadline passed while connecting to 127.0.0.1" in str(error)
    assert 0.15 < took < 2


def test_a_connect_timeout_before_the_deadline_is_a_connect_failure_another_endpoint_may_take(unanswering_port):
    pool = EndpointPool("127.0.0.1", unanswering_port, connect_timeout_s=0.2)
    error, took = _request_eagerly(pool, 5)
    assert isinstance(error, ConnectFailed), error
    assert str(error) == f"connect to 127.0.0.1:{unanswering_port} timed out after 0.2 s"
    assert 0.15 < took < 2

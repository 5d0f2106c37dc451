"""`eager.within`: a deadline on an await that also holds where a request starts eagerly (no current task yet),
where `asyncio.timeout_at` raises RuntimeError. The gateway's connect to a model server and its wait for a free
endpoint rely on it since its HTTP server starts requests in the parser's callback."""

from __future__ import annotations

import asyncio

import pytest

from caffe_http.eager import start_eagerly, within


async def _answer_after(seconds: float, ended: list[str]) -> str:
    try:
        await asyncio.sleep(seconds)
        return "answer"
    finally:
        ended.append("inner ended")


def test_an_await_that_finishes_in_time_gives_its_result():
    async def run():
        loop = asyncio.get_running_loop()
        return await within(loop, _answer_after(0.01, []), loop.time() + 5)

    assert asyncio.run(run()) == "answer"


def test_an_await_past_its_time_is_cancelled_and_raises_timeout():
    ended: list[str] = []

    async def run():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await within(loop, _answer_after(5, ended), t0 + 0.05)
        return loop.time() - t0

    took = asyncio.run(run())
    assert took < 1 and ended == ["inner ended"]


def test_cancelling_the_caller_is_a_cancellation_not_a_timeout():
    ended: list[str] = []

    async def run():
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(within(loop, _answer_after(5, ended), loop.time() + 0.2))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0.3)  # past the deadline: nothing fires late
        return waiting

    waiting = asyncio.run(run())
    assert waiting.cancelled() and ended == ["inner ended"]


@pytest.mark.parametrize("seconds, expect", [(0.01, "answer"), (5, "timeout")])
def test_it_holds_in_a_coroutine_started_eagerly_where_asyncio_timeout_cannot(seconds, expect):
    async def request(timeout_at) -> str:
        try:
            async with timeout_at:
                return await _answer_after(seconds, [])
        except TimeoutError:
            return "timeout"

    async def with_within() -> str:
        loop = asyncio.get_running_loop()
        try:
            return await within(loop, _answer_after(seconds, []), loop.time() + 0.1)
        except TimeoutError:
            return "timeout"

    def from_a_callback(coro, started: asyncio.Future) -> None:
        """What the HTTP server's parser callback does: no task is current here."""
        try:
            started.set_result(start_eagerly(asyncio.get_running_loop(), coro))
        except RuntimeError as e:
            started.set_exception(e)

    async def run():
        loop = asyncio.get_running_loop()
        refused, started = loop.create_future(), loop.create_future()
        loop.call_soon(from_a_callback, request(asyncio.timeout_at(loop.time() + 0.1)), refused)
        with pytest.raises(RuntimeError):  # what the gateway's path would hit with asyncio.timeout_at
            await refused
        loop.call_soon(from_a_callback, with_within(), started)
        task = await started
        assert task is not None  # it waited: a task took the rest over
        return await task

    assert asyncio.run(run()) == expect


def test_a_shielded_shared_future_outlives_one_waiter_that_timed_out():
    """The gateway's gRPC connect: callers share one connecting future, each bounded by its own time."""

    async def run():
        loop = asyncio.get_running_loop()
        shared = loop.create_future()
        with pytest.raises(TimeoutError):
            await within(loop, asyncio.shield(shared), loop.time() + 0.05)
        later = asyncio.ensure_future(within(loop, asyncio.shield(shared), loop.time() + 5))
        await asyncio.sleep(0)
        shared.set_result("connection")
        return shared.cancelled(), await later

    assert asyncio.run(run()) == (False, "connection")

"""Start a coroutine in the caller, up to its first real wait: Python 3.12's eager tasks, by hand.

A request that a handler answers without waiting (a short forward pass run inline) then costs no task (its
creation, its registration in asyncio's weak set of tasks) and no loop turn. Where the coroutine waits, a
task takes the rest over, in the same context and cancellable as a task started the usual way.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def start_eagerly(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run `coro` here up to its first wait, in a copy of the current context; None when it finished, else the
    task that runs the rest. An exception it raises before waiting is raised here (`coro` is then closed)."""
    ctx = contextvars.copy_context()
    try:
        waits_on = ctx.run(coro.send, None)
    except StopIteration:
        return None
    return loop.create_task(_Resume(coro, waits_on), context=ctx)


async def within(loop: asyncio.AbstractEventLoop, awaitable: Awaitable[T], when: float) -> T:
    """`await awaitable` by loop time `when`, else TimeoutError: `asyncio.timeout_at` (or `asyncio.wait_for`, which
    uses it from Python 3.12) for code that may run eagerly, where they find no current task. A coroutine runs as a
    task of its own, cancelled by a timer; a future is cancelled by it (shield one that others share)."""
    task = asyncio.ensure_future(awaitable, loop=loop)
    expired: list[bool] = []
    timer = loop.call_at(when, _expire, task, expired)
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if expired and (current is None or not current.cancelling()):
            raise TimeoutError from None
        raise
    finally:
        timer.cancel()


def _expire(task: asyncio.Future[Any], expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()


class _Resume(collections.abc.Coroutine[Any, Any, None]):
    """The rest of a coroutine already run up to a wait on `waits_on` (what it yielded), for a task to drive:
    the task's first step gets `waits_on` to wait on, each later step resumes the coroutine. A cancellation
    is thrown into the coroutine even before the task's first step (a generator not yet started would
    raise it without running, and the coroutine's `finally` would wait for the garbage collector), and
    cancels `waits_on` as a task cancels what it waits on."""

    __slots__ = ("coro", "waits_on")

    def __init__(self, coro: Coroutine[Any, Any, None], waits_on: Any):
        self.coro: Coroutine[Any, Any, None] = coro
        self.waits_on: Any = waits_on

    def send(self, value: Any) -> Any:
        first, self.waits_on = self.waits_on, _RESUMED
        if first is not _RESUMED:
            return first
        return self.coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        first, self.waits_on = self.waits_on, _RESUMED
        if first is not _RESUMED and isinstance(first, asyncio.Future):
            first.cancel()
        return self.coro.throw(typ if val is None else val)

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Generator[Any, Any, None]:
        raise TypeError("_Resume is driven by a task, not awaited")


_RESUMED = object()

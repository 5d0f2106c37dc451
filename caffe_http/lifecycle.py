"""How every program here runs: on uvloop, until SIGTERM or SIGINT sets its stop event."""

from __future__ import annotations

import asyncio
import signal


def install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio's loop also works
        pass


def stop_event() -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets (on the running loop): the way to ask a program to stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop

"""Graceful stops: one event that SIGINT or SIGTERM sets.

Install it *before* a process announces that it is ready (a banner, a log line, a
readiness probe). A supervisor or a test that sends SIGTERM the moment it sees the
announcement must get a graceful stop, not the default action that kills the
process with exit code -15.
"""

from __future__ import annotations

import asyncio
import signal


def stop_on_signals() -> asyncio.Event:
    """An event that the next SIGINT or SIGTERM sets, for the running event loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop

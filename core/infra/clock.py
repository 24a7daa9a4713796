"""Whose clock: decisions that several hosts share use Redis server time.

Heartbeats and dead-worker detection (:mod:`core.infra.heartbeat`, :mod:`workers.reaper`)
compare times written by different hosts, so they read Redis ``TIME`` (inside their
Lua scripts, or with :func:`redis_now`), never the local clock: a host whose clock is
off cannot make a live worker look dead, nor a dead one look alive.

``SLUICE_TEST_CLOCK_OFFSET_S`` (tests only) shifts this process's ``time.time`` with
:func:`skew_local_clock`, to run a worker as if its host clock were wrong.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

_real_time = time.time


async def redis_now(redis: Any) -> float:
    """Redis server time, in seconds since the epoch."""
    seconds, micros = await redis.time()
    return float(seconds) + float(micros) / 1_000_000


def skew_local_clock(offset_s: float) -> None:
    """Make ``time.time`` run ``offset_s`` seconds off in this process (tests only;
    0 restores the real clock)."""
    if not offset_s:
        time.time = _real_time
        return
    logger.warning("SLUICE_TEST_CLOCK_OFFSET_S: this process's clock is %+.1fs off", offset_s)

    def skewed() -> float:
        return _real_time() + offset_s

    time.time = skewed

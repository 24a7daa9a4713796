"""Waking idle workers: a short list per arq queue that enqueuers push to.

An idle worker blocks on its queue's wake list (``BLPOP``, see :mod:`workers.poll`)
instead of polling arq every ``SLUICE_WORKER_POLL_DELAY_S``. Whoever makes a job due
pushes one token: the adapter that enqueues a reply, the door's notices, the release
of a conversation that puts a parked job back in its place. A push wakes one blocked
worker, which polls at once. The list is trimmed to :data:`WAKE_MAX` tokens, so
pushes while every worker is busy leave at most that many spare polls behind.

Nothing depends on a push arriving: a blocked worker polls anyway after
``SLUICE_WORKER_IDLE_BLOCK_S`` (or when the next deferred job falls due, if
sooner), so a lost push (an enqueuer that died between its enqueue and its push, a
job handed back by the reaper) costs at most that much latency, never a job.
"""

from __future__ import annotations

from typing import Any

WAKE_MAX = 1

# A Lua function for scripts that make a job due: ``wake_workers(queue)``.
WAKE_WORKERS_LUA = f"""
local function wake_workers(queue)
  local key = queue .. ':wake'
  redis.call('LPUSH', key, '1')
  redis.call('LTRIM', key, 0, {WAKE_MAX - 1})
end
"""


def wake_key(queue: str) -> str:
    """The wake list of an arq queue (what :data:`WAKE_WORKERS_LUA` pushes to)."""
    return f"{queue}:wake"


def push_wake(pipe: Any, queue: str) -> None:
    """Queue the push of one wake token for ``queue`` on a redis pipeline (two
    commands, no round trip of their own)."""
    key = wake_key(queue)
    pipe.lpush(key, b"1")
    pipe.ltrim(key, 0, WAKE_MAX - 1)


async def wake_workers(redis: Any, queue: str) -> None:
    """Wake one idle worker of ``queue`` (one round trip)."""
    async with redis.pipeline(transaction=False) as pipe:
        push_wake(pipe, queue)
        await pipe.execute()

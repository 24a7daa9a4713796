"""A killed worker's jobs go back to the queue as soon as its heartbeat stops.

arq marks a running job "in progress" for the longest job timeout + 10 s, so without
this a SIGKILLed (or OOM-killed, or unplugged) worker's messages wait that long
(``SLUICE_JOB_TIMEOUT_S`` + 10 s, over three minutes by default) before another
worker answers them. Every worker records the jobs it runs in a set of its own,
``Keys.worker_jobs(member)`` (``member`` is its heartbeat name, see
:mod:`core.heartbeat`), and looks, at each heartbeat, for workers silent for
``SLUICE_WORKER_DEAD_AFTER_S``: one Lua call takes such a worker's set, deletes the
in-progress markers of its jobs (arq starts them again at the next poll, in their
place in the queue) and its heartbeat, so only one live worker hands them back.

A re-run job takes over the conversation's lock (the lock holds the message's job id,
not the worker) and the responders' delivery state, so it completes the message the
dead worker had started instead of posting a second one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.redis import Keys
from core.scripts import Lua

logger = logging.getLogger(__name__)

# How long a worker's job set outlives its last change (a dead worker's set is taken
# long before: this only bounds leftovers).
JOBS_TTL_S = 7 * 86400

# KEYS: heartbeats, the silent worker's job set. ARGV: member, beat older than (s),
# in-progress key prefix. Returns the job ids handed back (none if it beat again).
_REAP = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) >= tonumber(ARGV[2]) then return {} end
local jobs = redis.call('SMEMBERS', KEYS[2])
for _, id in ipairs(jobs) do
  redis.call('DEL', ARGV[3] .. id)
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return jobs
"""


async def track_started(redis: Redis, keys: Keys, member: str, job_ids: list[str]) -> None:
    """Note that ``member`` runs ``job_ids`` (arq ids)."""
    if not job_ids:
        return
    key = keys.worker_jobs(member)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.sadd(key, *job_ids)
        pipe.expire(key, JOBS_TTL_S)
        await pipe.execute()


async def track_finished(redis: Redis, keys: Keys, member: str, job_id: str) -> None:
    """``member`` no longer runs ``job_id`` (done, failed, retried later or handed back)."""
    await redis.srem(keys.worker_jobs(member), job_id)  # type: ignore[misc]


async def reap(redis: Redis, keys: Keys, dead_after_s: float) -> dict[str, list[str]]:
    """Hand the jobs of every worker silent for ``dead_after_s`` back to the queue;
    returns them per worker."""
    cutoff = time.time() - dead_after_s
    silent = await redis.zrangebyscore(keys.heartbeats(), "-inf", cutoff)
    script = Lua(redis, _REAP)
    out: dict[str, list[str]] = {}
    for raw in silent:
        member = raw.decode() if isinstance(raw, bytes) else str(raw)
        if not member.startswith("worker:"):
            continue
        jobs: list[Any] = await script(
            [keys.heartbeats(), keys.worker_jobs(member)],
            [member, cutoff, in_progress_key_prefix],
        )
        if jobs:
            ids = [j.decode() if isinstance(j, bytes) else str(j) for j in jobs]
            out[member] = ids
            logger.warning(
                "worker %s silent for over %.0fs: handing its %d job(s) back to the queue",
                member,
                dead_after_s,
                len(ids),
            )
    return out


async def reaper_loop(redis: Redis, keys: Keys, dead_after_s: float, interval_s: float) -> None:
    """:func:`reap` every ``interval_s`` until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await reap(redis, keys, dead_after_s)
        except (RedisError, OSError) as e:
            logger.warning("cannot look for silent workers: %s", e)

"""A killed worker's jobs go back to the queue as soon as its heartbeat stops.

arq marks a running job "in progress" for the longest job timeout + 10 s, so without
this a SIGKILLed (or OOM-killed, or unplugged) worker's messages wait that long
(``SLUICE_JOB_TIMEOUT_S`` + 10 s, over three minutes by default) before another
worker answers them. Every worker records the jobs it runs in a set of its own,
``Keys.worker_jobs(member)`` (``member`` is its heartbeat name, see
:mod:`core.infra.heartbeat`), and looks, at each heartbeat, for workers silent for
``SLUICE_WORKER_DEAD_AFTER_S``: one Lua call takes such a worker's set, deletes the
in-progress markers of its jobs (arq starts them again at the next poll, in their
place in the queue) and its heartbeat, so only one live worker hands them back.

A re-run job takes over the conversation's lock (the lock holds the message's job id,
not the worker) and the responders' delivery state, so it completes the message the
dead worker had started instead of posting a second one.

A worker taken for dead may only have been cut off (a network partition): when its
link comes back, its old jobs may still be running. Each started job records its
owner (``Keys.job_owner``, set by the start script of :mod:`workers.poll`); the
hand-back deletes it, and the next worker to start the job writes its own name.
Before the final delivery a job checks (:func:`still_owns`) that it is still the
owner; a superseded job delivers nothing, records no history and leaves arq's job
alone (the new owner finishes it).

Silence is measured in Redis server time (``TIME``, inside the script), as the beats
are (:mod:`core.infra.heartbeat`), so a worker whose clock is off takes no live worker for
dead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.infra.redis import Keys
from core.infra.scripts import Lua

logger = logging.getLogger(__name__)

# How long a worker's job set outlives its last change (a dead worker's set is taken
# long before: this only bounds leftovers).
JOBS_TTL_S = 7 * 86400

# KEYS: heartbeats. ARGV: silent for (s). Workers silent that long, by Redis time.
_SILENT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
"""

# KEYS: heartbeats, the silent worker's job set, the running-job indexes of the queues
# (workers.poll). ARGV: member, silent for (s),
# in-progress key prefix, owner key prefix, 1 = hand back whether silent or not.
# Returns the job ids handed back (none if it beat again meanwhile).
_REAP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if ARGV[5] ~= '1' and (not score or tonumber(score) >= now - tonumber(ARGV[2])) then
  return {}
end
local jobs = redis.call('SMEMBERS', KEYS[2])
for _, id in ipairs(jobs) do
  redis.call('DEL', ARGV[3] .. id)
  for i = 3, #KEYS do redis.call('ZREM', KEYS[i], id) end
  if redis.call('GET', ARGV[4] .. id) == ARGV[1] then
    redis.call('DEL', ARGV[4] .. id)
  end
end
redis.call('DEL', KEYS[2])
if ARGV[5] ~= '1' then redis.call('ZREM', KEYS[1], ARGV[1]) end
return jobs
"""


# KEYS: the worker's job set, the job's owner key, its queue's running-job index.
# ARGV: member, job id.
_FINISHED = """
redis.call('SREM', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""


# KEYS: the worker's job set, the running-job indexes of the queues.
# ARGV: member, in-progress key prefix, owner key prefix, job ids...
# Hands back those of the job ids still in the set; returns them.
_ORPHANS = """
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('SREM', KEYS[1], id) == 1 then
    redis.call('DEL', ARGV[2] .. id)
    for k = 2, #KEYS do redis.call('ZREM', KEYS[k], id) end
    if redis.call('GET', ARGV[3] .. id) == ARGV[1] then redis.call('DEL', ARGV[3] .. id) end
    out[#out + 1] = id
  end
end
return out
"""


class OrphanSweep:
    """Jobs this worker's set in Redis says it runs, but which it does not run.

    That happens when Redis forgets the end of a job: a Sentinel failover promotes a
    replica that had not yet received the job's end (replication is asynchronous), so
    on the new primary the job is still queued, still marked in progress and still in
    this worker's set, while the worker finished it. Nobody would take it for dead (its
    worker beats), and arq would start it again only when its marker expires
    (``SLUICE_JOB_TIMEOUT_S`` + 10 s). Each :meth:`sweep` compares the set with the jobs
    the process runs (``claimed``); an id that is in the set and not running at two
    sweeps in a row (so a job starting or ending between the two reads is never taken)
    is handed back at once, as a dead worker's job would be.
    """

    def __init__(
        self, redis: Redis, keys: Keys, member: str, claimed: set[str], running: Sequence[str]
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._member = member
        self._claimed = claimed
        self._running = list(running)
        self._suspects: set[str] = set()

    async def sweep(self) -> list[str]:
        """One look; returns the job ids handed back."""
        raw = await self._redis.smembers(self._keys.worker_jobs(self._member))  # type: ignore[misc]
        listed = {r.decode() if isinstance(r, bytes) else str(r) for r in raw}
        idle = listed - self._claimed
        confirmed = sorted((idle & self._suspects) - self._claimed)
        self._suspects = idle - set(confirmed)
        if not confirmed:
            return []
        handed: list[Any] = await Lua(self._redis, _ORPHANS)(
            [self._keys.worker_jobs(self._member), *self._running],
            [self._member, in_progress_key_prefix, self._keys.job_owner(""), *confirmed],
        )
        ids = [j.decode() if isinstance(j, bytes) else str(j) for j in handed]
        if ids:
            logger.warning(
                "handing back %d job(s) Redis still lists as run by %s, which it does not "
                "run (their end was lost, e.g. in a failover): %s",
                len(ids),
                self._member,
                ", ".join(ids[:5]),
            )
        return ids


async def still_owns(redis: Redis, keys: Keys, member: str, job_id: str) -> bool:
    """Whether ``member`` still owns ``job_id`` (arq id): not handed back since it
    started, and started by no other worker since."""
    owner = await redis.get(keys.job_owner(job_id))
    if owner is None:
        return False
    return (owner.decode() if isinstance(owner, bytes) else str(owner)) == member


async def track_finished(redis: Redis, keys: Keys, member: str, job_id: str, running: str) -> None:
    """``member`` no longer runs ``job_id`` (done, failed, retried later or handed
    back); it leaves ``running``, its queue's running-job index (:mod:`workers.poll`)."""
    await Lua(redis, _FINISHED)(
        [keys.worker_jobs(member), keys.job_owner(job_id), running], [member, job_id]
    )


async def reap(
    redis: Redis, keys: Keys, dead_after_s: float, running: Sequence[str] = ()
) -> dict[str, list[str]]:
    """Hand the jobs of every worker silent for ``dead_after_s`` (by Redis server
    time) back to the queue; returns them per worker. ``running``: the running-job
    indexes of the queues (:func:`workers.poll.running_key`), which the jobs leave."""
    silent = await Lua(redis, _SILENT)([keys.heartbeats()], [dead_after_s])
    script = Lua(redis, _REAP)
    out: dict[str, list[str]] = {}
    for raw in silent:
        member = raw.decode() if isinstance(raw, bytes) else str(raw)
        if not member.startswith("worker:"):
            continue
        jobs: list[Any] = await script(
            [keys.heartbeats(), keys.worker_jobs(member), *running],
            [member, dead_after_s, in_progress_key_prefix, keys.job_owner(""), 0],
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


async def hand_back_own(
    redis: Redis, keys: Keys, member: str, running: Sequence[str] = ()
) -> list[str]:
    """Hand back the jobs an earlier incarnation of this process left (a worker that
    lost Redis mid-job and starts again, :func:`workers.run.run_worker`): they are
    not running any more, but their in-progress markers would hold them for
    ``SLUICE_JOB_TIMEOUT_S`` + 10 s. Call before the new worker polls."""
    jobs: list[Any] = await Lua(redis, _REAP)(
        [keys.heartbeats(), keys.worker_jobs(member), *running],
        [member, 0, in_progress_key_prefix, keys.job_owner(""), 1],
    )
    ids = [j.decode() if isinstance(j, bytes) else str(j) for j in jobs]
    if ids:
        logger.warning("handing back %d job(s) this worker lost with Redis", len(ids))
    return ids


async def reaper_loop(
    redis: Redis,
    keys: Keys,
    dead_after_s: float,
    interval_s: float,
    running: Sequence[str] = (),
    orphans: OrphanSweep | None = None,
) -> None:
    """:func:`reap` (and ``orphans``' sweep) every ``interval_s`` until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await reap(redis, keys, dead_after_s, running)
            if orphans is not None:
                await orphans.sweep()
        except (RedisError, OSError) as e:
            logger.warning("cannot look for silent workers: %s", e)

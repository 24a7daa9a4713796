"""Jobs whose end Redis forgot (a failover to a replica that lagged) are handed back
by their own, live worker at once instead of when arq's marker expires."""

from __future__ import annotations

import uuid

from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from core.infra.redis import Keys
from workers.reaper import OrphanSweep


async def _job(redis: Redis, keys: Keys, member: str, running: str, job_id: str) -> None:
    """Redis's view of a job ``member`` runs: marker, owner, set and running index."""
    await redis.set(in_progress_key_prefix + job_id, b"1", ex=3600)
    await redis.set(keys.job_owner(job_id), member, ex=3600)
    await redis.sadd(keys.worker_jobs(member), job_id)  # type: ignore[misc]
    await redis.zadd(running, {job_id: 1})


async def test_a_listed_job_the_worker_does_not_run_is_handed_back_at_the_second_look(
    redis: Redis,
) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:10]}")
    member, running = "worker:host:1", f"{keys.prefix}:queue:running"
    ids = [f"{keys.prefix}-{name}" for name in ("runs", "lost", "ends")]
    runs, lost, ends = ids
    for job_id in ids:
        await _job(redis, keys, member, running, job_id)
    claimed = {runs, ends}  # what the process runs; `lost` ended but Redis forgot
    sweep = OrphanSweep(redis, keys, member, claimed, [running])
    try:
        # First look: only a suspect (it might have been starting or ending right then).
        assert await sweep.sweep() == []
        assert await redis.exists(in_progress_key_prefix + lost)
        # `ends` ends meanwhile, the ordinary way: gone from the process, then from Redis.
        claimed.discard(ends)
        await redis.srem(keys.worker_jobs(member), ends)  # type: ignore[misc]
        # A job that starts between the two looks is not taken either.
        started = f"{keys.prefix}-started"
        await _job(redis, keys, member, running, started)
        claimed.add(started)
        assert await sweep.sweep() == [lost]
        assert not await redis.exists(in_progress_key_prefix + lost)  # arq starts it again
        assert not await redis.exists(keys.job_owner(lost))
        assert await redis.zscore(running, lost) is None
        listed = await redis.smembers(keys.worker_jobs(member))  # type: ignore[misc]
        assert listed == {runs.encode(), started.encode()}
        for job_id in (runs, started):
            assert await redis.exists(in_progress_key_prefix + job_id)
            assert await redis.get(keys.job_owner(job_id)) == member.encode()
        # Nothing more to hand back.
        assert await sweep.sweep() == []
        assert await sweep.sweep() == []
    finally:
        await redis.delete(
            keys.worker_jobs(member),
            running,
            *[in_progress_key_prefix + i for i in [*ids, f"{keys.prefix}-started"]],
            *[keys.job_owner(i) for i in [*ids, f"{keys.prefix}-started"]],
        )

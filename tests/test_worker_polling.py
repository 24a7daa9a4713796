"""The worker's poll: due jobs that are not running, as many as there are free slots."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import arq.utils
from arq.connections import create_pool
from arq.constants import in_progress_key_prefix
from arq.worker import func

from core.infra.redis import redis_settings
from core.settings import Settings
from workers.settings import SluiceWorker

started: list[str] = []


async def _record(ctx: dict[str, Any], name: str) -> str:
    started.append(name)
    return name


async def test_queued_jobs_behind_more_running_jobs_than_arq_reads_still_start(redis_url):
    """Running jobs stay at the head of arq's queue; with more of them than arq's
    ``queue_read_limit`` (here 600 against 500), stock arq would see none of the
    queued jobs behind them. The Sluice worker looks past them."""
    settings = Settings(_env_file=None, redis_url=redis_url)
    queue = f"test-poll-{uuid.uuid4().hex[:8]}"
    pool = await create_pool(redis_settings(settings), default_queue_name=queue)
    started.clear()
    try:
        old = int(time.time() * 1000) - 60_000
        running = {f"{queue}:running:{i}": old + i for i in range(600)}
        await pool.zadd(queue, running)
        for job_id in running:
            await pool.set(in_progress_key_prefix + job_id, b"1", px=60_000)
        for name in ("late-1", "late-2", "late-3"):
            assert await pool.enqueue_job("_record", name, _job_id=f"{queue}:{name}")
        worker = SluiceWorker(
            functions=[func(_record, name="_record")],
            queue_name=queue,
            redis_pool=pool,
            max_jobs=2,
            handle_signals=False,
        )
        # What arq's poll hands over: the best-scored due id (a running one).
        head = await pool.zrangebyscore(queue, "-inf", "+inf", start=0, num=1)
        assert worker.queue_read_limit == 1

        async def poll() -> None:
            await worker.start_jobs(head)
            await asyncio.wait_for(asyncio.gather(*worker.tasks.values()), 10)

        await poll()
        # As many as the free slots, in score order (the two run concurrently).
        assert sorted(started) == ["late-1", "late-2"]
        await poll()
        assert sorted(started) == ["late-1", "late-2", "late-3"]
    finally:
        await pool.delete(queue, *(in_progress_key_prefix + j for j in running))
        await pool.aclose()


async def test_a_job_enqueued_in_the_same_millisecond_is_due(redis_url, monkeypatch):
    """arq scores a job with its clock rounded to the millisecond; the poll read the
    clock truncated, so a job enqueued less than a millisecond earlier (its score
    rounded up) was not due yet. That was the cause of this file's old flake, where a
    first poll on a fast shared Redis started one of its two due jobs."""
    settings = Settings(_env_file=None, redis_url=redis_url)
    queue = f"test-poll-{uuid.uuid4().hex[:8]}"
    pool = await create_pool(redis_settings(settings), default_queue_name=queue)
    # The second half of a millisecond: rounding and truncation differ.
    frozen = 1_800_000_000.0006
    monkeypatch.setattr(time, "time", lambda: frozen)
    monkeypatch.setattr(arq.utils, "time", lambda: frozen)
    started.clear()
    try:
        assert await pool.enqueue_job("_record", "now", _job_id=f"{queue}:now")
        worker = SluiceWorker(
            functions=[func(_record, name="_record")],
            queue_name=queue,
            redis_pool=pool,
            max_jobs=2,
            handle_signals=False,
        )
        await worker.start_jobs([f"{queue}:now".encode()])
        await asyncio.wait_for(asyncio.gather(*worker.tasks.values()), 10)
        assert started == ["now"]
    finally:
        await pool.delete(queue)
        await pool.aclose()

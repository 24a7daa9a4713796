"""The flush: every buffered message lands in SQL exactly once, whatever dies when."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from core.history.store import MessageRow, count_rows
from core.infra.redis import Keys
from core.settings import Settings
from tests.history.helpers import buffer_messages, make_history, run_flush_process
from workers.flush import Flusher


async def stored_ids(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(MessageRow.__table__.c.message_id))).all()  # type: ignore[attr-defined]
    return [r[0] for r in rows]


async def test_ten_thousand_buffered_messages_land_in_sql_exactly_once(
    hsettings: Settings, rds: Redis, engine: AsyncEngine, keys: Keys
) -> None:
    history = make_history(rds, hsettings)
    ids = await buffer_messages(history, 10_000)
    assert len(ids) == 10_000
    assert await rds.xlen(keys.history_backlog()) == 10_000

    # One run moves everything: a lock TTL no stall of a busy machine outlasts (the
    # 2 s of these tests' settings is for the tests of a killed flush).
    settings = hsettings.model_copy(update={"history_flush_lock_ttl_s": 60.0})
    result = await Flusher(rds, settings, engine).run(max_s=60)

    assert result.error is None
    assert result.inserted == 10_000
    assert await rds.xlen(keys.history_backlog()) == 0
    assert await count_rows(engine) == (10_000, 10_000)
    assert sorted(await stored_ids(engine)) == sorted(ids)


async def test_flushing_the_same_entries_again_writes_nothing_twice(
    hsettings: Settings, rds: Redis, engine: AsyncEngine, keys: Keys
) -> None:
    history = make_history(rds, hsettings)
    await buffer_messages(history, 200)
    # The same entries buffered twice (e.g. a retried job): still stored once.
    await buffer_messages(history, 200)
    await Flusher(rds, hsettings, engine).run(max_s=30)
    assert await count_rows(engine) == (200, 200)


def _wait_for(log: Path, needle: str, proc: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:  # type: ignore[attr-defined]
            raise AssertionError(f"flush exited early:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"{needle!r} not seen:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
async def test_flush_killed_mid_batch_at_any_point_loses_nothing_and_duplicates_nothing(
    hsettings: Settings, rds: Redis, engine: AsyncEngine, keys: Keys, tmp_path: Path
) -> None:
    # A lock TTL no stall of a busy machine outlasts: a run that lost its lock would stop
    # after its batch and never reach its pause point.
    settings = hsettings.model_copy(
        update={"history_flush_batch": 500, "history_flush_lock_ttl_s": 60.0}
    )
    history = make_history(rds, settings)
    ids = await buffer_messages(history, 4000)

    # Each run is SIGKILLed at a different point of a batch; the next one carries on.
    # The killed run's lock would expire after its TTL (it renews no more); the test
    # removes it at once instead of waiting, so that the next run is not skipped.
    points = [
        "after_read:2",
        "before_commit:1",
        "after_commit:2",
        "before_commit:2",
        "after_ack:1",
        "after_commit:1",
    ]
    for n, point in enumerate(points):
        log = tmp_path / f"flush-{n}.log"
        proc = run_flush_process(settings, log, pause=point)
        try:
            await asyncio.to_thread(_wait_for, log, "PAUSED", proc)
        finally:
            with contextlib.suppress(ProcessLookupError):  # so an early exit shows
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
        assert await rds.delete(keys.history_flush_lock()) == 1, "the killed run held the lock"
        rows, distinct = await count_rows(engine)
        assert rows == distinct  # never a message twice, even mid-way
        pending = await rds.xpending(keys.history_backlog(), "flush")
        assert pending["pending"] > 0 or point.startswith("after_ack")

    log = tmp_path / "flush-final.log"
    proc = run_flush_process(settings, log)
    code = await asyncio.to_thread(proc.wait, 60)
    assert code == 0, log.read_text()[-3000:]
    assert await count_rows(engine) == (4000, 4000)
    assert sorted(await stored_ids(engine)) == sorted(ids)
    assert await rds.xlen(keys.history_backlog()) == 0


async def test_only_one_flush_runs_at_a_time(
    hsettings: Settings, rds: Redis, engine: AsyncEngine, keys: Keys
) -> None:
    history = make_history(rds, hsettings)
    await buffer_messages(history, 2000)
    settings = hsettings.model_copy(update={"history_flush_batch": 100})
    results = await asyncio.gather(
        *[Flusher(rds, settings, engine).run(max_s=30) for _ in range(4)]
    )
    ran = [r for r in results if r.skipped is None]
    assert len(ran) == 1
    assert all(r.skipped == "another flush is running" for r in results if r not in ran)
    assert await count_rows(engine) == (2000, 2000)

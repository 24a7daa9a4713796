"""Context from SQL when Redis lost it; chat goes on while the database is down."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from core.history.hot import backlog_status
from core.history.store import count_rows, ensure_schema, iter_records, make_engine
from core.infra.redis import Keys
from core.settings import Settings
from tests.helpers import Proc, free_port
from tests.history.conftest import PG_URL, drop_pg_schema, postgres_reachable
from tests.history.helpers import exchange, make_history, message
from tests.webchat import ChatSession, web_adapter
from workers.flush import Flusher


async def _delete_prefix(redis: Redis, prefix: str) -> None:
    keys = [k async for k in redis.scan_iter(f"{prefix}:*", count=1000)]
    if keys:
        await redis.delete(*keys)


async def _wait_rows(settings: Settings, n: int, timeout_s: float = 30.0) -> None:
    engine = make_engine(settings)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if (await count_rows(engine))[0] >= n:
                    return
            except Exception:
                logging.getLogger(__name__).debug("rows not readable yet", exc_info=True)
            await asyncio.sleep(0.2)
        raise AssertionError(f"fewer than {n} rows in SQL after {timeout_s}s")
    finally:
        await engine.dispose()


async def test_follow_up_after_redis_lost_its_data_gets_earlier_turns_from_sql(
    settings: Settings, llm_sim: object, worker_process: Callable[..., Proc], redis: Redis
) -> None:
    fast = {"SLUICE_HISTORY_FLUSH_INTERVAL_S": "1"}
    worker = worker_process(fast)
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            first = await tab.reply(await tab.send("My name is Ada."))
            session = tab.session  # the same browser comes back to it
        await _wait_rows(settings, 2)
        # Redis loses everything (a restart without persistence), workers restart.
        worker.stop()
        await _delete_prefix(redis, settings.key_prefix)
        worker_process(fast)
        async with ChatSession(http, base, session) as tab:
            await tab.reply(await tab.send("What is my name?"))
    prompt = llm_sim.requests()[-1]["messages"]  # type: ignore[attr-defined]
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
    assert prompt[1]["content"] == "My name is Ada."
    assert prompt[2]["content"] == first["text"]
    assert prompt[3]["content"] == "What is my name?"


async def test_recent_reads_sql_when_the_hot_window_is_gone_and_warms_it_again(
    hsettings: Settings, rds: Redis, engine: AsyncEngine, keys: Keys
) -> None:
    history = make_history(rds, hsettings, engine=engine)
    msgs = [message(i, thread="th1") for i in range(3)]
    for m in msgs:
        await history.append(m.conversation_id, exchange(m), origin=m)
    await Flusher(rds, hsettings, engine).run(max_s=10)
    conv = msgs[0].conversation_id
    await rds.delete(keys.history(conv))

    turns = await history.recent(conv, 4)

    assert [t.message_id for t in turns] == ["m1", "m1:answer", "m2", "m2:answer"]
    assert await rds.llen(keys.history(conv)) == 6  # warmed with the whole stored tail
    assert [t.text for t in await history.hot(conv, 2)] == [msgs[2].text, "answer to question 2"]


async def test_backlog_bound_keeps_chat_going_and_overflow_is_stored_from_hot_windows(
    sqlite_settings: Settings, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = sqlite_settings.model_copy(update={"history_backlog_max": 100})
    keys = Keys(settings.key_prefix)
    redis: Redis = Redis.from_url(redis_url)
    engine = make_engine(settings)
    try:
        history = make_history(redis, settings)
        with caplog.at_level(logging.ERROR, logger="core.history.hot"):
            for i in range(90):  # 180 turns: 80 over the bound
                m = message(i, channel=f"C{i % 7}")
                await history.append(m.conversation_id, exchange(m), origin=m)
        assert any("backlog is full" in r.getMessage() for r in caplog.records)
        status = await backlog_status(redis, keys, settings.history_backlog_max)
        assert status.length == 100 and status.full
        assert status.overflowed_total == 80 and status.overflow_conversations > 0
        # Every turn is still in its hot window: chat and context go on.
        assert sum([await redis.llen(keys.history(f"slack:T1:C{c}:-")) for c in range(7)]) == 180

        await ensure_schema(settings, engine)
        result = await Flusher(redis, settings, engine).run(max_s=30)
        assert result.error is None
        assert await count_rows(engine) == (180, 180)
        assert (await backlog_status(redis, keys, 100)).overflow_conversations == 0
    finally:
        await _delete_prefix(redis, settings.key_prefix)
        await redis.aclose()
        await engine.dispose()


@pytest.mark.postgres
async def test_postgres_down_chat_goes_on_backlog_grows_within_bound_then_lands(
    settings: Settings,
    llm_sim: object,
    worker_process: Callable[..., Proc],
    redis: Redis,
    tmp_path: Path,
) -> None:
    if not postgres_reachable():
        pytest.skip("Postgres is not reachable on 127.0.0.1:5432")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    dead = {
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/test",
        "SLUICE_DB_SCHEMA": schema,
        "SLUICE_HISTORY_FLUSH_INTERVAL_S": "1",
        "SLUICE_HISTORY_BACKLOG_MAX": "1000",
    }
    keys = Keys(settings.key_prefix)
    pg = settings.model_copy(update={"database_url": PG_URL, "db_schema": schema})
    try:
        worker = worker_process(dead)
        async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
            async with ChatSession(http, base) as tab:
                for i in range(5):
                    done = await tab.reply(await tab.send(f"question {i} while the db is down"))
                    assert done["kind"] == "answer"
        deadline = time.monotonic() + 60
        while True:  # a flush attempt fails meanwhile
            status = await backlog_status(redis, keys, 1000)
            if (status.failures and status.length >= 10) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert status.length == 10 and status.length <= status.backlog_max
        assert status.failures >= 1 and status.last_error
        assert status.oldest_age_s > 0
        worker.stop()

        worker_process({**dead, "DATABASE_URL": PG_URL})
        await _wait_rows(pg, 10)
        await asyncio.sleep(0.5)
        engine = make_engine(pg)
        try:
            assert await count_rows(engine) == (10, 10)
            texts = [r["text"] async for r in iter_records(engine, tenant="web")]
            assert sum(t.startswith("question ") for t in texts) == 5
        finally:
            await engine.dispose()
        assert (await backlog_status(redis, keys, 1000)).length == 0
    finally:
        await drop_pg_schema(schema)


async def test_context_read_does_not_wait_on_a_dead_database(
    sqlite_settings: Settings, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    dead = sqlite_settings.model_copy(
        update={"database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/test"}
    )
    redis: Redis = Redis.from_url(redis_url)
    engine = make_engine(dead)
    try:
        history = make_history(redis, dead, engine=engine)
        caplog.set_level(logging.WARNING, logger="core.history.hot")
        assert await history.recent("slack:T1:C1:-", 10) == []
        # Chat goes on: the next reads do not even try SQL for a while.
        assert await history.recent("slack:T1:C2:-", 10) == []
        tries = [r for r in caplog.records if r.getMessage().startswith("no SQL history")]
        assert len(tries) == 1 and "slack:T1:C1:-" in tries[0].getMessage(), tries
        assert history._sql_down_until > time.monotonic()
    finally:
        await redis.aclose()
        await engine.dispose()


async def test_backlog_past_the_threshold_is_flushed_before_the_next_interval(
    settings: Settings, llm_sim: object, worker_process: Callable[..., Proc]
) -> None:
    worker_process(
        {"SLUICE_HISTORY_FLUSH_INTERVAL_S": "3600", "SLUICE_HISTORY_FLUSH_THRESHOLD": "4"}
    )
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            for i in range(3):
                await tab.reply(await tab.send(f"question {i}"))
    await _wait_rows(settings, 4, timeout_s=15)


async def test_context_from_sql_leaves_out_the_message_being_answered(
    hsettings: Settings, rds: Redis, engine: AsyncEngine, keys: Keys
) -> None:
    history = make_history(rds, hsettings, engine=engine)
    first, current = message(1), message(2)
    await history.append(first.conversation_id, exchange(first), origin=first)
    await history.record(current, exchange(current)[:1])  # accepted, being answered
    await Flusher(rds, hsettings, engine).run(max_s=10)
    await rds.delete(keys.history(first.conversation_id))

    turns = await history.recent(first.conversation_id, 10, exclude={"m2", "m2:answer"})

    assert [t.message_id for t in turns] == ["m1", "m1:answer"]
    assert [t.message_id for t in await history.hot(first.conversation_id, 10)] == [
        "m1",
        "m1:answer",
    ]

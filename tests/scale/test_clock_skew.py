"""A worker whose host clock is 30 s off steals no live job.

Heartbeats and dead-worker detection use Redis server time (``core.infra.clock``). Before,
a worker 30 s ahead took every other worker for silent and handed their running jobs
back (answered twice); one 30 s behind looked dead to all the others.
``SLUICE_TEST_CLOCK_OFFSET_S`` shifts a real worker process's ``time.time``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from core.infra.clock import redis_now
from core.infra.heartbeat import live
from core.infra.redis import Keys
from core.settings import Settings
from tests.helpers import Proc
from tests.webchat import ChatSession, web_adapter

DEAD_AFTER_S = 5
ENV = {
    "SLUICE_HEALTH_CHECK_INTERVAL_S": "1",
    "SLUICE_WORKER_DEAD_AFTER_S": str(DEAD_AFTER_S),
    # Room for the held answer however slowly the workers start (it is released sooner).
    "SLUICE_JOB_TIMEOUT_S": "270",
    "SLUICE_LLM_TIMEOUT_S": "250",
}


def _member_of(members: dict[str, float], proc: Proc) -> str | None:
    found = [m for m in members if m.startswith("worker:") and m.endswith(f":{proc.pid}")]
    return found[0] if found else None


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_workers_with_clocks_30s_off_steal_no_live_job_and_take_none_for_dead(
    settings: Settings, llm_sim: Any, worker_process: Callable[..., Proc], redis: Redis
) -> None:
    # An answer held in flight (a token every 2 s: 300 s in all) until the skewed
    # workers have started, however slowly, and their reapers have run for longer than
    # the dead-after window; then the rest of it streams at once.
    llm_sim.configure(tokens=150, token_latency_s=2.0)
    keys = Keys(settings.key_prefix)
    honest = worker_process(ENV)
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            mid = await tab.send("a long answer please")
            await tab.wait_for(mid, "delta", timeout_s=30)
            ahead = worker_process({**ENV, "SLUICE_TEST_CLOCK_OFFSET_S": "30"})
            behind = worker_process({**ENV, "SLUICE_TEST_CLOCK_OFFSET_S": "-30"})
            procs = (honest, ahead, behind)
            members: dict[str, float] = {}

            async def all_beat() -> bool:
                nonlocal members
                members = await live(redis, keys, DEAD_AFTER_S)
                return all(_member_of(members, p) for p in procs)

            await wait_until_async(all_beat, 30, "all three workers' heartbeats")
            # All three beat; by Redis time, let more than the dead-after window pass
            # (the reapers run every second), all three still live and nothing handed back.
            until = await redis_now(redis) + DEAD_AFTER_S + 3

            async def window_passed() -> bool:
                assert await all_beat(), f"a worker was taken for dead: {members}"
                assert all("handing" not in p.output() for p in procs), "a job was handed back"
                return await redis_now(redis) >= until

            await wait_until_async(window_passed, 60, "the dead-after window to pass")
            assert not [e for e in tab.events_for(mid) if e["type"] == "done"], (
                "the answer ended before the skewed workers ran: nothing was tested"
            )
            llm_sim.configure(token_latency_s=0.01)  # the rest of the answer, at once
            done = await tab.reply(mid, timeout_s=120)
            # All three are still live by Redis time: none took another for dead.
            assert await all_beat(), members
    outputs = [p.output() for p in (honest, ahead, behind)]
    assert done["kind"] == "answer"
    assert all("handing" not in out for out in outputs), "a live worker's job was handed back"
    assert llm_sim.stats()["completions"] == 1, "answered once, by the worker that took it"
    assert "clock is +30.0s off" in outputs[1] and "clock is -30.0s off" in outputs[2]
    # The one answer was delivered once.
    assert len([e for e in tab.events_for(mid) if e["type"] == "done"]) == 1


async def wait_until_async(
    predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str
) -> None:
    """:func:`tests.helpers.wait_until` for an async predicate."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)

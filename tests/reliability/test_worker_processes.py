"""Workers killed or stopped mid-reply: every message is still answered exactly once."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest

from tests.helpers import wait_jobs_done
from tests.webchat import ChatSession, web_adapter

# The README promises a killed worker's job is answered again within
# SLUICE_JOB_TIMEOUT_S + 10 s (arq's in-progress marker) plus the answer's own time.
JOB_TIMEOUT_S = 5


async def _first_delta(tab: ChatSession, mid: str) -> None:
    await tab.wait_for(mid, "delta", timeout_s=15)


@pytest.mark.slow
async def test_worker_sigkilled_mid_stream_the_message_is_answered_once(
    settings, llm_sim, worker_process, redis
):
    llm_sim.configure(tokens=30, token_latency_s=0.1)
    env = {"SLUICE_JOB_TIMEOUT_S": str(JOB_TIMEOUT_S)}
    first = worker_process(env)
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            mid = await tab.send("a long story please")
            await _first_delta(tab, mid)
            first.kill(signal.SIGKILL)
            worker_process(env)
            done = await tab.reply(mid, timeout_s=JOB_TIMEOUT_S + 10 + 15)
            await wait_jobs_done(redis, settings, 60)  # a second answer would be out now
            dones = [e for e in tab.events_for(mid) if e["type"] == "done"]
    assert len(dones) == 1
    assert done["kind"] == "answer"
    assert done["text"].startswith("Echo: a long story please")
    assert llm_sim.stats()["completions"] == 2, "the killed attempt and the answer"


@pytest.mark.slow
async def test_a_killed_workers_job_is_handed_back_when_its_heartbeat_stops(
    settings, llm_sim, worker_process, redis
):
    """With a long job timeout, arq alone would re-run the job after 130 s; the
    surviving worker sees the dead one's heartbeat stop and hands its job back."""
    llm_sim.configure(tokens=30, token_latency_s=0.1)
    env = {
        "SLUICE_JOB_TIMEOUT_S": "120",
        "SLUICE_HEALTH_CHECK_INTERVAL_S": "1",
        "SLUICE_WORKER_DEAD_AFTER_S": "4",
    }
    first = worker_process(env)
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            mid = await tab.send("a long story please")
            await _first_delta(tab, mid)
            first.kill(signal.SIGKILL)
            second = worker_process(env)
            # Well within arq's 130 s in-progress marker: handed back, not expired.
            done = await tab.reply(mid, timeout_s=40)
            await wait_jobs_done(redis, settings, 60)  # a second answer would be out now
            dones = [e for e in tab.events_for(mid) if e["type"] == "done"]
    assert len(dones) == 1 and done["kind"] == "answer"
    assert done["text"].startswith("Echo: a long story please")
    assert "handing its 1 job(s) back to the queue" in second.output()
    assert llm_sim.stats()["completions"] == 2, "the killed attempt and the answer"
    # The survivor's own record of running jobs is empty again.
    leftover = [k async for k in redis.scan_iter(f"{settings.key_prefix}:worker:jobs:*")]
    assert [await redis.scard(k) for k in leftover] == [0] * len(leftover)


async def test_sigterm_lets_the_running_reply_finish_and_exits_cleanly(
    settings, llm_sim, worker_process
):
    llm_sim.configure(tokens=20, token_latency_s=0.1)
    worker = worker_process()
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            mid = await tab.send("finish me")
            await _first_delta(tab, mid)
            worker.kill(signal.SIGTERM)
            done = await tab.reply(mid, timeout_s=20)
            assert done["kind"] == "answer"
    assert await asyncio.to_thread(worker.popen.wait, 20) == 0
    assert "handing" not in worker.output()
    assert llm_sim.stats()["completions"] == 1


async def test_sigterm_past_the_grace_period_hands_the_job_to_another_worker(
    settings, llm_sim, worker_process, redis
):
    llm_sim.configure(tokens=30, token_latency_s=0.1)
    leaving = worker_process({"SLUICE_SHUTDOWN_GRACE_S": "0.2"})
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            mid = await tab.send("hand me over")
            await _first_delta(tab, mid)
            leaving.kill(signal.SIGTERM)
            assert await asyncio.to_thread(leaving.popen.wait, 20) == 0
            worker_process()
            # Handed back at once: no wait for the in-progress marker to expire.
            done = await tab.reply(mid, timeout_s=12)
            await wait_jobs_done(redis, settings, 60)  # a second answer would be out now
            assert len([e for e in tab.events_for(mid) if e["type"] == "done"]) == 1
    assert done["text"].startswith("Echo: hand me over")
    assert "handing 1 unfinished job(s) back" in leaving.output()

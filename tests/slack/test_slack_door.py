"""Slack: the queued notice shows while no worker slot is free, and becomes the answer.

Real adapter, real ``sluice worker`` process, fake Slack Web API, simulator; the one
reply slot is held by a job waiting for the closed LLM budget (see tests/test_door.py).
"""

from __future__ import annotations

from prometheus_client import REGISTRY
from redis.asyncio import Redis

from tests.door_util import close_budget, open_budget, until
from tests.fakes.slack_api import FakeSlackAPI
from tests.helpers import unique_slack_ts
from tests.slack.conftest import mention, worker_env


def _in_thread(fake: FakeSlackAPI, ts: str) -> list:
    return [m for m in fake.replies("C1") if m.thread_ts == ts]


def _busy_refusals() -> float:
    return REGISTRY.get_sample_value("sluice_door_refusals_total", {"reason": "busy"}) or 0.0


async def test_queued_notice_is_posted_while_no_slot_is_free_then_edited_into_the_answer(
    slack_settings, adapter, worker_process, fake_slack, redis: Redis
):
    s = slack_settings.model_copy(
        update={"llm_rpm": 60, "queued_notice_after_s": 1.0, "worker_max_jobs": 1}
    )
    worker_process(worker_env(s))
    await close_budget(redis, s.key_prefix, 120)
    first, second = unique_slack_ts(), unique_slack_ts()
    async with adapter(s) as a:
        await a.send.event(mention("first in line", first, user="U1"))

        async def slot_held() -> bool:
            return bool(await redis.zcard(f"{s.key_prefix}:llm:waiters"))

        await until(slot_held, 20, "the only slot held by a job waiting for the budget")
        await a.send.event(mention("second in line", second, user="U2"))
        await fake_slack.wait_for(
            lambda: any(
                m.text.startswith("⏳ Queued: #2 in line, about")
                for m in _in_thread(fake_slack, second)
            ),
            timeout_s=20,
        )
        [notice] = _in_thread(fake_slack, second)
        await open_budget(redis, s.key_prefix)
        await fake_slack.wait_for(
            lambda: any(
                m.text.startswith("Echo: second in line") for m in _in_thread(fake_slack, second)
            ),
            timeout_s=30,
        )
    [answer] = _in_thread(fake_slack, second)  # the notice became the answer
    assert answer.ts == notice.ts and answer.edits >= 1


async def test_a_message_over_the_wait_bound_is_refused_with_one_notice(
    slack_settings, adapter, worker_process, fake_slack, redis: Redis
):
    """Slack, like the web chat: over ``SLUICE_MAX_WAIT_S`` the door refuses the
    message at once with a notice in its thread; the same user's next refusal in the
    window gets none; neither is queued or reaches the model."""
    s = slack_settings.model_copy(
        # A day-long limit window: no window edge (notices count per window, aligned to
        # the clock) falls between the two refusals.
        update={
            "llm_rpm": 60,
            "max_wait_s": 10.0,
            "queued_notice_after_s": 1.0,
            "user_window_s": 86_400,
        }
    )
    worker_process(worker_env(s))
    await close_budget(redis, s.key_prefix, 120)
    first, second = unique_slack_ts(), unique_slack_ts()
    refusals_before = _busy_refusals()
    async with adapter(s) as a:
        await a.send.event(mention("are you there?", first, user="U1"))
        await fake_slack.wait_for(
            lambda: any(
                m.text == "Very busy right now, please try again in about 2 min."
                for m in _in_thread(fake_slack, first)
            ),
            timeout_s=20,
        )
        await a.send.event(mention("hello??", second, user="U1"))

        async def both_handled() -> bool:
            # The adapter runs in this process: its door counts each refusal.
            return _busy_refusals() >= refusals_before + 2

        await until(both_handled, 20, "the door to handle the second message")
        refused_jobs = [k async for k in redis.scan_iter(match=f"arq:*{s.key_prefix}:refused:*")]
    assert len(_in_thread(fake_slack, first)) == 1
    assert _in_thread(fake_slack, second) == []
    # One notice job in the window (arq keeps a job's key, retry count, result...).
    assert len({k.split(b":refused:", 1)[1] for k in refused_jobs}) == 1, refused_jobs
    queued = await redis.zrange(s.queue_name, 0, -1)
    assert [j for j in queued if b":reply:" in j] == [], queued

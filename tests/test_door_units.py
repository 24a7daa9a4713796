"""The door's Redis side on a real Redis: admission counts once, the cache-at-the-door
hold never jumps a conversation's line, and the refreshed estimate stops once the
answer is being made."""

from __future__ import annotations

import pytest
from arq.constants import in_progress_key_prefix

from core.framework.bot import Bot
from core.infra.redis import Keys
from core.messages import IncomingMessage
from core.traffic.control import Traffic
from core.traffic.door import (
    admit,
    answered,
    answered_at_door,
    door_owner,
    estimate_line,
    let_go,
    line_of_job,
    take_conversation,
)
from core.traffic.ordering import acquire_conversation, register_arrival
from core.traffic.queue import Accepted, accept_message, arq_job_id, connect_queue, enqueue_reply
from core.traffic.ratelimit import RateLimiter, limits_for
from tests.door_util import close_budget


def _msg(mid: str, **kw: object) -> IncomingMessage:
    fields: dict[str, object] = {
        "platform": "web",
        "tenant": "t1",
        "channel": "c1",
        "user": "u1",
        "message_id": mid,
        "text": "hello",
    }
    fields.update(kw)
    return IncomingMessage.model_validate(fields)


async def test_admission_counts_a_message_once_and_the_worker_only_checks_it(settings, redis):
    s = settings.model_copy(update={"user_requests_per_window": 2, "user_window_s": 86_400})
    keys = Keys(s.key_prefix)
    bot = Bot()
    got = [await admit(redis, keys, s, bot, _msg(f"m{i}"), s.queue_name, 0) for i in range(4)]
    assert [a.admitted for a in got] == [True, True, False, False]
    assert got[2].notice is not None and got[2].notice.startswith("You've reached your")
    assert got[3].notice is None  # one notice per user per window
    # The worker's second line: an admitted message is not counted again...
    traffic = Traffic(redis, s, bot)
    admitted = _msg("m1", meta={"sluice_admitted": "1"})
    assert await traffic.check_limits(admitted) is None
    # ...while a message that skipped the door is checked and counted as before.
    assert await traffic.check_limits(_msg("m9")) is not None
    verdict = await RateLimiter(redis, keys).check(
        _msg("m10", user="u2"), limits_for(s, bot, _msg("x"))
    )
    assert verdict.allowed  # another user has their own count


async def test_a_busy_refusal_counts_nothing(settings, redis):
    s = settings.model_copy(
        # A day-long window: the second message falls in the same one as the first.
        update={
            "llm_rpm": 60,
            "max_wait_s": 10.0,
            "user_requests_per_window": 1,
            "user_window_s": 86_400,
        }
    )
    keys = Keys(s.key_prefix)
    await close_budget(redis, s.key_prefix, 120)
    busy = await admit(redis, keys, s, Bot(), _msg("m1"), s.queue_name, 0)
    assert not busy.admitted and busy.notice is not None
    assert busy.notice.startswith("Very busy right now, please try again in about 2 min")
    assert busy.line.wait_s is not None and busy.line.wait_s > 100
    await redis.hdel(keys.llm("bucket"), "blocked")  # type: ignore[misc]
    # The limit of one message was not used up by the refused one.
    assert (await admit(redis, keys, s, Bot(), _msg("m2"), s.queue_name, 0)).admitted


async def test_the_door_holds_a_conversation_only_for_its_first_message(settings, redis):
    keys = Keys(settings.key_prefix)
    first, second = _msg("m1"), _msg("m2")
    await register_arrival(redis, keys, first)
    await register_arrival(redis, keys, second)
    # Something earlier is in flight: the second message cannot be answered at the door.
    assert not await take_conversation(redis, keys, settings, second)
    assert await take_conversation(redis, keys, settings, first)
    # The reply job of the same message sees the conversation busy, not as its own.
    s = settings.model_copy(update={"order_wait_in_job_s": 0.05})
    with pytest.raises(Exception, match="busy"):
        await acquire_conversation(redis, keys, s, first, first.job_id)
    assert (
        await redis.get(keys.conv_lock(first.conversation_id)) == door_owner(first.job_id).encode()
    )
    # A miss gives the lock back and keeps the message's place in line.
    await let_go(redis, keys, first)
    assert await redis.zrange(keys.conv_pending(first.conversation_id), 0, -1) == [
        first.job_id.encode(),
        second.job_id.encode(),
    ]
    lock = await acquire_conversation(redis, keys, s, first, first.job_id)
    await lock.release()


async def test_answered_at_the_door_leaves_the_line_and_the_queue_and_frees_the_next(
    settings, redis
):
    s = settings.model_copy(update={"queued_notice_after_s": 0})
    keys = Keys(s.key_prefix)
    pool = await connect_queue(s)
    first, second = _msg("m1"), _msg("m2")
    try:
        assert await enqueue_reply(pool, s, first)
        assert await enqueue_reply(pool, s, second)
    finally:
        await pool.aclose()
    first = first.model_copy(update={"meta": {"sluice_admitted": "1"}})
    assert await take_conversation(redis, keys, s, first)
    assert await answered(redis, keys, first, s.queue_name, arq_job_id(s, first))
    assert await answered_at_door(redis, keys, first.job_id)
    assert not await answered_at_door(redis, keys, second.job_id)
    # The first reply job will never run; the second is next in its conversation.
    assert await redis.zscore(s.queue_name, arq_job_id(s, first)) is None
    assert await redis.zscore(s.queue_name, arq_job_id(s, second)) is not None
    assert await redis.zrange(keys.conv_pending(first.conversation_id), 0, -1) == [
        second.job_id.encode()
    ]
    assert await redis.get(keys.conv_lock(first.conversation_id)) is None
    assert await redis.hget(keys.lanes(), "started:default") == b"1"
    lock = await acquire_conversation(redis, keys, s, second, second.job_id)
    await lock.release()


async def test_the_refreshed_line_stops_once_the_answer_is_being_made(settings, redis):
    s = settings.model_copy(update={"llm_rpm": 60, "queued_notice_after_s": 0})
    keys = Keys(s.key_prefix)
    pool = await connect_queue(s)
    msgs = [_msg(f"m{i}", channel=f"c{i}") for i in range(3)]
    try:
        for m in msgs:
            assert await enqueue_reply(pool, s, m)
    finally:
        await pool.aclose()
    last = msgs[-1]
    line = await line_of_job(redis, keys, s, s.queue_name, arq_job_id(s, last), last.job_id)
    assert line is not None and line.place == 3 and line.wait_s is not None
    # Started and waiting in the LLM budget's line: its rank there.
    await redis.set(in_progress_key_prefix + arq_job_id(s, last), b"1", ex=60)
    await redis.zadd(keys.llm("waiters"), {msgs[0].job_id: 1, last.job_id: 2})
    line = await line_of_job(redis, keys, s, s.queue_name, arq_job_id(s, last), last.job_id)
    assert line is not None and line.place == 2
    # Granted: the answer is being made, the notice is left to it.
    await redis.zrem(keys.llm("waiters"), last.job_id)
    assert await line_of_job(redis, keys, s, s.queue_name, arq_job_id(s, last), last.job_id) is None


async def test_the_estimate_counts_worker_slots_at_the_start_rate_measured_in_a_backlog(
    settings, redis
):
    s = settings.model_copy(update={"llm_rpm": 6000})  # the budget is no limit here
    keys = Keys(s.key_prefix)
    rate_key = f"{s.key_prefix}:door:start-rate"
    for i in range(30):  # 10 running, 20 waiting to start
        await redis.zadd(s.queue_name, {f"{s.key_prefix}:job-{i}": 1_000 + i})
    await redis.hset(keys.lanes(), mapping={"enqueued:default": 30, "started:default": 10})
    # No start rate measured yet: the budget's estimate only.
    line = await estimate_line(redis, keys, s, s.queue_name, 10_000, queued=False)
    assert (line.place, line.wait_s) == (31, 0.0)
    # A thousand starts in the last 100 s, while the backlog lasted: 10 jobs/s (over
    # 100 s, so that a slow test process does not move the measured rate).
    sec, usec = await redis.time()
    now_ms = int(sec) * 1000 + usec // 1000
    await redis.hset(rate_key, mapping={"t": now_ms - 100_000, "n": 10, "w": 20})
    await redis.hset(keys.lanes(), "started:default", 1010)
    await redis.hset(keys.lanes(), "enqueued:default", 1030)
    for i in range(30, 40):
        await redis.zadd(s.queue_name, {f"{s.key_prefix}:job-{i}": 1_000 + i})
    line = await estimate_line(redis, keys, s, s.queue_name, 10_000, queued=False)
    assert line.place == 41
    # 40 ahead, 20 of them running: 20 not started yet at ~10/s.
    assert line.wait_s is not None and 1.5 < line.wait_s < 2.5, line
    assert 9 < float(await redis.hget(rate_key, "r")) < 11


async def test_each_user_of_a_workspace_over_its_limit_is_told_once(settings, redis):
    s = settings.model_copy(update={"tenant_requests_per_window": 2, "user_window_s": 86_400})
    keys = Keys(s.key_prefix)
    bot = Bot()

    async def door(user: str, mid: str):
        return await admit(redis, keys, s, bot, _msg(mid, user=user), s.queue_name, 0)

    assert (await door("u1", "a")).admitted and (await door("u2", "b")).admitted
    third, again, other = await door("u3", "c"), await door("u3", "d"), await door("u4", "e")
    assert not third.admitted and third.notice is not None
    assert third.notice.startswith("You've reached this workspace's message limit")
    assert not again.admitted and again.notice is None
    assert not other.admitted and other.notice is not None


async def test_a_flood_refused_at_the_door_leaves_only_its_dedupe_markers(settings, redis):
    """Redis memory stays bounded under a flood: one user sends 1,000 messages against
    a limit of 5 per window. Five are queued, the first refusal gets its notice job and
    the rest are refused quietly; every refused message leaves only its small dedupe
    marker (24 h), and nothing else grows with the flood."""
    s = settings.model_copy(
        update={
            "app": "tests.traffic_bot:bot",
            "user_requests_per_window": 5,
            "user_window_s": 86_400,
        }
    )
    keys = Keys(s.key_prefix)
    pool = await connect_queue(s)
    try:
        outcomes = [
            await accept_message(pool, s, _msg(f"f{i}", channel="flood", text=f"spam {i}"))
            for i in range(1000)
        ]
    finally:
        await pool.aclose()
    assert outcomes[:5] == [Accepted.QUEUED] * 5
    assert outcomes[5] is Accepted.REFUSED
    assert set(outcomes[6:]) == {Accepted.REFUSED_QUIETLY}
    assert all(o.refused for o in outcomes[5:])
    found = [k.decode() async for k in redis.scan_iter(match=f"*{s.key_prefix}:*", count=1000)]
    markers = [k for k in found if k.startswith(keys.dedupe("web", ""))]
    others = [k for k in found if k not in set(markers)]
    assert len(markers) == 1000  # each delivery is marked seen, so a retry is a duplicate
    # Five reply jobs (with their door checks: four wait behind the first), one
    # refusal notice job, and a fixed handful of counters, clocks and lines.
    jobs = [k.split(":", 3)[3] for k in others if k.startswith("arq:job:")]
    assert sorted(j.split(":", 1)[0] for j in jobs if not j.startswith("door:")) == [
        "refused",
        *["reply"] * 5,
    ], jobs
    assert len([j for j in jobs if j.startswith("door:")]) <= 5, jobs
    assert len(others) < 30, others
    marker_bytes = [await redis.memory_usage(k) or 0 for k in markers[:50]]
    assert max(marker_bytes) < 200, marker_bytes
    other_bytes = sum([await redis.memory_usage(k) or 0 for k in others])
    assert other_bytes < 64 * 1024, other_bytes
    assert await redis.zcard(s.queue_name) == 5

"""Traffic control pieces against a real Redis, in this process (fast)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import pytest
from arq.worker import Retry
from click.testing import CliRunner

from core.errors import LLMRateLimitedError, LLMTransientError, LLMUnavailableError
from core.framework.bot import Bot, LaneRule
from core.infra.redis import Keys
from core.llm.budget import LLMBudget, unavailable_text
from core.llm.client import Completion
from core.messages import IncomingMessage
from core.traffic.cache import ResponseCache, cache_digest, clear_cache
from core.traffic.control import Traffic
from core.traffic.lanes import choose_lane, priority_ms
from core.traffic.ordering import ConversationBusy, acquire_conversation, register_arrival
from core.traffic.queue import arq_job_id, connect_queue, enqueue_reply
from core.traffic.ratelimit import RateLimiter, limits_for
from tests.traffic_bot import bot as traffic_bot


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


async def test_conversation_serves_messages_in_arrival_order(settings, redis):
    keys = Keys(settings.key_prefix)
    s = settings.model_copy(update={"order_wait_in_job_s": 0.1})
    first, second = _msg("m1"), _msg("m2")
    await register_arrival(redis, keys, first)
    await register_arrival(redis, keys, second)
    # The second message's job is picked up first: it must wait for the first.
    with pytest.raises(ConversationBusy):
        await acquire_conversation(redis, keys, s, second, second.job_id)
    lock = await acquire_conversation(redis, keys, s, first, first.job_id)
    with pytest.raises(ConversationBusy):
        await acquire_conversation(redis, keys, s, second, second.job_id)
    await lock.release()
    lock2 = await acquire_conversation(redis, keys, s, second, second.job_id)
    await lock2.release()
    assert await redis.zcard(keys.conv_pending(first.conversation_id)) == 0


async def test_lock_of_a_dead_holder_expires_and_the_next_message_goes_on(settings, redis):
    keys = Keys(settings.key_prefix)
    s = settings.model_copy(update={"order_wait_in_job_s": 3.0, "conversation_lock_ttl_s": 0.5})
    first, second = _msg("m1"), _msg("m2")
    await register_arrival(redis, keys, first)
    await register_arrival(redis, keys, second)
    lock = await acquire_conversation(redis, keys, s, first, first.job_id)
    # Simulate a killed worker: renewal stops, nothing releases.
    await lock.lock.stop_renewing()
    started = time.monotonic()
    # Within order_wait_in_job_s (3 s), or acquire_conversation raises ConversationBusy.
    lock2 = await acquire_conversation(redis, keys, s, second, second.job_id)
    assert time.monotonic() - started > 0.3, "the dead holder's lock was not honoured"
    await lock2.release()


async def test_lock_is_renewed_while_the_holder_works(settings, redis):
    keys = Keys(settings.key_prefix)
    s = settings.model_copy(update={"order_wait_in_job_s": 0.0, "conversation_lock_ttl_s": 0.3})
    first, second = _msg("m1"), _msg("m2")
    lock = await acquire_conversation(redis, keys, s, first, first.job_id)
    await asyncio.sleep(1.0)
    with pytest.raises(ConversationBusy):
        await acquire_conversation(redis, keys, s, second, second.job_id)
    await lock.release()


async def test_rate_limit_counts_atomically_and_gives_one_notice_per_window(settings, redis):
    limiter = RateLimiter(redis, Keys(settings.key_prefix))
    s = settings.model_copy(update={"user_requests_per_window": 5, "user_window_s": 86_400})
    limits = limits_for(s, Bot(), _msg("x"))
    verdicts = await asyncio.gather(*(limiter.check(_msg(f"m{i}"), limits) for i in range(20)))
    assert sum(v.allowed for v in verdicts) == 5
    refused = [v for v in verdicts if not v.allowed]
    assert sum(v.first_notice for v in refused) == 1
    assert all(0 < v.retry_after_s <= 86_400 for v in refused)
    other_user = await limiter.check(_msg("y", user="u2"), limits)
    assert other_user.allowed


async def test_tokens_per_day_limit_stops_the_user(settings, redis):
    limiter = RateLimiter(redis, Keys(settings.key_prefix))
    s = settings.model_copy(update={"user_tokens_per_day": 100})
    limits = limits_for(s, Bot(), _msg("x"))
    assert (await limiter.check(_msg("a"), limits)).allowed
    await limiter.record_tokens(_msg("a"), 150)
    v = await limiter.check(_msg("b"), limits)
    assert not v.allowed and v.scope == "user:tokens" and v.first_notice


async def test_admin_users_are_exempt_and_bot_overrides_limits(settings):
    s = settings.model_copy(update={"admin_users": ["boss"], "user_requests_per_window": 2})
    assert limits_for(s, Bot(), _msg("a", user="boss")).user_requests is None
    assert limits_for(s, Bot(), _msg("a")).user_requests == 2
    bot = Bot(limits={"user_requests_per_window": 7})
    assert limits_for(s, bot, _msg("a")).user_requests == 7


def test_lane_rules_pick_the_first_match_and_lanes_order_by_score(settings):
    bot = Bot(
        lanes=[
            LaneRule("high", words=["billing"]),
            LaneRule("high", users=["boss"]),
            LaneRule("high", commands=True),
            LaneRule("bulk", tenants=["cheap"]),
            LaneRule("high", dm=True),
        ],
    )
    assert choose_lane(bot, _msg("a", text="A Billing question")) == "high"
    assert choose_lane(bot, _msg("a", user="boss")) == "high"
    assert choose_lane(bot, _msg("a", text="/ask hi")) == "high"
    assert choose_lane(bot, _msg("a", tenant="cheap", is_dm=True)) == "bulk"
    assert choose_lane(bot, _msg("a", is_dm=True)) == "high"
    assert choose_lane(bot, _msg("a", text="billingual")) == "default"
    assert priority_ms(settings, "high", 100_000) < priority_ms(settings, "default", 100_000)
    assert priority_ms(settings, "default", 100_000) < priority_ms(settings, "bulk", 100_000)


def test_cache_digest_normalises_text_and_separates_tenants():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there "}]
    same = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    params = {"max_tokens": 10, "temperature": None}
    a = cache_digest("t1", "bot", "m", params, msgs)
    assert a == cache_digest("t1", "bot", "m", {"max_tokens": 10}, same)
    assert a != cache_digest("t2", "bot", "m", params, msgs)
    assert a != cache_digest("t1", "bot", "m", {"max_tokens": 11}, msgs)
    assert a != cache_digest("t1", "other", "m", params, msgs)


async def test_single_flight_computes_once_for_concurrent_callers(settings, redis):
    keys = Keys(settings.key_prefix)
    cache = ResponseCache(redis, keys, settings)
    calls = 0

    async def compute() -> Completion:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)
        return Completion(text="answer", model="m", finish_reason="stop")

    key = cache.key("t1", "d" * 64)
    results = await asyncio.gather(
        *(cache.single_flight(key, f"job{i}", compute) for i in range(20))
    )
    assert calls == 1
    assert all(c.text == "answer" for c, _ in results)
    assert sum(not cached for _, cached in results) == 1
    assert await clear_cache(redis, keys, "t2") == 0
    assert await clear_cache(redis, keys, "t1") == 1


async def test_failed_leader_hands_over_to_a_waiter(settings, redis):
    cache = ResponseCache(redis, Keys(settings.key_prefix), settings)
    calls = 0

    async def compute() -> Completion:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        if calls == 1:
            raise LLMTransientError("boom")
        return Completion(text="second try", model="m", finish_reason="stop")

    key = cache.key("t1", "e" * 64)
    results = await asyncio.gather(
        *(cache.single_flight(key, f"job{i}", compute) for i in range(3)), return_exceptions=True
    )
    assert sum(isinstance(r, LLMTransientError) for r in results) == 1
    assert calls == 2


async def test_budget_serves_the_line_by_priority_within_the_rate(settings, redis):
    s = settings.model_copy(update={"llm_rpm": 120, "llm_budget_headroom": 1.0})
    budget = LLMBudget(redis, Keys(settings.key_prefix), s)
    await budget.acquire("first", 0, 1)
    # A 429 empties the bucket and closes it for a moment: everyone below waits in line.
    await budget.failed(LLMRateLimitedError("429", retry_after_s=0.2))
    order: list[str] = []

    async def one(name: str, prio: int) -> None:
        await budget.acquire(name, prio, 1)
        order.append(name)

    started = time.monotonic()
    await asyncio.gather(one("bulk", 3000), one("default", 2000), one("high", 1000))
    elapsed = time.monotonic() - started
    assert order == ["high", "default", "bulk"]
    # 120 rpm = one every 0.5 s, after the 0.2 s the 429 asked for.
    assert elapsed > 1.2
    stats = await budget.stats()
    assert stats["calls"] == 4 and stats["calls_in_backlog"] >= 2 and stats["rate_limited"] == 1


async def test_breaker_opens_after_repeated_failures_and_closes_again(settings, redis):
    s = settings.model_copy(update={"breaker_failures": 3, "breaker_open_s": 0.5})
    budget = LLMBudget(redis, Keys(settings.key_prefix), s)
    for _ in range(3):
        await budget.failed(LLMTransientError("500"))
    with pytest.raises(LLMUnavailableError) as err:
        await budget.acquire("a", 0, 1)
    assert err.value.retry_in_s is not None and 0 < err.value.retry_in_s <= 0.5
    await asyncio.sleep(0.6)
    # Half-open: one probe goes; others still get the short reply until it succeeds.
    await budget.acquire("probe", 0, 1)
    with pytest.raises(LLMUnavailableError):
        await budget.acquire("b", 0, 1)
    # The probe fails: open again at once, without waiting for 3 failures.
    await budget.failed(LLMTransientError("500"))
    with pytest.raises(LLMUnavailableError):
        await budget.acquire("b", 0, 1)
    await asyncio.sleep(0.6)
    await budget.acquire("probe2", 0, 1)
    await budget.succeeded(Completion(text="ok", model="m"))
    await budget.acquire("b", 0, 1)
    await budget.acquire("c", 0, 1)
    assert (await budget.stats())["breaker_opens"] == 2
    assert unavailable_text(90) == (
        "The assistant is unavailable right now; please try again in 2 minutes."
    )


def test_cache_clear_command_deletes_one_tenants_answers(settings, redis_url, monkeypatch):
    import redis as sync_redis

    from core.settings import get_settings
    from sluice.cli import main

    client = sync_redis.Redis.from_url(redis_url)
    try:
        keys = Keys(settings.key_prefix)
        client.set(keys.cache("t1", "a"), "x")
        client.set(keys.cache("t2", "b"), "x")
        monkeypatch.setenv("REDIS_URL", redis_url)
        monkeypatch.setenv("SLUICE_KEY_PREFIX", settings.key_prefix)
        get_settings.cache_clear()
        result = CliRunner().invoke(main, ["cache", "clear", "--tenant", "t1"])
        assert result.exit_code == 0, result.output
        assert "deleted 1" in result.output
        assert client.get(keys.cache("t1", "a")) is None
        assert client.get(keys.cache("t2", "b")) == b"x"
    finally:
        get_settings.cache_clear()
        client.close()


async def test_budget_learns_the_limit_from_headers_and_only_lowers_the_bucket(settings, redis):
    budget = LLMBudget(redis, Keys(settings.key_prefix), settings)
    await budget.acquire("first", 0, 1)  # nothing known yet: granted
    headers = {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "3",
    }
    await budget.succeeded(Completion(text="a", model="m", headers=headers))
    # 3 left (the provider's word), then one per 0.62 s (100 rpm x 0.97).
    started = time.monotonic()
    for i in range(4):
        await budget.acquire(f"m{i}", 0, 1)
    assert time.monotonic() - started > 0.3
    headers["x-ratelimit-remaining-requests"] = "90"
    await budget.succeeded(Completion(text="a", model="m", headers=headers))
    bucket = await redis.hget(f"{settings.key_prefix}:llm:bucket", "rl")
    assert float(bucket) < 2, "a later, higher 'remaining' never raises the bucket"


async def test_budget_holds_requests_to_the_tokens_per_minute(settings, redis):
    s = settings.model_copy(
        update={"llm_tpm": 600, "llm_budget_headroom": 1.0, "queued_notice_after_s": 0}
    )
    budget = LLMBudget(redis, Keys(settings.key_prefix), s)
    told: list[tuple[str, float]] = []

    def on_queued(name: str) -> Callable[[float], Awaitable[None]]:
        async def tell(wait_s: float) -> None:
            told.append((name, wait_s))

        return tell

    started = time.monotonic()
    for i in range(3):
        await budget.acquire(f"m{i}", 0, 200, on_queued(f"m{i}"))
    # Granted at the first ask: none of the three was put in line.
    assert told == []
    await budget.acquire("m3", 0, 20, on_queued("m3"))  # 600 tpm = 10 tokens/s: ~2 s
    assert [name for name, _ in told] == ["m3"] and told[0][1] > 0, told
    assert time.monotonic() - started > 1.5


async def test_a_waiting_message_lends_its_lane_and_is_woken_at_its_place(settings, redis):
    """A busy conversation parks the later job instead of sending it to the back of the
    queue; the earlier message inherits its better score (queue and LLM budget line),
    and the release puts the parked job back at its own lane's place."""
    s = settings.model_copy(
        update={
            "app": "tests.traffic_bot:bot",
            "order_wait_in_job_s": 0.05,
            "order_defer_s": 300.0,
            "queued_notice_after_s": 0,
        }
    )
    keys = Keys(s.key_prefix)
    pool = await connect_queue(s)
    first = _msg("m1", text="how do I set up the widget?")
    second = _msg("m2", text="billing: why was I charged twice?")
    try:
        assert await enqueue_reply(pool, s, first)
        assert await enqueue_reply(pool, s, second)
    finally:
        await pool.aclose()
    queue = s.queue_name
    first_id, second_id = arq_job_id(s, first), arq_job_id(s, second)
    score_first = await redis.zscore(queue, first_id)
    score_second = await redis.zscore(queue, second_id)
    # High lane: 40 s more head start than default, less the user's fair step (10 s)
    # for a second queued message.
    assert score_second < score_first - 20_000
    # The first message already waits in the LLM budget's line at its own score.
    await redis.zadd(keys.llm("waiters"), {first.job_id: score_first})

    traffic = Traffic(redis, s, traffic_bot)
    second_high = second.model_copy(update={"lane": "high"})
    with pytest.raises(Retry) as parked:
        async with traffic.in_turn(second_high, second.job_id):
            raise AssertionError("the second message must not answer before the first")
    assert parked.value.defer_score is None  # arq keeps the score park() set
    now_ms = time.time() * 1000
    # Parked: out of reach for order_defer_s, not at the back of the line.
    assert await redis.zscore(queue, second_id) > now_ms + 200_000
    # The first message inherited the high lane's score, in the queue and the budget line.
    assert await redis.zscore(queue, first_id) <= score_second + 1000
    assert await redis.zscore(keys.llm("waiters"), first.job_id) <= score_second + 1000
    # ... and keeps it when it joins that line later (it may only just have started).
    lent = float(await redis.get(keys.llm_lent(first.job_id)))
    assert lent <= score_second + 1000
    await redis.zrem(keys.llm("waiters"), first.job_id)
    budget = LLMBudget(redis, keys, s.model_copy(update={"llm_rpm": 60}))
    await redis.hset(keys.llm("bucket"), mapping={"rl": "0", "ts": int(time.time() * 1000)})
    waiting = asyncio.create_task(budget.acquire(first.job_id, int(score_first), 10))
    await asyncio.sleep(0.2)
    assert await redis.zscore(keys.llm("waiters"), first.job_id) == lent
    waiting.cancel()
    await redis.zrem(keys.llm("waiters"), first.job_id)

    async with traffic.in_turn(first, first.job_id) as turn:
        assert turn.may_run
    # The release woke the parked job: back at (about) its high-lane score.
    woken = await redis.zscore(queue, second_id)
    assert woken < time.time() * 1000 - 30_000
    async with traffic.in_turn(second_high, second.job_id) as turn:
        assert turn.may_run and not turn.merged
    assert not await redis.exists(keys.conv_wake(first.conversation_id))


async def _three_queued(settings, redis, tag: str):
    """Three messages of one conversation queued (the third a billing question): the
    settings, keys, messages, arq ids and their queue scores."""
    s = settings.model_copy(
        update={
            "app": "tests.traffic_bot:bot",
            "order_wait_in_job_s": 0.0,
            "queued_notice_after_s": 0,
        }
    )
    msgs = [
        _msg(f"{tag}1", text="first question"),
        _msg(f"{tag}2", text="second question"),
        _msg(f"{tag}3", text="billing question"),
    ]
    pool = await connect_queue(s)
    try:
        for m in msgs:
            assert await enqueue_reply(pool, s, m)
    finally:
        await pool.aclose()
    ids = [arq_job_id(s, m) for m in msgs]
    before = [await redis.zscore(s.queue_name, i) for i in ids]
    return s, Keys(s.key_prefix), msgs, ids, before


async def test_a_parked_message_lends_its_score_to_every_earlier_one(settings, redis):
    """A heavy user's billing question behind two of their earlier questions: both move up."""
    s, keys, msgs, ids, before = await _three_queued(settings, redis, "c")
    traffic = Traffic(redis, s, traffic_bot)
    with pytest.raises(Retry):
        async with traffic.in_turn(msgs[2].model_copy(update={"lane": "high"}), msgs[2].job_id):
            raise AssertionError("the third message must wait")
    after = [await redis.zscore(s.queue_name, i) for i in ids]
    assert after[0] <= before[2] + 1000 and after[1] <= before[2] + 1000
    assert after[0] < before[0] - 30_000 and after[1] < before[1] - 30_000
    for m in msgs[:2]:
        assert float(await redis.get(keys.llm_lent(m.job_id))) <= before[2] + 1000


async def test_a_parked_earlier_message_keeps_parked_and_takes_the_lent_score_when_woken(
    settings, redis
):
    """Lending a score to an earlier message that is parked itself does not un-park it
    (it would only find the conversation busy and park again, lending back): the
    better score goes into its wake entry, and it takes it when it is woken."""
    s, keys, msgs, ids, before = await _three_queued(settings, redis, "p")
    traffic = Traffic(redis, s, traffic_bot)
    with pytest.raises(Retry):  # the second waits for the first: parked
        async with traffic.in_turn(msgs[1], msgs[1].job_id):
            raise AssertionError("the second message must wait")
    parked_score = await redis.zscore(s.queue_name, ids[1])
    assert parked_score > before[1]
    with pytest.raises(Retry):
        async with traffic.in_turn(msgs[2].model_copy(update={"lane": "high"}), msgs[2].job_id):
            raise AssertionError("the third message must wait")
    # The first (not parked) moves up in its queue; the parked second stays parked...
    assert await redis.zscore(s.queue_name, ids[0]) <= before[2] + 1000
    assert await redis.zscore(s.queue_name, ids[1]) == parked_score
    wake_key = keys.conv_wake(msgs[1].conversation_id)
    wake = json.loads(await redis.hget(wake_key, msgs[1].job_id))
    assert float(wake[2]) <= before[2] + 1000
    # Its own look again (the park's safety net) finds it still busy: parked again,
    # keeping the lent score.
    with pytest.raises(Retry):
        async with traffic.in_turn(msgs[1], msgs[1].job_id):
            raise AssertionError("the second message must still wait")
    assert json.loads(await redis.hget(wake_key, msgs[1].job_id))[2] == wake[2]
    # ...until the first is answered: woken, it goes back at the lent score.
    lock = await acquire_conversation(redis, keys, s, msgs[0], msgs[0].job_id)
    await lock.release()
    assert await redis.zscore(s.queue_name, ids[1]) <= before[2] + 1000

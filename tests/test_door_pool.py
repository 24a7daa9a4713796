"""The door's estimate with a provider pool (``SLUICE_PROVIDERS``), on a real Redis: a
new message behind a backlog gets its queued notice at once, with a wait computed from
every provider's rate and bucket; a provider closed after a 429 or with its breaker
open does not count while another is up; a started job stands in its provider's line;
and a parked job lends its score in every provider's line."""

from __future__ import annotations

import time
from typing import Any

import pytest
from arq.jobs import Job
from arq.worker import Retry
from redis.asyncio import Redis

from core.infra.redis import Keys
from core.infra.serializer import deserialize
from core.llm.pool import budget_lines
from core.messages import IncomingMessage
from core.settings import Settings, parse_providers
from core.traffic.control import Traffic
from core.traffic.door import estimate_line, line_of_job
from core.traffic.queue import arq_job_id, connect_queue, enqueue_reply, notice_queue_name
from tests.traffic_bot import bot as traffic_bot

RPM = 60  # per provider: 0.97 requests a second each with the default headroom
BACKLOG = 40


def _msg(mid: str, **kw: object) -> IncomingMessage:
    fields: dict[str, object] = {
        "platform": "web",
        "tenant": "t1",
        "channel": f"c-{mid}",
        "user": f"u-{mid}",
        "message_id": mid,
        "text": "hello",
    }
    fields.update(kw)
    return IncomingMessage.model_validate(fields)


def _pool_settings(settings: Settings, **update: Any) -> Settings:
    entries = [
        {
            "name": name,
            "base_url": f"http://127.0.0.1:9/{name}/v1",
            "api_key": f"sk-{name}-secret-0123456789",
            "models": [settings.model],
            "rpm": RPM,
        }
        for name in ("east", "west")
    ]
    return settings.model_copy(
        update={
            "providers": parse_providers(entries, ""),
            "queued_notice_after_s": 1.0,
            "max_wait_s": 3600.0,
            **update,
        }
    )


async def _now_ms(redis: Redis) -> int:
    sec, usec = await redis.time()
    return int(sec) * 1000 + int(usec) // 1000


def _bucket(s: Settings, provider: str) -> str:
    line = next(b for b in budget_lines(Keys(s.key_prefix), s) if b.label == provider)
    return line.keys.llm("bucket")


async def _empty_buckets(redis: Redis, s: Settings) -> None:
    now_ms = await _now_ms(redis)
    for name in ("east", "west"):
        await redis.hset(_bucket(s, name), mapping={"rl": 0, "ts": now_ms})  # type: ignore[misc]


async def _backlog(redis: Redis, s: Settings) -> None:
    """``BACKLOG`` reply jobs queued long ago, none started (the budget is the limit)."""
    for i in range(BACKLOG):
        await redis.zadd(s.queue_name, {f"{s.key_prefix}:old-{i}": 1_000 + i})


async def _notice_wait(redis: Redis, s: Settings, msg: IncomingMessage) -> tuple[int, int]:
    """The place and wait the door put in ``msg``'s queued-notice job."""
    job = Job(
        f"{s.key_prefix}:door:{msg.job_id}",
        redis,
        _queue_name=notice_queue_name(s),
        _deserializer=deserialize,
    )
    info = await job.info()
    assert info is not None, "no queued notice was enqueued at the door"
    assert info.function == "door_check"
    _payload, place, wait_s, _try_cache = info.args
    return int(place), int(wait_s)


async def _enqueue(s: Settings, msg: IncomingMessage) -> None:
    pool = await connect_queue(s)
    try:
        assert await enqueue_reply(pool, s, msg)
    finally:
        await pool.aclose()


async def test_a_new_message_behind_a_backlog_gets_a_notice_from_every_providers_rate(
    settings, redis
):
    s = _pool_settings(settings, llm_rpm=None)
    await _empty_buckets(redis, s)
    await _backlog(redis, s)
    rate = RPM * s.llm_budget_headroom / 60  # one provider, requests a second

    both = _msg("m1")
    await _enqueue(s, both)
    place, wait_s = await _notice_wait(redis, s, both)
    assert place == BACKLOG + 1
    # 40 ahead at both providers' rate (the buckets refill a little meanwhile).
    assert BACKLOG / (2 * rate) - 3 <= wait_s <= round(BACKLOG / (2 * rate)), wait_s

    # West meets a 429 with a long retry-after: only east counts while it is up.
    now_ms = await _now_ms(redis)
    await redis.hset(_bucket(s, "west"), "blocked", now_ms + 600_000)  # type: ignore[misc]
    one = _msg("m2")
    await _enqueue(s, one)
    place, wait_s = await _notice_wait(redis, s, one)
    assert place == BACKLOG + 2
    assert (BACKLOG + 1) / rate - 3 <= wait_s <= round((BACKLOG + 1) / rate), wait_s

    # East's breaker opens too: nothing is up; the wait starts when the first reopens
    # (east, in 30 s), at both providers' rate from then on.
    keys = Keys(s.key_prefix)
    east = next(b for b in budget_lines(keys, s) if b.label == "east")
    await redis.set(east.keys.llm("breaker:open"), "1", px=30_000)
    line = await estimate_line(redis, keys, s, s.queue_name, 10**15, queued=False)
    assert line.place == BACKLOG + 3 and line.wait_s is not None
    assert 25 + (BACKLOG + 2) / (2 * rate) - 3 <= line.wait_s <= 30 + (BACKLOG + 2) / (2 * rate)


async def test_without_a_pool_the_estimate_reads_the_one_budget(settings, redis):
    s = settings.model_copy(update={"llm_rpm": 120, "queued_notice_after_s": 1.0})
    keys = Keys(s.key_prefix)
    assert [b.keys.llm("bucket") for b in budget_lines(keys, s)] == [keys.llm("bucket")]
    now_ms = await _now_ms(redis)
    await redis.hset(keys.llm("bucket"), mapping={"rl": 0, "ts": now_ms})  # type: ignore[misc]
    await _backlog(redis, s)
    msg = _msg("m1")
    await _enqueue(s, msg)
    rate = 120 * s.llm_budget_headroom / 60
    place, wait_s = await _notice_wait(redis, s, msg)
    assert place == BACKLOG + 1
    assert BACKLOG / rate - 3 <= wait_s <= round(BACKLOG / rate), wait_s


async def test_a_started_job_stands_in_its_providers_line_at_that_providers_rate(settings, redis):
    from arq.constants import in_progress_key_prefix

    s = _pool_settings(settings)
    keys = Keys(s.key_prefix)
    await _empty_buckets(redis, s)
    msg = _msg("m1")
    await _enqueue(s, msg)
    arq_id = arq_job_id(s, msg)
    await redis.set(in_progress_key_prefix + arq_id, b"1", ex=60)
    west = next(b for b in budget_lines(keys, s) if b.label == "west")
    others = {f"j{i}": i for i in range(5)}
    await redis.zadd(west.keys.llm("waiters"), {**others, msg.job_id: 10})
    line = await line_of_job(redis, keys, s, s.queue_name, arq_id, msg.job_id)
    rate = RPM * s.llm_budget_headroom / 60
    assert line is not None and line.place == 6
    assert line.wait_s == pytest.approx(6 / rate)
    # Granted: the answer is being made, the notice is left to it.
    await redis.zrem(west.keys.llm("waiters"), msg.job_id)
    assert await line_of_job(redis, keys, s, s.queue_name, arq_id, msg.job_id) is None


async def test_a_parked_job_lends_its_score_in_every_providers_line(settings, redis):
    s = _pool_settings(
        settings,
        app="tests.traffic_bot:bot",
        order_wait_in_job_s=0.05,
        order_defer_s=300.0,
        queued_notice_after_s=0,
    )
    keys = Keys(s.key_prefix)
    first = _msg("m1", channel="c1", user="u1", text="how do I set up the widget?")
    second = _msg("m2", channel="c1", user="u1", text="billing: why was I charged twice?")
    await _enqueue(s, first)
    await _enqueue(s, second)
    lines = [b.keys.llm("waiters") for b in budget_lines(keys, s)]
    assert len(lines) == 2
    # The first message already waits in west's line, far back.
    west = lines[1]
    await redis.zadd(west, {first.job_id: time.time() * 1000})
    traffic = Traffic(redis, s, traffic_bot)
    second_high = second.model_copy(update={"lane": "high"})
    with pytest.raises(Retry):
        async with traffic.in_turn(second_high, second.job_id):
            raise AssertionError("the second message must not answer before the first")
    score_second = await redis.zscore(s.queue_name, arq_job_id(s, second))
    lent = float(await redis.get(keys.llm_lent(first.job_id)))
    # West's line moved the first message up to the score lent, at once.
    assert await redis.zscore(west, first.job_id) == lent
    assert lent < time.time() * 1000 - 3_000_000  # a queue band score, hours back
    assert score_second > time.time() * 1000  # parked
    # East's line never had it: nothing was added there.
    assert await redis.zscore(lines[0], first.job_id) is None

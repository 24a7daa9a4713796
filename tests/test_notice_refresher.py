"""The queued notices' refresher (workers.refresher) on a real Redis: due notices are
claimed once across workers, kept or dropped as the refresh says, bounded, and purged
with their user's messages."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from redis.asyncio import Redis

from core.history.admin import _purge_notice_refreshes
from core.infra.redis import Keys
from core.messages import IncomingMessage
from core.settings import Settings
from workers import refresher as refresher_mod
from workers.refresher import Refresher, drop_refresh, schedule_refresh


def _msg(mid: str, user: str = "u1", tenant: str = "t1") -> IncomingMessage:
    return IncomingMessage.model_validate(
        {
            "platform": "web",
            "tenant": tenant,
            "channel": "c1",
            "user": user,
            "message_id": mid,
            "text": "hello",
        }
    )


class Recorder:
    """A refresh function that records its calls and answers ``keep``."""

    def __init__(self, keep: bool = True, fail: bool = False) -> None:
        self.keep = keep
        self.fail = fail
        self.calls: list[str] = []

    async def __call__(self, ctx: dict[str, Any], msg: IncomingMessage) -> bool:
        self.calls.append(msg.message_id)
        await asyncio.sleep(0)  # a real refresh awaits Redis and the platform
        if self.fail:
            raise RuntimeError("the platform said no")
        return self.keep


async def _make_due(redis: Redis, keys: Keys, *job_ids: str) -> None:
    """Score the notices as due now (they were scheduled one interval ahead)."""
    await redis.zadd(keys.notice_refresh(), dict.fromkeys(job_ids, 0))


def _refresher(settings: Settings, redis: Redis, fn: Recorder) -> Refresher:
    return Refresher(settings, Keys(settings.key_prefix), {"redis": redis}, fn)


async def _state(redis: Redis, keys: Keys, job_id: str) -> tuple[Any, Any, Any]:
    return (
        await redis.zscore(keys.notice_refresh(), job_id),
        await redis.hget(keys.notice_refresh_payload(), job_id),  # type: ignore[misc]
        await redis.hget(keys.notice_refresh_count(), job_id),  # type: ignore[misc]
    )


async def test_a_notice_is_due_one_interval_after_it_is_scheduled(settings, redis):
    keys = Keys(settings.key_prefix)
    msg = _msg("m1")
    now_s, _ = await redis.time()
    await schedule_refresh(redis, keys, settings, msg, 0)
    score, raw, n = await _state(redis, keys, msg.job_id)
    every_ms = settings.notice_refresh_every_s * 1000
    assert now_s * 1000 + every_ms <= score <= (now_s + 60) * 1000 + every_ms
    assert IncomingMessage.model_validate_json(raw) == msg
    assert int(n) == 0
    fn = Recorder()
    claimed, delay = await _refresher(settings, redis, fn).sweep()
    # Not due yet: nothing refreshed, and the sweep sleeps until it is (at most one
    # interval).
    assert (claimed, fn.calls) == (0, [])
    assert refresher_mod.MIN_SLEEP_MS / 1000 <= delay <= settings.notice_refresh_every_s


async def test_a_due_notice_is_refreshed_and_due_again_one_interval_later(settings, redis):
    keys = Keys(settings.key_prefix)
    msg = _msg("m1")
    await schedule_refresh(redis, keys, settings, msg, 0)
    await _make_due(redis, keys, msg.job_id)
    fn = Recorder(keep=True)
    before_s, _ = await redis.time()
    claimed, delay = await _refresher(settings, redis, fn).sweep()
    assert (claimed, fn.calls) == (1, ["m1"])
    score, raw, n = await _state(redis, keys, msg.job_id)
    assert score >= before_s * 1000 + settings.notice_refresh_every_s * 1000
    assert raw is not None and int(n) == 1
    # Its next refresh is the earliest due: the sweep sleeps about one interval.
    assert settings.notice_refresh_every_s - 60 < delay <= settings.notice_refresh_every_s
    claimed, _ = await _refresher(settings, redis, fn).sweep()
    assert (claimed, fn.calls) == (0, ["m1"])  # not due again yet


async def test_a_notice_whose_answer_started_leaves_the_set(settings, redis):
    keys = Keys(settings.key_prefix)
    msg = _msg("m1")
    await schedule_refresh(redis, keys, settings, msg, 3)
    await _make_due(redis, keys, msg.job_id)
    fn = Recorder(keep=False)
    assert (await _refresher(settings, redis, fn).sweep())[0] == 1
    assert fn.calls == ["m1"]
    assert await _state(redis, keys, msg.job_id) == (None, None, None)


async def test_a_failing_refresh_is_logged_and_not_tried_again(settings, redis, caplog):
    keys = Keys(settings.key_prefix)
    msg = _msg("m1")
    await schedule_refresh(redis, keys, settings, msg, 0)
    await _make_due(redis, keys, msg.job_id)
    fn = Recorder(fail=True)
    with caplog.at_level(logging.WARNING, logger="workers.refresher"):
        assert (await _refresher(settings, redis, fn).sweep())[0] == 1
    assert "not refreshed" in caplog.text and "the platform said no" in caplog.text
    assert await _state(redis, keys, msg.job_id) == (None, None, None)


async def test_refreshes_stop_at_the_maximum(settings, redis, monkeypatch):
    monkeypatch.setattr(refresher_mod, "MAX_REFRESHES", 2)
    keys = Keys(settings.key_prefix)
    msg = _msg("m1")
    await schedule_refresh(redis, keys, settings, msg, 0)
    fn = Recorder(keep=True)
    r = _refresher(settings, redis, fn)
    for _ in range(4):
        await _make_due(redis, keys, msg.job_id)
        await r.sweep()
    assert fn.calls == ["m1", "m1"]
    assert await _state(redis, keys, msg.job_id) == (None, None, None)


async def test_two_workers_sweeping_at_once_refresh_each_notice_once(settings, redis):
    keys = Keys(settings.key_prefix)
    msgs = [_msg(f"m{i}") for i in range(30)]
    for m in msgs:
        await schedule_refresh(redis, keys, settings, m, 0)
    await _make_due(redis, keys, *(m.job_id for m in msgs))
    a, b = Recorder(), Recorder()
    got = await asyncio.gather(
        _refresher(settings, redis, a).sweep(), _refresher(settings, redis, b).sweep()
    )
    assert sum(c for c, _ in got) == 30
    assert sorted(a.calls + b.calls) == sorted(m.message_id for m in msgs)


async def test_a_full_batch_sweeps_again_at_once(settings, redis, monkeypatch):
    monkeypatch.setattr(refresher_mod, "BATCH", 2)
    keys = Keys(settings.key_prefix)
    msgs = [_msg(f"m{i}") for i in range(3)]
    for m in msgs:
        await schedule_refresh(redis, keys, settings, m, 0)
    await _make_due(redis, keys, *(m.job_id for m in msgs))
    fn = Recorder()
    r = _refresher(settings, redis, fn)
    assert await r.sweep() == (2, 0.0)
    claimed, delay = await r.sweep()
    assert claimed == 1 and delay >= refresher_mod.MIN_SLEEP_MS / 1000
    assert sorted(fn.calls) == ["m0", "m1", "m2"]


async def test_the_running_loop_refreshes_a_due_notice(settings, redis):
    keys = Keys(settings.key_prefix)
    msg = _msg("m1")
    await schedule_refresh(redis, keys, settings, msg, 0)
    await _make_due(redis, keys, msg.job_id)
    fn = Recorder(keep=False)
    task = asyncio.create_task(_refresher(settings, redis, fn).run())
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while (await _state(redis, keys, msg.job_id))[0] is not None:
            assert asyncio.get_running_loop().time() < deadline, "never refreshed"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert fn.calls == ["m1"]


async def test_drop_and_purge_remove_a_users_refreshes_only(settings, redis):
    keys = Keys(settings.key_prefix)
    mine = [_msg("m1", user="u1"), _msg("m2", user="u1", tenant="t2")]
    other = _msg("m3", user="u2")
    for m in [*mine, other]:
        await schedule_refresh(redis, keys, settings, m, 0)
    assert await _purge_notice_refreshes(redis, keys, "u1", None) == 2
    for m in mine:
        assert await _state(redis, keys, m.job_id) == (None, None, None)
    assert (await _state(redis, keys, other.job_id))[1] is not None
    assert await _purge_notice_refreshes(redis, keys, None, "t9") == 0
    await drop_refresh(redis, keys, other.job_id)
    assert await _state(redis, keys, other.job_id) == (None, None, None)


@pytest.fixture(autouse=True)
async def _clean(settings: Settings, redis: Redis) -> Any:
    yield
    keys = Keys(settings.key_prefix)
    await redis.delete(
        keys.notice_refresh(), keys.notice_refresh_payload(), keys.notice_refresh_count()
    )


async def test_refresh_notice_shows_the_new_estimate_then_stops_and_old_jobs_hand_over(
    settings, redis
):
    """The real refresh (workers.traffic_jobs.refresh_notice) on a web message whose
    reply job waits in the queue: a fresh "queued" event in its outbox, and True (keep
    refreshing); once its answer is being made, False and nothing shown. A refresh job
    queued by an older version (notify_queued with refresh > 0) refreshes once and
    schedules the rest here."""
    import json as json_mod

    from arq.constants import in_progress_key_prefix

    from core.framework.bot import Bot
    from core.traffic.control import Traffic
    from core.traffic.queue import arq_job_id, connect_queue, enqueue_reply
    from workers.traffic_jobs import notify_queued, refresh_notice

    s = settings.model_copy(update={"llm_rpm": 60, "queued_notice_after_s": 0})
    keys = Keys(s.key_prefix)
    pool = await connect_queue(s)
    ctx: dict[str, Any] = {
        "settings": s,
        "redis": pool,
        "traffic": Traffic(pool, s, Bot()),
        "responders": {},
        "responders_lock": asyncio.Lock(),
    }
    msgs = [_msg(f"m{i}") for i in range(3)]
    msgs = [m.model_copy(update={"channel": f"c{i}"}) for i, m in enumerate(msgs)]
    try:
        for m in msgs:
            assert await enqueue_reply(pool, s, m)
        last = msgs[-1]

        async def queued_events() -> list[dict[str, Any]]:
            entries = await redis.xrange(keys.web_outbox(last.channel))
            events = [json_mod.loads(fields[b"data"]) for _, fields in entries]
            return [e for e in events if e["type"] == "queued"]

        before = len(await queued_events())
        assert await refresh_notice(ctx, last) is True
        shown = await queued_events()
        assert len(shown) == before + 1 and shown[-1]["place"] == 3

        await notify_queued(ctx, last.model_dump(mode="json"), 0, None, 7)
        assert len(await queued_events()) == before + 2
        score, raw, n = await _state(redis, keys, last.job_id)
        assert score is not None and raw is not None and int(n) == 7  # the 8th is next

        # Its job started, holds the conversation and is not waiting for budget: the
        # answer is being made, the notice is left to it.
        await redis.set(in_progress_key_prefix + arq_job_id(s, last), b"1", ex=60)
        await redis.set(keys.conv_lock(last.conversation_id), last.job_id, ex=60)
        assert await refresh_notice(ctx, last) is False
        assert len(await queued_events()) == before + 2
    finally:
        for factory in ctx["responders"].values():
            await factory.close()
        await redis.delete(
            *(keys.web_outbox(m.channel) for m in msgs),
            in_progress_key_prefix + arq_job_id(s, msgs[-1]),
            keys.conv_lock(msgs[-1].conversation_id),
        )
        await pool.aclose()

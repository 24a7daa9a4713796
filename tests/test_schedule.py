"""Who is served first under overload: fair shares, tenant weights, the target wait.

Real Redis throughout; the poll and the sweep run in a real ``SluiceWorker`` (in
process) or a real ``sluice worker`` process against the simulator.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from arq.worker import Retry, func
from pydantic import ValidationError
from redis.asyncio import Redis

from core.infra.redis import Keys
from core.infra.scripts import Lua
from core.infra.serializer import deserialize, serialize
from core.messages import IncomingMessage
from core.settings import Settings
from core.traffic.control import Traffic
from core.traffic.ordering import ConversationBusy, acquire_conversation, register_arrival
from core.traffic.queue import arq_job_id, connect_queue, enqueue_reply, notice_queue_name
from core.traffic.schedule import (
    BAND_SHIFT_MS,
    IN_TIME_BAND_MS,
    LATE_BAND_MS,
    OVER_SHARE_BAND_MS,
    SWEEP_LUA,
    deadlines_key,
    fair_key,
)
from tests.helpers import wait_until
from tests.traffic_bot import bot as traffic_bot
from tests.traffic_util import done_event, wait_done
from workers.settings import SluiceWorker


def _msg(mid: str, *, user: str, channel: str | None = None, **kw: Any) -> IncomingMessage:
    fields: dict[str, Any] = {
        "platform": "web",
        "tenant": "t1",
        "channel": channel or f"c-{mid}",
        "user": user,
        "message_id": mid,
        "text": f"question {mid}",
    }
    fields.update(kw)
    return IncomingMessage.model_validate(fields)


def _s(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(
        update={"app": "tests.traffic_bot:bot", "queued_notice_after_s": 0, **update}
    )


async def _enqueue(s: Settings, *msgs: IncomingMessage) -> None:
    pool = await connect_queue(s)
    try:
        for m in msgs:
            assert await enqueue_reply(pool, s, m)
    finally:
        await pool.aclose()


async def _queue_order(redis: Redis, s: Settings) -> list[str]:
    ids = await redis.zrange(s.queue_name, 0, -1)
    prefix = f"{s.key_prefix}:reply:web:"
    return [i.decode().removeprefix(prefix).split(":", 1)[1] for i in ids]


async def test_a_heavy_users_later_messages_wait_behind_other_users_first_ones(settings, redis):
    s = _s(settings)
    heavy = [_msg(f"h{i}", user="heavy") for i in range(1, 5)]
    light = [_msg(f"l{i}", user=f"light{i}") for i in range(1, 4)]
    # The heavy user sends four at once, then three other users one each.
    await _enqueue(s, *heavy, *light)
    assert await _queue_order(redis, s) == ["h1", "l1", "l2", "l3", "h2", "h3", "h4"]
    # Heavy users are served later, not refused: every message is queued.
    assert await redis.zcard(s.queue_name) == 7


async def test_fair_shares_off_keeps_arrival_order(settings, redis):
    s = _s(settings, fair_step_s=0)
    await _enqueue(s, *[_msg(f"h{i}", user="heavy") for i in (1, 2)], _msg("l1", user="light"))
    assert await _queue_order(redis, s) == ["h1", "h2", "l1"]


async def test_a_users_clock_key_is_short_whatever_the_ids(settings, redis):
    s = _s(settings)
    odd = _msg("o1", user="\u202e" + "x" * 10_000, tenant="ｔ" * 300)
    await _enqueue(s, odd)
    key = fair_key(Keys(s.key_prefix), odd.tenant, odd.user)
    assert len(key) < len(s.key_prefix) + 50
    assert await redis.exists(key)


async def test_messages_over_a_users_share_wait_behind_everyone_in_time(settings, redis):
    """Under overload a user with more than one step of messages waiting ahead is over
    its share: its further messages go behind every message that can still make its
    target, and behind every late one too (the over-share band), so a heavy sender's
    extras do not take the quota from light users' messages. Still queued, still
    answered later, in fair order."""
    s = _s(settings)
    heavy = [_msg(f"h{i}", user="heavy") for i in range(1, 5)]
    await _enqueue(s, *heavy)
    await _enqueue(s, _msg("l1", user="light1"))
    now_ms = time.time() * 1000
    in_time, late, over = [], [], []
    for m in [*heavy, _msg("l1", user="light1")]:
        score = await redis.zscore(s.queue_name, arq_job_id(s, m))
        assert score < now_ms  # every band is due for arq
        if score > now_ms - OVER_SHARE_BAND_MS - 120_000:
            over.append(m.message_id)
        elif score > now_ms - LATE_BAND_MS - 120_000:
            late.append(m.message_id)
        else:
            in_time.append(m.message_id)
    # The first two (no more than one step ahead) are in time, like the light user's.
    assert in_time == ["h1", "h2", "l1"] and late == [] and over == ["h3", "h4"]
    assert await _queue_order(redis, s) == ["h1", "l1", "h2", "h3", "h4"]
    index = {i.decode() for i in await redis.zrange(deadlines_key(s.queue_name), 0, -1)}
    assert index == {arq_job_id(s, m) for m in (heavy[0], heavy[1], _msg("l1", user="light1"))}


async def test_tenants_share_by_weight(settings, redis):
    s = _s(settings, tenant_weights={"big": 3.0})
    big = [_msg(f"b{i}", user="ub", tenant="big") for i in range(1, 5)]
    small = [_msg(f"s{i}", user="us", tenant="small") for i in range(1, 5)]
    interleaved = [m for pair in zip(big, small, strict=True) for m in pair]
    await _enqueue(s, *interleaved)
    # Weight 3: the big tenant's user steps 10/3 s per message, the small one's 10 s.
    assert await _queue_order(redis, s) == ["b1", "s1", "b2", "b3", "b4", "s2", "s3", "s4"]


async def test_a_message_that_cannot_make_its_target_is_queued_behind_those_that_can(
    settings, redis
):
    """With a 60 s step, the user's second message starts a minute later: it cannot be
    answered within the 60 s target anyway, so it waits in the late band, behind a
    message that arrives after it but can still make its target."""
    s = _s(settings, fair_step_s=60.0)
    await _enqueue(s, _msg("a1", user="a"), _msg("a2", user="a"), _msg("b1", user="b"))
    assert await _queue_order(redis, s) == ["a1", "b1", "a2"]
    now_ms = time.time() * 1000
    late = await redis.zscore(s.queue_name, arq_job_id(s, _msg("a2", user="a")))
    in_time = await redis.zscore(s.queue_name, arq_job_id(s, _msg("b1", user="b")))
    # Both bands are due for arq (in the past); only in-time messages wait for the sweep.
    assert in_time < now_ms - IN_TIME_BAND_MS + 60_000 < now_ms - LATE_BAND_MS
    assert now_ms - LATE_BAND_MS - 60_000 < late < now_ms
    index = await redis.zrange(deadlines_key(s.queue_name), 0, -1)
    assert {i.decode() for i in index} == {
        arq_job_id(s, _msg("a1", user="a")),
        arq_job_id(s, _msg("b1", user="b")),
    }


started: list[str] = []


async def _record(ctx: dict[str, Any], payload: dict[str, Any]) -> str:
    started.append(payload["message_id"])
    return str(payload["message_id"])


async def test_the_poll_moves_late_messages_behind_those_still_in_time(settings, redis):
    """A message that turned late while queued goes after one that is still in time;
    then it is still started."""
    s = _s(settings)
    short = _s(settings, target_wait_s=0.4, target_margin_s=0.3)  # late after 0.1 s
    old = _msg("old", user="o")
    await _enqueue(short, old)
    await wait_until(lambda: time.time() > old.ts + 0.2, 5, "the old message to turn late")
    await _enqueue(s, _msg("new", user="n"))
    assert await _queue_order(redis, s) == ["old", "new"]  # not swept yet
    pool = await connect_queue(s)
    started.clear()
    worker = SluiceWorker(
        functions=[func(_record, name="reply")],
        queue_name=s.queue_name,
        redis_pool=pool,
        max_jobs=1,
        handle_signals=False,
        burst=True,
        poll_delay=0.01,
        job_serializer=serialize,
        job_deserializer=deserialize,
    )
    try:
        await worker.main()
    finally:
        await pool.aclose()
    assert started == ["new", "old"]
    # The sweep took the old message out of the deadline index when it moved it.
    index = {i.decode() for i in await redis.zrange(deadlines_key(s.queue_name), 0, -1)}
    assert arq_job_id(s, old) not in index


async def test_high_lane_still_overtakes_within_the_in_time_band(settings, redis):
    s = _s(settings)
    await _enqueue(
        s,
        _msg("d1", user="a"),
        _msg("d2", user="b"),
        _msg("hi", user="c", text="billing: charged twice"),
        _msg("bulk", user="d", text="weekly digest please"),
    )
    assert await _queue_order(redis, s) == ["hi", "d1", "d2", "bulk"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tenant_weights", "T1=0"),
        ("tenant_weights", "T1=-2"),
        ("tenant_weights", "T1=lots"),
        ("tenant_weights", "T1=inf"),
        ("tenant_weights", "T1"),
        ("tenant_weights", "\u202eT1=2"),
        ("tenant_weights", "x" * 10_000 + "=2"),
        ("target_wait_s", "0"),
        ("target_wait_s", "-60"),
        ("target_wait_s", "86400"),
        ("target_margin_s", "-1"),
        ("target_margin_s", "60"),
        ("fair_step_s", "-1"),
        ("fair_step_s", "100000"),
    ],
)
def test_bad_scheduling_settings_are_refused_at_start_up(monkeypatch, field, value):
    monkeypatch.setenv(f"SLUICE_{field.upper()}", value)
    with pytest.raises(ValidationError) as e:
        Settings(_env_file=None)
    text = str(e.value)
    assert "target" in text or field in text
    assert len(text) < 3000  # a 10 kB id is not echoed in full


def test_tenant_weights_parse_from_the_environment(monkeypatch):
    monkeypatch.setenv("SLUICE_TENANT_WEIGHTS", "T1=3, T2=0.5")
    assert Settings(_env_file=None).tenant_weights == {"T1": 3.0, "T2": 0.5}


async def test_a_worker_serves_fair_shares_lanes_and_in_time_messages_first_in_order(
    settings, llm_sim, worker_process, redis
):
    """One real worker with one slot, so the queue's order is the order served: a
    billing question first (high lane), then everyone's first message, then the heavy
    user's second one; then the late ones in fair order, still answered: the message
    that had already missed its target, and the heavy user's messages over its share
    (three of the five in one conversation, answered in order, each seeing the one
    before)."""
    s = _s(settings)
    short = _s(settings, target_wait_s=0.4, target_margin_s=0.3)
    run = uuid.uuid4().hex[:6]
    old = _msg(f"old{run}", user="o", channel=f"o{run}")
    await _enqueue(short, old)
    await wait_until(lambda: time.time() > old.ts + 0.2, 5, "the old message to turn late")
    conv = f"hc{run}"
    heavy = [_msg(f"h{i}{run}", user="h", channel=conv) for i in (1, 2, 3)]
    heavy += [_msg(f"h{i}{run}", user="h", channel=f"h{i}{run}") for i in (4, 5)]
    light = [_msg(f"l{i}{run}", user=f"l{i}", channel=f"l{i}{run}") for i in (1, 2, 3)]
    high = _msg(f"hi{run}", user="b", channel=f"hi{run}", text=f"billing {run}: charged twice")
    await _enqueue(s, *heavy, *light, high)
    worker_process({"SLUICE_WORKER_MAX_JOBS": "1", "SLUICE_APP": "tests.traffic_bot:bot"})
    everything = [old, *heavy, *light, high]
    events = await wait_done(
        redis, s.key_prefix, [(m.channel, m.message_id) for m in everything], timeout_s=60
    )
    assert all(done_event(events[m.message_id])["kind"] == "answer" for m in everything)
    asked = [r["messages"][-1]["content"] for r in llm_sim.requests()]
    expected = [high, heavy[0], *light, heavy[1], old, *heavy[2:]]
    assert asked == [m.text for m in expected]
    # The conversation's later messages saw the earlier answers.
    prompts = {r["messages"][-1]["content"]: r["messages"] for r in llm_sim.requests()}
    third = prompts[heavy[2].text]
    assert [m["content"] for m in third if m["role"] == "user"] == [m.text for m in heavy[:3]]


async def test_a_light_users_late_message_goes_before_a_heavy_users_extras_sent_earlier(
    settings, llm_sim, worker_process, redis
):
    """Under a backlog (one worker slot, everything queued), a heavy user's messages
    over its share wait in a band of their own after the late one: a light user's
    message that already missed its target is answered before them, though they were
    sent earlier and their fair starts come before its own. The heavy user is still
    answered, in order within its conversation."""
    s = _s(settings, fair_step_s=1.0)
    short = _s(settings, fair_step_s=1.0, target_wait_s=0.4, target_margin_s=0.3)
    run = uuid.uuid4().hex[:6]
    heavy = [_msg(f"h{i}{run}", user="h", channel=f"hc{run}") for i in (1, 2, 3, 4)]
    sent = time.time()
    await _enqueue(s, *heavy)
    # Over its share: the third and fourth (fair starts at about 2 and 3 s after the first).
    assert time.time() - sent < 0.9, "the heavy user's messages were not sent at once"
    extras = [await redis.zscore(s.queue_name, arq_job_id(s, m)) for m in heavy[2:]]
    now_ms = time.time() * 1000
    assert all(now_ms - OVER_SHARE_BAND_MS - 120_000 < x < now_ms for x in extras), extras
    # The light user writes once the heavy extras' fair starts have passed, and its
    # message turns late (a short target) before the worker starts.
    await wait_until(lambda: time.time() > sent + 3.2, 10, "the heavy extras' fair starts")
    light = _msg(f"l{run}", user="l", channel=f"l{run}")
    await _enqueue(short, light)
    await wait_until(lambda: time.time() > light.ts + 0.2, 5, "the light message to turn late")
    worker_process({"SLUICE_WORKER_MAX_JOBS": "1", "SLUICE_APP": "tests.traffic_bot:bot"})
    everything = [*heavy, light]
    events = await wait_done(
        redis, s.key_prefix, [(m.channel, m.message_id) for m in everything], timeout_s=60
    )
    assert all(done_event(events[m.message_id])["kind"] == "answer" for m in everything)
    asked = [r["messages"][-1]["content"] for r in llm_sim.requests()]
    assert asked == [m.text for m in (heavy[0], heavy[1], light, heavy[2], heavy[3])]
    # Within the heavy user's conversation, each answer saw the ones before.
    prompts = {r["messages"][-1]["content"]: r["messages"] for r in llm_sim.requests()}
    last = prompts[heavy[3].text]
    assert [m["content"] for m in last if m["role"] == "user"] == [m.text for m in heavy]


async def test_a_late_messages_queued_notice_never_waits_behind_reply_jobs(settings, redis):
    """A late-band message's notice (its door check) is queued on the reserved path,
    not among the reply jobs, so it does not wait for the backlog, in-time or late; and
    notices there go by arrival."""
    s = _s(settings, fair_step_s=60.0, llm_rpm=60, queued_notice_after_s=0.5)
    await redis.hset(f"{s.key_prefix}:llm:bucket", mapping={"rl": "0", "ts": "0"})
    msgs = [_msg("a1", user="a"), _msg("b1", user="b"), _msg("c1", user="c")]
    await _enqueue(s, *msgs, _msg("a2", user="a"), _msg("d1", user="d"))
    replies = dict(await redis.zrange(s.queue_name, 0, -1, withscores=True))
    assert len(replies) == 5
    assert not [k for k in replies if b":door:" in k or b":queued:" in k]
    door = dict(await redis.zrange(notice_queue_name(s), 0, -1, withscores=True))
    late = door[f"{s.key_prefix}:door:{_msg('a2', user='a').job_id}".encode()]
    later = door[f"{s.key_prefix}:door:{_msg('d1', user='d').job_id}".encode()]
    assert late <= later


async def test_a_parked_in_time_message_lifts_its_late_earlier_one_into_the_in_time_band(
    settings, redis
):
    """Score lending with bands: a late message that an in-time message of the same
    conversation waits for moves up to the in-time message's score (queue and LLM
    budget line), or the in-time one would wait behind the whole in-time band."""
    order = {"order_wait_in_job_s": 0.05, "order_defer_s": 300.0}
    s = _s(settings, **order)
    short = _s(settings, target_wait_s=0.4, target_margin_s=0.3, **order)
    first = _msg("m1", user="u", channel="conv")
    await _enqueue(short, first)
    await wait_until(lambda: time.time() > first.ts + 0.2, 5, "the first message to turn late")
    sweep = Lua(
        redis,
        SWEEP_LUA + "return sweep(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), 100)",
    )
    moved = await sweep(
        [s.queue_name, deadlines_key(s.queue_name)], [int(time.time() * 1000), BAND_SHIFT_MS]
    )
    assert moved == 1
    first_id = arq_job_id(s, first)
    late_score = await redis.zscore(s.queue_name, first_id)
    assert late_score > time.time() * 1000 - LATE_BAND_MS - 120_000
    second = _msg("m2", user="v", channel="conv")
    await _enqueue(s, second)
    second_score = await redis.zscore(s.queue_name, arq_job_id(s, second))
    assert second_score < late_score - BAND_SHIFT_MS + 120_000  # in time, well ahead

    traffic = Traffic(redis, s, traffic_bot)
    with pytest.raises(Retry):
        async with traffic.in_turn(second, second.job_id):
            raise AssertionError("the second message must not answer before the first")
    lifted = await redis.zscore(s.queue_name, first_id)
    assert lifted <= second_score + 1000
    lent = float(await redis.get(Keys(s.key_prefix).llm_lent(first.job_id)))
    assert lent <= second_score + 1000


release = asyncio.Event()


async def _hold(ctx: dict[str, Any], payload: dict[str, Any]) -> str:
    started.append(payload["message_id"])
    await release.wait()
    return str(payload["message_id"])


async def test_late_messages_never_take_the_last_slots_kept_for_in_time_ones(settings, redis):
    """Five slots, six late messages: the poll starts four and keeps one slot free; a
    message that can still make its target then starts at once in that slot."""
    s = _s(settings)
    short = _s(settings, target_wait_s=0.4, target_margin_s=0.3)
    late = [_msg(f"late{i}", user=f"u{i}") for i in range(6)]
    await _enqueue(short, *late)
    await wait_until(lambda: time.time() > late[-1].ts + 0.2, 5, "the messages to turn late")
    pool = await connect_queue(s)
    started.clear()
    release.clear()
    worker = SluiceWorker(
        functions=[func(_hold, name="reply")],
        queue_name=s.queue_name,
        redis_pool=pool,
        max_jobs=5,
        handle_signals=False,
        job_serializer=serialize,
        job_deserializer=deserialize,
    )
    try:
        head = await pool.zrangebyscore(s.queue_name, "-inf", "+inf", start=0, num=1)
        await worker.start_jobs(head)
        await wait_until(lambda: len(started) == 4, 10, "four late messages to start")
        await worker.start_jobs(head)  # the reserved slot stays free for in-time work
        assert len(worker.tasks) == 4
        await _enqueue(s, _msg("fresh", user="new"))
        await worker.start_jobs(head)
        await wait_until(lambda: "fresh" in started, 10, "the in-time message to start")
        assert len(worker.tasks) == 5
        assert sorted(started[:4]) == [f"late{i}" for i in range(4)]
    finally:
        release.set()
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        await pool.aclose()


async def test_a_job_whose_earlier_message_has_not_started_steps_aside_at_once(settings, redis):
    """Waiting in the slot only helps while the earlier message is being answered; an
    earlier message that has not started (e.g. late while this one is in time) would
    hold the slot for SLUICE_ORDER_WAIT_IN_JOB_S for nothing."""
    keys = Keys(settings.key_prefix)
    s = settings.model_copy(update={"order_wait_in_job_s": 3600.0})
    first, second = _msg("m1", user="u", channel="c"), _msg("m2", user="u", channel="c")
    await register_arrival(redis, keys, first)
    await register_arrival(redis, keys, second)
    with pytest.raises(ConversationBusy) as busy:
        # Far below the hour it would otherwise wait in its slot.
        await asyncio.wait_for(acquire_conversation(redis, keys, s, second, second.job_id), 60)
    assert busy.value.blocker == first.job_id


async def test_a_duplicate_delivery_never_pushes_a_late_job_out_of_reach(settings, redis):
    """A platform retry that reaches enqueue_reply again re-lists the message in the
    deadline index; the next sweep must not move the already-late job a second time
    (into the future, where arq would not start it for an hour)."""
    # No fair step: the duplicate would otherwise start 10 s later, late on arrival.
    short = _s(settings, target_wait_s=0.4, target_margin_s=0.3, fair_step_s=0)
    msg = _msg("dup", user="u")
    await _enqueue(short, msg)
    await wait_until(lambda: time.time() > msg.ts + 0.2, 5, "the message to turn late")
    sweep = Lua(
        redis,
        SWEEP_LUA + "return sweep(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), 100)",
    )
    keys = [short.queue_name, deadlines_key(short.queue_name)]
    assert await sweep(keys, [int(time.time() * 1000), BAND_SHIFT_MS]) == 1
    pool = await connect_queue(short)
    try:
        assert not await enqueue_reply(pool, short, msg)  # the duplicate: no new job
    finally:
        await pool.aclose()
    await wait_until(lambda: time.time() > msg.ts + 0.4, 5, "the duplicate's entry to fall due")
    assert await sweep(keys, [int(time.time() * 1000), BAND_SHIFT_MS]) == 0
    assert await redis.zscore(short.queue_name, arq_job_id(short, msg)) < time.time() * 1000

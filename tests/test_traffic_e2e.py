"""Traffic control end to end: web adapters -> Redis -> `sluice worker` processes -> simulator."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid

import aiohttp
import pytest

from core.infra.redis import Keys
from core.messages import IncomingMessage
from core.traffic.control import lane_counts, snapshot
from core.traffic.queue import enqueue_reply
from tests.helpers import Proc, base_env, free_port, settings_env, wait_port
from tests.traffic_util import done_event, outbox, p95, post, wait_done
from tests.webchat import open_session, web_adapter, with_web_secret

LANES = ("high", "default", "bulk")


def _session() -> str:
    return f"s{uuid.uuid4().hex[:16]}"


async def test_two_messages_10ms_apart_are_answered_in_order_and_the_second_sees_the_first(
    settings, llm_sim, worker_process, redis
):
    llm_sim.configure(first_token_latency_s=0.3)
    worker_process()
    worker_process()
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        sessions = [await open_session(http, base) for _ in range(3)]
        sent: dict[str, tuple[str, str]] = {}
        for session in sessions:
            first = await post(http, base, session, f"first question of {session}")
            await asyncio.sleep(0.01)
            second = await post(http, base, session, f"second question of {session}")
            sent[session] = (first, second)
        flat = [(s, m) for s, pair in sent.items() for m in pair]
        events = await wait_done(redis, settings.key_prefix, flat, timeout_s=30)
    prompts = {r["messages"][-1]["content"]: r["messages"] for r in llm_sim.requests()}
    for session, (first, second) in sent.items():
        first_done = done_event(events[first])
        second_start = next(e for e in events[second] if e["type"] == "start")
        assert first_done["kind"] == "answer"
        assert first_done["at_ms"] <= second_start["at_ms"], "second answered before first"
        prompt = prompts[f"second question of {session}"]
        assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
        assert prompt[1]["content"] == f"first question of {session}"
        assert prompt[2]["content"] == first_done["text"]


@pytest.mark.slow
async def test_killed_worker_holding_a_conversation_does_not_strand_it(
    settings, llm_sim, worker_process, redis
):
    env = {"SLUICE_CONVERSATION_LOCK_TTL_S": "2", "SLUICE_JOB_TIMEOUT_S": "5"}
    workers = [worker_process(env), worker_process(env)]
    llm_sim.configure(mode="hang")
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        session = await open_session(http, base)
        first = await post(http, base, session, "a question the dead worker took")
        deadline = time.monotonic() + 10
        while llm_sim.stats()["requests"] < 1:
            assert time.monotonic() < deadline, "no worker called the model"
            await asyncio.sleep(0.05)
        holder = next(w for w in workers if f"message={first}" in w.output())
        survivor = next(w for w in workers if w is not holder)
        holder.kill(signal.SIGKILL)
        holder.popen.wait(5)
        llm_sim.configure(mode="normal")
        second = await post(http, base, session, "are you there?")
        events = await wait_done(redis, settings.key_prefix, [(session, second)], timeout_s=20)
        second_done = done_event(events[second])
        assert second_done["kind"] == "answer"
        assert f"message={second}" in survivor.output()
        # The killed job itself is run again by arq once its in-progress marker expires.
        events = await wait_done(redis, settings.key_prefix, [(session, first)], timeout_s=40)
        first_done = done_event(events[first])
        assert first_done["kind"] == "answer"
        # The conversation's lock freed when its TTL ran out after the kill, not when
        # the killed job came back: the second message was answered before that re-run.
        assert second_done["at_ms"] < first_done["at_ms"]


@pytest.mark.slow
async def test_user_over_the_limit_gets_one_notice_per_window_and_no_llm_call(
    settings, llm_sim, worker_process, redis, tmp_path
):
    limits = {"SLUICE_USER_REQUESTS_PER_WINDOW": "3", "SLUICE_USER_WINDOW_S": "3600"}
    worker_process(limits)
    worker_process(limits)
    # One web secret: a session opened at one adapter is taken by the other.
    env = {**base_env(), **settings_env(with_web_secret(settings)), **limits}
    ports = [free_port(), free_port()]
    adapters = [
        Proc(["web", "--port", str(p)], env, tmp_path / f"web-{i}.log") for i, p in enumerate(ports)
    ]
    try:
        for p in ports:
            wait_port(p)
        async with aiohttp.ClientSession() as http:
            first_base = f"http://127.0.0.1:{ports[0]}"
            session = await open_session(http, first_base)
            other = await open_session(http, first_base)
            ids = []
            for i in range(8):
                base = f"http://127.0.0.1:{ports[i % 2]}"
                ids.append(await post(http, base, session, f"question number {i}"))
                await asyncio.sleep(0.01)
            other_id = await post(http, f"http://127.0.0.1:{ports[1]}", other, "my turn")
            # Checked at the door (both adapters, one count in Redis): three answers, one
            # notice; the four later messages of the window are refused without a notice
            # of their own (no storm of notices), so only these five get a reply.
            sent = [(session, m) for m in ids[:4]] + [(other, other_id)]
            events = await wait_done(redis, settings.key_prefix, sent, timeout_s=40)
    finally:
        for a in adapters:
            a.stop()
    replies = [done_event(events[m]) for m in ids[:4]]
    answers = [r for r in replies if r["kind"] == "answer"]
    notices = [r for r in replies if r["kind"] == "notice" and "try again in" in r["text"]]
    assert len(answers) == 3
    assert len(notices) == 1, [r["text"] for r in replies]
    assert "min" in notices[0]["text"] or " s." in notices[0]["text"]
    for m in ids[4:]:
        refusal = f"{settings.key_prefix}:refused:reply:web:web:{m}"
        assert not await redis.exists(f"arq:job:{refusal}", f"arq:result:{refusal}")
        assert not await redis.exists(f"arq:job:{settings.key_prefix}:reply:web:web:{m}")
    assert done_event(events[other_id])["kind"] == "answer", "another user is not limited"
    user_prompts = [r["messages"][-1]["content"] for r in llm_sim.requests()]
    assert len(user_prompts) == 4 == llm_sim.stats()["completions"]


@pytest.mark.slow
async def test_fifty_identical_questions_cost_one_llm_call_and_tenants_never_share(
    settings, llm_sim, worker_process, redis
):
    llm_sim.configure(first_token_latency_s=0.5)
    app = {"SLUICE_APP": "tests.traffic_bot:bot"}
    worker_process(app)
    worker_process(app)
    question = "What are your opening hours?"
    async with web_adapter(settings) as (base, queue), aiohttp.ClientSession() as http:
        sessions = [await open_session(http, base) for _ in range(50)]
        ids = await asyncio.gather(*(post(http, base, s, question) for s in sessions))
        sent = list(zip(sessions, ids, strict=True))
        events = await wait_done(redis, settings.key_prefix, sent, timeout_s=30)
        replies = [done_event(events[m]) for m in ids]
        assert all(r["kind"] == "answer" for r in replies)
        assert len({r["text"] for r in replies}) == 1
        stats = llm_sim.stats()
        assert sum(r["cached"] for r in replies) == 49, (stats, [r["cached"] for r in replies])
        assert stats["completions"] == 1

        # Same words in another tenant, and in a channel that opted out: the model again.
        for tenant, channel in (("acme", _session()), ("web", "nocache")):
            msg = IncomingMessage(
                platform="web",
                tenant=tenant,
                channel=channel,
                user=channel,
                message_id=uuid.uuid4().hex,
                text=question,
            )
            assert await enqueue_reply(queue, settings, msg)
            got = await wait_done(
                redis, settings.key_prefix, [(channel, msg.message_id)], timeout_s=20
            )
            assert done_event(got[msg.message_id])["cached"] is False
        assert llm_sim.stats()["completions"] == 3
    for session, r in zip(sessions, replies, strict=True):
        raw = await redis.lrange(f"{settings.key_prefix}:hist:web:web:{session}:-", 0, -1)
        turns = [json.loads(t) for t in raw]
        assert [t["role"] for t in turns] == ["user", "assistant"]
        assert turns[1]["cached"] is r["cached"], "cached answers are marked in history"


async def _lane_load(settings, llm_sim, worker_process, redis, mode: str) -> dict[str, object]:
    """120 messages (15 high, 21 bulk, 84 default) in ~1 s against 6 worker slots.

    ``score``: one worker (6 slots) on the one queue ordered by lane score;
    ``per-lane``: one worker (2 slots) per lane queue, the same 6 slots in all.
    """
    llm_sim.configure(first_token_latency_s=0.08, tokens=4)
    app = {"SLUICE_APP": "tests.traffic_bot:bot", "SLUICE_LANE_QUEUES": mode}
    if mode == "score":
        worker_process({**app, "SLUICE_WORKER_MAX_JOBS": "6"})
    else:
        for lane in ("high", "default", "bulk"):
            lanes = f'["{lane}"]'
            worker_process({**app, "SLUICE_WORKER_MAX_JOBS": "2", "SLUICE_WORKER_LANES": lanes})
    lane_of = {}
    s = settings.model_copy(update={"app": "tests.traffic_bot:bot", "lane_queues": mode})
    started = time.monotonic()
    async with web_adapter(s) as (base, _), aiohttp.ClientSession() as http:
        sent = []
        for i in range(120):
            lane = "high" if i % 8 == 3 else "bulk" if i % 5 == 1 else "default"
            word = {"high": "billing", "bulk": "digest", "default": "question"}[lane]
            session = await open_session(http, base)
            mid = await post(http, base, session, f"{word} number {i}")
            lane_of[mid] = lane
            sent.append((session, mid))
            await asyncio.sleep(0.005)
        events = await wait_done(redis, settings.key_prefix, sent, timeout_s=90)
    total_s = time.monotonic() - started
    waits: dict[str, list[float]] = {"high": [], "default": [], "bulk": []}
    for _, mid in sent:
        ev = events[mid]
        user = next(e for e in ev if e["type"] == "user")
        start = next(e for e in ev if e["type"] == "start")
        waits[lane_of[mid]].append((start["at_ms"] - user["at_ms"]) / 1000)
        assert done_event(ev)["kind"] == "answer"
    result = {lane: p95(v) for lane, v in waits.items()}
    print(
        f"lanes mode={mode}: p95 wait high {result['high']:.2f}s "
        f"default {result['default']:.2f}s bulk {result['bulk']:.2f}s; "
        f"all {len(sent)} answered in {total_s:.1f}s"
    )
    assert len(waits["bulk"]) == sum(1 for v in lane_of.values() if v == "bulk")
    return {**result, "total_s": total_s}


async def test_high_lane_overtakes_under_saturation_and_bulk_still_progresses(
    settings, llm_sim, worker_process, redis
):
    got = await _lane_load(settings, llm_sim, worker_process, redis, "score")
    assert got["default"] > 1.0, "the test did not saturate the worker"
    assert got["high"] <= got["default"] / 5
    counts = await lane_counts(redis, Keys(settings.key_prefix))
    assert counts["high"] == {"enqueued": 15, "started": 15, "waiting": 0}
    assert counts["bulk"]["started"] == 21 and counts["default"]["started"] == 84


async def test_one_queue_per_lane_sends_each_lane_to_its_own_workers_and_answers_all(
    settings, llm_sim, worker_process, redis
):
    """``SLUICE_LANE_QUEUES=per-lane``: each lane's jobs run on that lane's workers only.
    How it compares with the score ordering under load is measured by
    ``sluice bench --scenario lanes`` (docs/traffic.md)."""
    app = {"SLUICE_APP": "tests.traffic_bot:bot", "SLUICE_LANE_QUEUES": "per-lane"}
    env = {lane: {**app, "SLUICE_WORKER_LANES": f'["{lane}"]'} for lane in LANES}
    workers = {lane: worker_process(env[lane], wait=False) for lane in LANES}
    for w in workers.values():
        w.wait_for_output("worker ready", timeout_s=90)
    s = settings.model_copy(update={"app": "tests.traffic_bot:bot", "lane_queues": "per-lane"})
    lane_of: dict[str, str] = {}
    async with web_adapter(s) as (base, _), aiohttp.ClientSession() as http:
        sent = []
        for i in range(12):
            lane = LANES[i % 3]
            word = {"high": "billing", "bulk": "digest", "default": "question"}[lane]
            session = await open_session(http, base)
            mid = await post(http, base, session, f"{word} number {i}")
            lane_of[mid] = lane
            sent.append((session, mid))
        events = await wait_done(redis, settings.key_prefix, sent, timeout_s=60)
    assert all(done_event(events[m])["kind"] == "answer" for _, m in sent)
    outputs = {lane: w.output() for lane, w in workers.items()}
    for mid, lane in lane_of.items():
        ran_on = [name for name, out in outputs.items() if f"message={mid} " in out]
        assert ran_on == [lane], (mid, lane, ran_on)
    counts = await lane_counts(redis, Keys(settings.key_prefix))
    assert {lane: counts[lane]["started"] for lane in LANES} == dict.fromkeys(LANES, 4)


async def test_breaker_opens_while_the_provider_is_down_and_calls_resume_after(
    settings, llm_sim, worker_process, redis
):
    env = {
        "SLUICE_BREAKER_FAILURES": "3",
        "SLUICE_BREAKER_OPEN_S": "4",
        "SLUICE_LLM_RETRIES": "0",
    }
    worker_process(env)
    llm_sim.configure(mode="down")
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:

        async def ask(text: str) -> dict[str, object]:
            session = await open_session(http, base)
            mid = await post(http, base, session, text)
            got = await wait_done(redis, settings.key_prefix, [(session, mid)], timeout_s=20)
            return done_event(got[mid])

        down_replies = [await ask(f"question {i} while down") for i in range(6)]
        calls_while_down = llm_sim.stats()["requests"]
        assert all(r["kind"] == "error" for r in down_replies)
        assert calls_while_down == 3, "no calls once the breaker is open"
        unavailable = [r for r in down_replies if "unavailable right now" in str(r["text"])]
        assert len(unavailable) >= 3
        assert "try again in 1 minute" in str(unavailable[-1]["text"])
        llm_sim.configure(mode="normal")
        await asyncio.sleep(4.2)
        back = await ask("are you back?")
        assert back["kind"] == "answer"
    assert llm_sim.stats()["completions"] == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_shared_budget_keeps_429s_rare_and_answers_every_message(
    settings, llm_sim, worker_process, redis
):
    """240 messages offered in 12 s to a provider limited to 120 requests/min.

    160 distinct questions and 80 repeats (different users asking what others asked),
    so ~160 LLM calls: ~116 at once (the bucket's burst), then ~44 paced by the shared
    budget at one per ~0.52 s: about 25 s in all.
    """
    llm_sim.configure(rpm=120, first_token_latency_s=0.05, tokens=8)
    env = {"SLUICE_LLM_RPM": "120"}
    worker_process(env)
    worker_process(env)
    questions = [f"distinct question {i}" for i in range(160)]
    texts = questions + [questions[i * 7 % 160] for i in range(80)]
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        sent = []
        started = time.monotonic()
        for i, text in enumerate(texts):
            session = await open_session(http, base)
            sent.append((session, await post(http, base, session, text)))
            delay = started + (i + 1) * 0.05 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        offered_s = time.monotonic() - started
        events = await wait_done(redis, settings.key_prefix, sent, timeout_s=240)
        total_s = time.monotonic() - started
    kinds = [done_event(events[m])["kind"] for _, m in sent]
    stats = llm_sim.stats()
    snap = await snapshot(redis, settings.model_copy(update={"llm_rpm": 120}))
    print(f"traffic snapshot: {snap}")
    # Every request the budget granted reached the simulator (a rare 429 included).
    assert snap["llm"]["calls"] == stats["requests"]
    assert snap["quota_use_in_backlog"] > 0.9
    budget = await redis.hgetall(f"{settings.key_prefix}:llm:stats")
    print(
        f"offered in {offered_s:.1f}s, all answered in {total_s:.1f}s; sim {stats}; budget {budget}"
    )
    assert kinds.count("answer") == 240
    assert stats["rate_limited"] <= 0.02 * stats["requests"]


@pytest.mark.slow
async def test_queued_message_shows_its_expected_wait_then_the_answer(
    settings, llm_sim, worker_process, redis
):
    env = {"SLUICE_LLM_RPM": "30", "SLUICE_QUEUED_NOTICE_AFTER_S": "1"}
    llm_sim.configure(tokens=3)
    worker_process(env)
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        # The first minute's budget is 29 calls (30 x headroom); 4 more wait ~2 s each.
        sessions = [await open_session(http, base) for _ in range(33)]
        ids = await asyncio.gather(*(post(http, base, s, f"q {s}") for s in sessions))
        sent = list(zip(sessions, ids, strict=True))
        events = await wait_done(redis, settings.key_prefix, sent, timeout_s=30)
    queued = [m for m in ids if any(e["type"] == "queued" for e in events[m])]
    assert queued, "a message over the budget should show that it is queued"
    ev = events[queued[0]]
    kinds = [e["type"] for e in ev]
    assert kinds.index("queued") < kinds.index("done")
    q = next(e for e in ev if e["type"] == "queued")
    assert q["wait_s"] >= 1
    assert done_event(ev)["kind"] == "answer"
    assert await outbox(redis, settings.key_prefix, sessions[0])


async def test_burst_of_quick_messages_from_one_user_is_answered_as_one_turn(
    settings, llm_sim, worker_process, redis
):
    worker_process({"SLUICE_APP": "tests.traffic_bot:burst_bot"})
    s = settings.model_copy(update={"app": "tests.traffic_bot:burst_bot"})
    async with web_adapter(s) as (base, _), aiohttp.ClientSession() as http:
        session = await open_session(http, base)
        burst = []
        for text in ("hi", "I have a question", "about invoices"):
            burst.append(await post(http, base, session, text))
            await asyncio.sleep(0.05)
        events = await wait_done(redis, settings.key_prefix, [(session, burst[0])], 20)
        assert done_event(events[burst[0]])["kind"] == "answer"
        await asyncio.sleep(0.5)
        later = await post(http, base, session, "and one more thing")
        events = await wait_done(redis, settings.key_prefix, [(session, later)], 20)
    assert not [e for m in burst[1:] for e in events.get(m, []) if e["type"] == "done"]
    # The page is told they were answered with the first (it drops their bubbles).
    assert [[e["type"] for e in events.get(m, [])][-1] for m in burst[1:]] == ["merged"] * 2
    prompts = [r["messages"] for r in llm_sim.requests()]
    assert len(prompts) == 2
    assert prompts[0][-1]["content"] == "hi\nI have a question\nabout invoices"
    assert [m["role"] for m in prompts[1]] == ["system", "user", "assistant", "user"]


@pytest.mark.slow
@pytest.mark.timeout(200)
async def test_provider_down_for_a_minute_opens_the_breaker_and_calls_resume_after(
    settings, llm_sim, worker_process, redis
):
    """The acceptance scenario at full length: 60 s of 500s, one message a second."""
    env = {"SLUICE_BREAKER_FAILURES": "3", "SLUICE_BREAKER_OPEN_S": "15"}
    worker_process(env)
    worker_process(env)
    llm_sim.configure(mode="down")
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        sent = []
        started = time.monotonic()
        while time.monotonic() - started < 60:
            session = await open_session(http, base)
            sent.append((session, await post(http, base, session, f"q{len(sent)}")))
            await asyncio.sleep(1.0)
        events = await wait_done(redis, settings.key_prefix, sent, timeout_s=60)
        calls_while_down = llm_sim.stats()["requests"]
        llm_sim.configure(mode="normal")
        replies = [done_event(events[m]) for _, m in sent]
        unavailable = [r for r in replies if "unavailable right now" in r["text"]]
        print(
            f"{len(sent)} messages while down: {calls_while_down} provider calls, "
            f"{len(unavailable)} 'unavailable' replies"
        )
        assert all(r["kind"] == "error" for r in replies)
        assert all("Traceback" not in r["text"] for r in replies)
        # Without the breaker: ~2 calls per message (one retry). With it: a few per period.
        assert calls_while_down <= len(sent) // 2
        assert len(unavailable) >= len(sent) * 2 // 3
        # Calls resume once the open period ends.
        deadline = time.monotonic() + 30
        while True:
            session = await open_session(http, base)
            mid = await post(http, base, session, "back?")
            got = await wait_done(redis, settings.key_prefix, [(session, mid)], timeout_s=20)
            if done_event(got[mid])["kind"] == "answer":
                break
            assert time.monotonic() < deadline, "calls never resumed"
            await asyncio.sleep(2)
    assert (await redis.hget(f"{settings.key_prefix}:llm:stats", "breaker_opens")) is not None


@pytest.mark.slow
async def test_budget_learns_the_providers_limit_from_its_headers(
    settings, llm_sim, worker_process, redis
):
    """No SLUICE_LLM_RPM: the first answer's x-ratelimit-* headers set the budget."""
    llm_sim.configure(rpm=120, tokens=4)
    worker_process()
    worker_process()
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        first = await open_session(http, base)
        mid = await post(http, base, first, "hello")
        await wait_done(redis, settings.key_prefix, [(first, mid)], timeout_s=20)
        sessions = [await open_session(http, base) for _ in range(130)]
        ids = await asyncio.gather(*(post(http, base, s, f"q {s}") for s in sessions))
        sent = list(zip(sessions, ids, strict=True))
        events = await wait_done(redis, settings.key_prefix, sent, timeout_s=60)
    assert all(done_event(events[m])["kind"] == "answer" for m in ids)
    stats = llm_sim.stats()
    assert stats["completions"] == 131
    assert stats["rate_limited"] <= 0.02 * stats["requests"]


@pytest.mark.slow
async def test_message_waiting_for_a_worker_is_told_its_expected_wait_at_once(
    settings, llm_sim, worker_process, redis
):
    """The line forms in the queue (5 worker slots), not in the budget: the adapter's
    enqueue estimates the wait and a notice job shows it before the reply job starts."""
    env = {
        "SLUICE_LLM_RPM": "60",
        "SLUICE_QUEUED_NOTICE_AFTER_S": "2",
        "SLUICE_WORKER_MAX_JOBS": "5",
    }
    llm_sim.configure(tokens=3)
    worker_process(env)
    s = settings.model_copy(update={"llm_rpm": 60, "queued_notice_after_s": 2.0})
    async with web_adapter(s) as (base, _), aiohttp.ClientSession() as http:
        sessions = [await open_session(http, base) for _ in range(66)]
        ids = []
        for session in sessions:  # in order, so that the last ones are last in line
            ids.append(await post(http, base, session, f"q {session}"))
        sent = list(zip(sessions, ids, strict=True))
        events = await wait_done(redis, settings.key_prefix, sent, timeout_s=40)
    last = events[ids[-1]]
    kinds = [e["type"] for e in last]
    assert "queued" in kinds, kinds
    assert kinds.index("queued") < kinds.index("start") < kinds.index("done")
    assert done_event(last)["kind"] == "answer"
    assert not any(e["type"] == "queued" for e in events[ids[0]])

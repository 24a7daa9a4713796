"""The door: a first visible response at once whatever the backlog, admission
control before enqueueing, one notice per window, cached answers at the door.

Real Redis, a real ``sluice worker`` process, the web adapter in this process and the
simulator. A backlog is made by closing the shared LLM budget (as a provider's 429 with
a long retry-after does) with ``SLUICE_WORKER_MAX_JOBS=1``: the one reply slot is then
held by a job waiting in the budget's line, so anything that needs a reply slot waits.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from core.settings import Settings
from tests.door_util import close_budget, empty_budget, open_budget, until
from tests.helpers import settings_env
from tests.traffic_util import done_event, outbox, wait_done
from tests.webchat import WebSession, open_session, web_adapter


async def _session(http: aiohttp.ClientSession, base: str) -> WebSession:
    return await open_session(http, base)


async def _post(
    http: aiohttp.ClientSession, base: str, session: WebSession, text: str
) -> dict[str, Any]:
    async with http.post(
        f"{base}/api/messages", json={"text": text}, headers=session.headers()
    ) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 202, body
        return body


def _door_settings(settings: Settings, **changes: Any) -> Settings:
    base = {"llm_rpm": 60, "queued_notice_after_s": 1.0, "worker_max_jobs": 1}
    return settings.model_copy(update={**base, **changes})


async def _events_of(redis: Redis, prefix: str, session: str, message_id: str) -> list[dict]:
    return [e for e in await outbox(redis, prefix, session) if e["message_id"] == message_id]


async def _refusal_queued(redis: Redis, prefix: str, arq_job_id: str) -> bool:
    """Whether a door refusal job was ever queued for this message (job or its result)."""
    rid = f"{prefix}:refused:{arq_job_id.split(':', 1)[1]}"
    return bool(await redis.exists(f"arq:job:{rid}", f"arq:result:{rid}"))


@pytest.mark.slow
async def test_notice_shows_while_no_worker_slot_is_free_and_its_estimate_is_refreshed(
    settings, llm_sim, worker_process, redis
):
    s = _door_settings(settings)
    worker_process(settings_env(s))
    await close_budget(redis, s.key_prefix, 120)
    async with web_adapter(s) as (base, _), aiohttp.ClientSession() as http:
        sessions = [await _session(http, base) for _ in range(3)]
        bodies = [await _post(http, base, x, f"question of {x}") for x in sessions]
        assert [b["refused"] for b in bodies] == [False] * 3, bodies
        assert all("notice" not in b and "duplicate" not in b for b in bodies), bodies
        ids = [b["message_id"] for b in bodies]
        # The first message's job holds the only reply slot, waiting for the budget.
        await until(
            lambda: redis.zscore(s.key_prefix + ":llm:waiters", f"reply:web:web:{ids[0]}"),
            20,
            "the first job waiting in the budget's line",
        )
        last, last_id = sessions[-1], ids[-1]

        async def notices() -> list[dict]:
            events = await _events_of(redis, s.key_prefix, last, last_id)
            return [e for e in events if e["type"] == "queued"]

        async def shown() -> bool:
            return bool(await notices())

        await until(shown, 20, "the queued notice of the last message")
        first = (await notices())[0]
        assert first["place"] == 3
        assert first["wait_s"] >= 60  # the budget is closed for ~2 min
        assert llm_sim.stats()["requests"] == 0

        async def refreshed() -> bool:
            return len(await notices()) >= 2

        await until(refreshed, 40, "a refreshed estimate")
        second = (await notices())[1]
        assert second["at_ms"] - first["at_ms"] >= s.notice_refresh_every_s * 1000 - 500
        assert second["wait_s"] < first["wait_s"], (first, second)
        assert second["place"] == 3

        await open_budget(redis, s.key_prefix)
        sent = list(zip(sessions, ids, strict=True))
        events = await wait_done(redis, s.key_prefix, sent, timeout_s=40)
    for mid in ids:
        kinds = [e["type"] for e in events[mid]]
        # The first one's job started at once (then waited for the budget): its notice
        # may come after "start", but always before the answer's text.
        assert kinds.index("queued") < kinds.index("delta") < kinds.index("done"), kinds
        assert done_event(events[mid])["kind"] == "answer"
    for mid in ids[1:]:
        kinds = [e["type"] for e in events[mid]]
        assert kinds.index("queued") < kinds.index("start"), kinds


async def test_message_behind_an_earlier_one_of_its_conversation_shows_a_notice_at_once(
    settings, llm_sim, worker_process, redis
):
    """A high-lane question right after a slow default-lane one of the same user: by
    its own score it is first in line (no wait of its own, a free slot and a full
    budget), yet it cannot start before the earlier answer is done. It shows a queued
    notice while the earlier answer is still being made, and the answers keep order."""
    s = _door_settings(settings, app="tests.traffic_bot:bot", worker_max_jobs=4)
    llm_sim.configure(first_token_latency_s=4.0)
    worker_process(settings_env(s))
    async with web_adapter(s) as (base, _), aiohttp.ClientSession() as http:
        session = await _session(http, base)
        first = await _post(http, base, session, "a slow first question")

        async def asked() -> bool:
            return bool(llm_sim.stats()["requests"] >= 1)

        await until(asked, 20, "the first question at the model")
        second = await _post(http, base, session, "an urgent billing question")
        assert (first["lane"], second["lane"]) == ("default", "high")
        sent = [(session, first["message_id"]), (session, second["message_id"])]
        events = await wait_done(redis, s.key_prefix, sent, timeout_s=40)
    first_done = done_event(events[first["message_id"]])
    later = events[second["message_id"]]
    kinds = [e["type"] for e in later]
    assert "queued" in kinds, kinds
    assert kinds.index("queued") < kinds.index("start") < kinds.index("done"), kinds
    notice = next(e for e in later if e["type"] == "queued")
    assert notice["at_ms"] < first_done["at_ms"], (notice, first_done)
    assert notice["wait_s"] >= s.order_wait_in_job_s  # one earlier answer to wait for
    assert done_event(later)["kind"] == "answer"
    # No notice for the first: it was first in line with nothing to wait for.
    assert "queued" not in [e["type"] for e in events[first["message_id"]]]
    prompts = {r["messages"][-1]["content"]: r["messages"] for r in llm_sim.requests()}
    assert [m["content"] for m in prompts["an urgent billing question"][1:3]] == [
        "a slow first question",
        first_done["text"],
    ]


async def test_message_over_max_wait_is_refused_at_once_with_one_notice_per_window(
    settings, llm_sim, worker_process, redis
):
    # A day-long limit window (notices count per window, aligned to the clock): no
    # window edge falls between the two refusals.
    s = _door_settings(settings, max_wait_s=10.0, user_window_s=86_400)
    worker_process(settings_env(s))
    await close_budget(redis, s.key_prefix, 120)
    async with web_adapter(s) as (base, _), aiohttp.ClientSession() as http:
        session = await _session(http, base)
        first = await _post(http, base, session, "are you there?")
        second = await _post(http, base, session, "hello??")
        # The 202 tells a refusal from an acceptance, and whether its notice follows.
        assert (first["refused"], first["notice"]) == (True, True), first
        assert (second["refused"], second["notice"]) == (True, False), second
        events = await wait_done(redis, s.key_prefix, [(session, first["message_id"])], 20)
        notice = done_event(events[first["message_id"]])
        # A platform retry of the refused message is a duplicate: no second notice.
        async with http.post(
            f"{base}/api/messages",
            json={"text": "again", "id": "retry-of-refused-1"},
            headers=session.headers(),
        ) as resp:
            assert resp.status == 202
        async with http.post(
            f"{base}/api/messages",
            json={"text": "again", "id": "retry-of-refused-1"},
            headers=session.headers(),
        ) as resp:
            assert (await resp.json()).get("duplicate") is True
    assert notice["kind"] == "notice"
    assert notice["text"] == "Very busy right now, please try again in about 2 min."
    assert await _refusal_queued(redis, s.key_prefix, first["job_id"])
    # The same user's next refusal in the window gets no notice of its own.
    assert not await _refusal_queued(redis, s.key_prefix, second["job_id"])
    # Nothing was queued for the worker and nothing was counted against the limits.
    # (The worker's history flush cron may be in the queue: it is no reply job.)
    queued = await redis.zrange(s.queue_name, 0, -1)
    assert [j for j in queued if b":reply:" in j] == [], queued
    assert not await redis.hget(f"{s.key_prefix}:lanes", "enqueued:default")
    assert llm_sim.stats()["requests"] == 0


async def test_queue_bound_refuses_when_the_queue_is_full(settings, llm_sim, worker_process, redis):
    s = _door_settings(settings, max_queued=100)
    worker_process(settings_env(s))
    for i in range(100):  # a full queue (ids that are no jobs: nothing to run)
        await redis.zadd(s.queue_name, {f"{s.key_prefix}:filler-{i}": 4_000_000_000_000})
    async with web_adapter(s) as (base, _), aiohttp.ClientSession() as http:
        session = await _session(http, base)
        sent = await _post(http, base, session, "anyone?")
        events = await wait_done(redis, s.key_prefix, [(session, sent["message_id"])], 20)
    notice = done_event(events[sent["message_id"]])
    assert notice["kind"] == "notice"
    assert notice["text"].startswith("Very busy right now, please try again in about")
    # Still only the fillers (the worker's history flush cron may come and go).
    queued = await redis.zrange(s.queue_name, 0, -1)
    assert len([j for j in queued if b":filler-" in j]) == 100
    assert [j for j in queued if b":reply:" in j] == [], queued


async def test_flooder_over_the_limit_gets_one_notice_and_admitted_messages_count_once(
    settings, llm_sim, worker_process, redis
):
    """Limit 2 per window: the door counts each admitted message once (the worker's
    second-line check does not count again, or the second message would be refused),
    the third gets the limit notice, the rest nothing, and none of them is queued."""
    s = settings.model_copy(update={"user_requests_per_window": 2, "user_window_s": 86_400})
    worker_process(settings_env(s))
    async with web_adapter(s) as (base, _), aiohttp.ClientSession() as http:
        session = await _session(http, base)
        bodies = [await _post(http, base, session, f"message number {i}") for i in range(8)]
        ids = [b["message_id"] for b in bodies]
        events = await wait_done(redis, s.key_prefix, [(session, m) for m in ids[:3]], 30)
    first, second, third = (done_event(events[m]) for m in ids[:3])
    assert first["kind"] == second["kind"] == "answer"
    assert third["kind"] == "notice"
    assert third["text"].startswith("You've reached your message limit. Please try again in")
    assert [b["refused"] for b in bodies] == [False, False] + [True] * 6, bodies
    assert [b["notice"] for b in bodies[2:]] == [True] + [False] * 5, bodies
    for body in bodies[3:]:
        assert not await _refusal_queued(redis, s.key_prefix, body["job_id"])
    assert await redis.hget(f"{s.key_prefix}:lanes", "enqueued:default") == b"2"
    # In order: the second answer saw the first.
    prompts = {r["messages"][-1]["content"]: r["messages"] for r in llm_sim.requests()}
    assert len(prompts) == 2
    assert [m["content"] for m in prompts["message number 1"][1:3]] == [
        "message number 0",
        first["text"],
    ]


@pytest.mark.slow
async def test_cached_answer_is_served_at_the_door_while_the_queue_is_full(
    settings, llm_sim, worker_process, redis
):
    s = _door_settings(settings)
    worker_process(settings_env(s))
    question = "What is Sluice?"
    async with web_adapter(s) as (base, _), aiohttp.ClientSession() as http:
        asker, holder, later, busy = [await _session(http, base) for _ in range(4)]
        warm = await _post(http, base, asker, question)
        events = await wait_done(redis, s.key_prefix, [(asker, warm["message_id"])], 20)
        cached_text = done_event(events[warm["message_id"]])["text"]
        assert llm_sim.stats()["requests"] == 1

        await close_budget(redis, s.key_prefix, 120)
        held = await _post(http, base, holder, "an uncached question")
        await until(
            lambda: redis.zscore(
                s.key_prefix + ":llm:waiters", f"reply:web:web:{held['message_id']}"
            ),
            20,
            "the only slot held by a job waiting for the budget",
        )
        # The same first question, by someone else: answered at once from the cache.
        hit = await _post(http, base, later, question)
        events = await wait_done(redis, s.key_prefix, [(later, hit["message_id"])], 20)
        answer = done_event(events[hit["message_id"]])
        assert (answer["kind"], answer["text"], answer["cached"]) == ("answer", cached_text, True)
        held_events = await _events_of(redis, s.key_prefix, holder, held["message_id"])
        assert "done" not in [e["type"] for e in held_events], "the held one still waits"

        # In a conversation with an earlier message still in flight, the same question is
        # not answered at the door: it waits its turn and sees the earlier answer.
        slow = await _post(http, base, busy, "a slow first question")
        follow = await _post(http, base, busy, question)
        # And the cached conversation goes on in order, with both turns in its history.
        more = await _post(http, base, later, "and then?")

        await open_budget(redis, s.key_prefix)
        sent = [
            (holder, held["message_id"]),
            (busy, slow["message_id"]),
            (busy, follow["message_id"]),
            (later, more["message_id"]),
        ]
        events = await wait_done(redis, s.key_prefix, sent, timeout_s=40)
    prompts = {r["messages"][-1]["content"]: r["messages"] for r in llm_sim.requests()}
    assert [(m["role"], m["content"]) for m in prompts["and then?"][1:]] == [
        ("user", question),
        ("assistant", cached_text),
        ("user", "and then?"),
    ]
    slow_done = done_event(events[slow["message_id"]])
    follow_done = done_event(events[follow["message_id"]])
    assert slow_done["at_ms"] <= next(
        e["at_ms"] for e in events[follow["message_id"]] if e["type"] == "start"
    )
    assert follow_done["cached"] is False
    assert [m["content"] for m in prompts[question][1:3]] == [
        "a slow first question",
        slow_done["text"],
    ]
    # The door's message never ran as a reply job (no second answer, no LLM call).
    assert sum(1 for r in llm_sim.requests() if r["messages"][-1]["content"] == question) == 2
    assert [e["type"] for e in events[hit["message_id"]]].count("done") == 1


@pytest.mark.slow
async def test_first_visible_response_under_a_backlog(settings, llm_sim, worker_process, redis):
    """Measured, not timed: 40 users in ~0.8 s against an empty LLM budget refilling at
    ~4 requests/s, 20 reply slots (a backlog of ~10 s). Every message shows text (the
    queued notice or the answer) before its answer is done, and the later ones a notice;
    the percentiles of the first visible response (send -> first ``queued``/``delta``/
    ``done`` event) are printed. At launch-day scale they are measured by ``sluice bench``
    (docs/benchmarks.md):

    pytest -q -s tests/test_door.py -k first_visible
    """
    import asyncio
    import time

    llm_sim.configure(tokens=3, first_token_latency_s=0.1)
    s = settings.model_copy(update={"llm_rpm": 240, "worker_max_jobs": 20})
    worker_process(settings_env(s))
    await empty_budget(redis, s.key_prefix)
    sent_ms: dict[str, float] = {}
    async with web_adapter(s) as (base, _), aiohttp.ClientSession() as http:
        sessions = [await _session(http, base) for _ in range(40)]

        async def send(i: int, session: str) -> tuple[str, str]:
            await asyncio.sleep(i * 0.02)
            at = time.time() * 1000
            body = await _post(http, base, session, f"distinct question {i} {session}")
            sent_ms[body["message_id"]] = at
            return session, body["message_id"]

        sent = await asyncio.gather(*(send(i, x) for i, x in enumerate(sessions)))
        events = await wait_done(redis, s.key_prefix, list(sent), timeout_s=120)
    first_visible = []
    notices = 0
    for _, mid in sent:
        ev = events[mid]
        visible = [e for e in ev if e["type"] in ("queued", "delta", "done")]
        notices += any(e["type"] == "queued" for e in ev)
        assert done_event(ev)["kind"] == "answer"
        first_visible.append((visible[0]["at_ms"] - sent_ms[mid]) / 1000)
        assert visible[0]["at_ms"] <= done_event(ev)["at_ms"]
    first_visible.sort()
    full = sorted((done_event(events[m])["at_ms"] - sent_ms[m]) / 1000 for _, m in sent)

    def pct(values: list[float], q: float) -> float:
        return values[max(0, round(q * len(values)) - 1)]

    print(
        f"\nfirst visible response p50={pct(first_visible, 0.5):.2f}s "
        f"p95={pct(first_visible, 0.95):.2f}s p99={pct(first_visible, 0.99):.2f}s; "
        f"full reply p50={pct(full, 0.5):.1f}s p99={pct(full, 0.99):.1f}s; "
        f"{notices} of {len(sent)} showed a queued notice"
    )
    assert notices > 0, "a backlog formed: later messages must have shown a notice"

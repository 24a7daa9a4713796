"""The adapter side: signed HTTP requests in, arq jobs out (real Bolt, real Redis)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

from pydantic import SecretStr

from tests.fakes.slack_api import EventSender, event_envelope, sign
from tests.helpers import free_port
from tests.slack.conftest import (
    BOT_USER,
    SIGNING_SECRET,
    mention,
    message,
    queued_messages,
)


async def test_url_verification_answers_its_challenge(slack_settings, adapter):
    async with adapter(slack_settings) as a:
        body = json.dumps(
            {"type": "url_verification", "challenge": "abc123", "token": "x"}
        ).encode()
        status, text = await a.send.post_raw(body)
    assert status == 200
    assert json.loads(text)["challenge"] == "abc123"


async def test_mention_is_enqueued_once_with_its_thread_and_text(slack_settings, adapter, queue):
    async with adapter(slack_settings) as a:
        status, _ = await a.send.event(mention("what is a sluice?", "100.1"))
    assert status == 200
    [msg] = await queued_messages(queue, slack_settings)
    assert msg["platform"] == "slack"
    assert msg["tenant"] == "T1"
    assert msg["channel"] == "C1"
    assert msg["thread"] == "100.1"
    assert msg["message_id"] == "C1:100.1"
    assert msg["text"] == "what is a sluice?"
    assert msg["is_dm"] is False
    assert msg["meta"]["reply_thread"] == "100.1"


async def test_four_deliveries_of_one_event_enqueue_one_job(slack_settings, adapter, queue):
    event = mention("hello", "101.1")
    async with adapter(slack_settings) as a:
        results = [
            await a.send.event(event, event_id="EvSAME", retry_num=n or None) for n in range(4)
        ]
    assert [status for status, _ in results] == [200, 200, 200, 200]
    assert len(await queued_messages(queue, slack_settings)) == 1


async def test_concurrent_retries_of_one_event_enqueue_one_job(slack_settings, adapter, queue):
    event = mention("hello", "101.2")
    async with adapter(slack_settings) as a:
        results = await asyncio.gather(
            *[a.send.event(event, event_id="EvCONC", retry_num=n or None) for n in range(4)]
        )
    assert all(status == 200 for status, _ in results)
    assert len(await queued_messages(queue, slack_settings)) == 1


async def test_mention_and_message_for_the_same_ts_enqueue_one_job(slack_settings, adapter, queue):
    async with adapter(slack_settings) as a:
        await a.send.event(mention("hi", "102.5", thread_ts="102.1"))
        first = await queued_messages(queue, slack_settings)
        # The same message also arrives as a `message` event (different event id),
        # at the same time as another copy of the mention.
        await asyncio.gather(
            a.send.event(message(f"<@{BOT_USER}> hi", "102.5", thread_ts="102.1")),
            a.send.event(mention("hi", "102.5", thread_ts="102.1")),
        )
    assert len(first) == 1
    assert len(await queued_messages(queue, slack_settings)) == 1


async def test_bot_messages_edits_and_deletions_are_ignored(slack_settings, adapter, queue):
    async with adapter(slack_settings) as a:
        events = [
            message("from me", "103.1", channel="D1", channel_type="im", user=BOT_USER),
            message("other bot", "103.2", channel="D1", channel_type="im", bot_id="B9"),
            message("edited", "103.3", channel="D1", channel_type="im", subtype="message_changed"),
            message("gone", "103.4", channel="D1", channel_type="im", subtype="message_deleted"),
            message("joined", "103.5", channel="D1", channel_type="im", subtype="channel_join"),
            message("chatter", "103.6"),  # a channel message not addressed to the bot
        ]
        statuses = [(await a.send.event(e))[0] for e in events]
    assert statuses == [200] * len(events)
    assert await queued_messages(queue, slack_settings) == []


async def test_dm_and_follow_up_in_bot_thread_are_enqueued(slack_settings, adapter, queue):
    async with adapter(slack_settings) as a:
        await a.send.event(message("dm question", "104.1", channel="D1", channel_type="im"))
        # Not a thread the bot is in: ignored.
        await a.send.event(message("side talk", "104.3", thread_ts="999.1"))
        await a.send.event(mention("first", "104.5"))
        await a.send.event(message("follow-up", "104.6", thread_ts="104.5"))
    by_id = {m["message_id"]: m for m in await queued_messages(queue, slack_settings)}
    assert set(by_id) == {"D1:104.1", "C1:104.5", "C1:104.6"}
    assert by_id["D1:104.1"]["is_dm"] is True
    assert by_id["D1:104.1"]["thread"] is None
    assert by_id["C1:104.6"]["thread"] == "104.5"
    assert by_id["C1:104.6"]["meta"]["kind"] == "thread"


async def test_assistant_thread_gets_prompts_and_thinking_status(
    slack_settings, adapter, queue, fake_slack
):
    started = {
        "type": "assistant_thread_started",
        "event_ts": "105.0",
        "assistant_thread": {
            "user_id": "U1",
            "channel_id": "D2",
            "thread_ts": "105.1",
            "context": {},
        },
    }
    async with adapter(slack_settings) as a:
        assert (await a.send.event(started))[0] == 200
        await fake_slack.wait_for(
            lambda: fake_slack.calls_of("assistant.threads.setSuggestedPrompts")
        )
        await a.send.event(
            message("help me", "105.2", channel="D2", channel_type="im", thread_ts="105.1")
        )
        await fake_slack.wait_for(lambda: fake_slack.calls_of("assistant.threads.setStatus"))
    [prompts] = fake_slack.calls_of("assistant.threads.setSuggestedPrompts")
    assert prompts.params["thread_ts"] == "105.1"
    assert len(prompts.params["prompts"]) >= 1
    [status] = fake_slack.calls_of("assistant.threads.setStatus")
    assert status.params["status"] == "is thinking…"
    [msg] = await queued_messages(queue, slack_settings)
    assert msg["meta"]["assistant"] == "1"
    assert msg["thread"] == "105.1"


async def test_ask_command_is_acked_in_channel_and_enqueued(slack_settings, adapter, queue):
    form = {
        "command": "/ask",
        "text": "why is the sky blue?",
        "team_id": "T1",
        "channel_id": "C7",
        "user_id": "U1",
        "user_name": "ada",
        "response_url": "http://127.0.0.1:9/respond",
        "trigger_id": "trig1",
    }
    async with adapter(slack_settings) as a:
        status, text = await a.send.command(form)
        empty_status, empty_text = await a.send.command(
            {**form, "text": " ", "trigger_id": "trig2"}
        )
    assert status == 200
    assert json.loads(text)["response_type"] == "in_channel"
    assert empty_status == 200 and "/ask" in json.loads(empty_text)["text"]
    [msg] = await queued_messages(queue, slack_settings)
    assert msg["text"] == "why is the sky blue?"
    assert msg["meta"]["response_url"] == "http://127.0.0.1:9/respond"


async def test_bad_signature_stale_malformed_and_oversized_requests_are_refused(
    slack_settings, adapter, queue
):
    body = json.dumps(event_envelope(mention("x", "106.1"))).encode()
    now = int(time.time())
    settings = slack_settings.model_copy(update={"max_body_bytes": 4096})
    async with adapter(settings) as a:
        bad_sig = await a.send.post_raw(body, signature="v0=" + "0" * 64)
        stale_ts = now - 6 * 60
        stale = await a.send.post_raw(
            body, timestamp=stale_ts, signature=sign(SIGNING_SECRET, body, stale_ts)
        )
        malformed = await a.send.post_raw(b"{not json")
        not_a_dict = await a.send.post_raw(b"[1, 2]")
        huge = json.dumps(event_envelope(mention("x" * 10_000, "106.2"))).encode()
        oversized = await a.send.post_raw(huge)
        no_headers = await a.http.post(a.base + "/slack/events", data=body)
        no_headers_status = no_headers.status
        no_headers.release()
    assert bad_sig[0] == 401
    assert stale[0] == 401
    assert malformed[0] == 400
    assert not_a_dict[0] == 400
    assert oversized[0] == 413
    assert no_headers_status == 401
    assert await queued_messages(queue, slack_settings) == []


async def test_redis_down_is_not_acked_and_redelivery_is_accepted(slack_settings, adapter, queue):
    dead = slack_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    event = mention("are you there?", "107.1")
    async with adapter(dead) as a:
        status, _ = await a.send.event(event, event_id="EvDOWN")
    assert status >= 500
    async with adapter(slack_settings) as a:
        status, _ = await a.send.event(event, event_id="EvDOWN", retry_num=1)
    assert status == 200
    assert len(await queued_messages(queue, slack_settings)) == 1


async def test_two_hundred_events_at_once_are_all_acked_and_queued(slack_settings, adapter, queue):
    async with adapter(slack_settings) as a:
        await a.send.event(mention("warm-up", "199.1"))

        async def timed(i: int) -> tuple[int, float]:
            started = time.perf_counter()
            # From 200 people: one person's 200 messages would meet the limit at the door.
            status, _ = await a.send.event(mention(f"question {i}", f"200.{i:04d}", user=f"U{i}"))
            return status, time.perf_counter() - started

        began = time.perf_counter()
        results = await asyncio.gather(*[timed(i) for i in range(200)])
        total = time.perf_counter() - began
    times = sorted(t for _, t in results)
    p50, p99 = statistics.median(times), times[int(len(times) * 0.99) - 1]
    print(
        f"\n200 concurrent Slack events: p50={p50 * 1000:.0f}ms p99={p99 * 1000:.0f}ms "
        f"max={times[-1] * 1000:.0f}ms all={total * 1000:.0f}ms"
    )
    assert all(status == 200 for status, _ in results)
    assert len(await queued_messages(queue, slack_settings)) == 201


async def test_healthz_reports_redis(slack_settings, adapter):
    async with adapter(slack_settings) as a, a.http.get(a.base + "/healthz") as resp:
        assert resp.status == 200
        assert (await resp.json())["ok"] is True


async def test_signed_request_with_a_wrong_secret_is_refused(slack_settings, adapter, queue):
    async with adapter(slack_settings) as a:
        other = EventSender(a.http, a.base + "/slack/events", "not-the-secret")
        status, _ = await other.event(mention("x", "108.1"))
    assert status == 401
    assert await queued_messages(queue, slack_settings) == []


def test_settings_secret_never_prints(slack_settings):
    assert SIGNING_SECRET not in repr(slack_settings)
    assert isinstance(slack_settings.slack_signing_secret, SecretStr)


async def test_multi_workspace_burst_is_all_acked_and_queued(
    oauth_settings, adapter, queue, fake_slack
):
    from slack_sdk.oauth.installation_store import Installation

    from bots.slack.installations import SQLInstallationStore

    store = SQLInstallationStore(oauth_settings)
    for team in ("TA", "TB"):
        fake_slack.add_token(f"xoxb-{team}", team)
        await store.async_save(
            Installation(team_id=team, bot_token=f"xoxb-{team}", bot_user_id=BOT_USER, user_id="U1")
        )
    await store.close()
    async with adapter(oauth_settings) as a:

        async def timed(i: int) -> tuple[int, float]:
            started = time.perf_counter()
            status, _ = await a.send.event(
                mention(f"q {i}", f"210.{i:04d}", user=f"U{i}"), team_id="TA" if i % 2 else "TB"
            )
            return status, time.perf_counter() - started

        results = await asyncio.gather(*[timed(i) for i in range(200)])
    times = sorted(t for _, t in results)
    p50, p99 = statistics.median(times), times[int(len(times) * 0.99) - 1]
    print(
        f"\n200 concurrent events, 2 OAuth workspaces: p50={p50 * 1000:.0f}ms "
        f"p99={p99 * 1000:.0f}ms auth.test calls={len(fake_slack.calls_of('auth.test'))}"
    )
    assert all(status == 200 for status, _ in results)
    # auth.test once per workspace, not once per event.
    assert len(fake_slack.calls_of("auth.test")) == 2
    jobs = await queued_messages(queue, oauth_settings)
    assert len(jobs) == 200
    assert {j["tenant"] for j in jobs} == {"TA", "TB"}


async def test_bot_commands_are_slash_commands_with_the_command_in_meta(
    slack_settings, adapter, queue
):
    settings = slack_settings.model_copy(update={"app": "examples.support_bot.bot:bot"})
    form = {
        "command": "/ticket",
        "text": "printer is broken",
        "team_id": "T1",
        "channel_id": "C8",
        "user_id": "U1",
        "trigger_id": "trig-t",
        "response_url": "http://127.0.0.1:9/r",
    }
    async with adapter(settings) as a:
        status, text = await a.send.command(form)
        not_ours = await a.send.command({**form, "command": "/unknown", "trigger_id": "t2"})
    assert status == 200 and json.loads(text)["response_type"] == "in_channel"
    assert not_ours[0] == 404  # no listener: not enqueued
    [msg] = await queued_messages(queue, settings)
    assert msg["meta"]["command"] == "ticket"
    assert msg["text"] == "printer is broken"


async def test_odd_unicode_is_accepted_and_lone_surrogates_are_replaced(
    slack_settings, adapter, queue
):
    body = json.dumps(event_envelope(mention("bad \ud800 good 👍🏽 \u202e e\u0301", "111.1")))
    async with adapter(slack_settings) as a:
        status, _ = await a.send.post_raw(body.encode())
    assert status == 200
    [msg] = await queued_messages(queue, slack_settings)
    assert msg["text"] == "bad ? good 👍🏽 \u202e e\u0301"


async def test_healthz_is_503_when_redis_is_down(slack_settings, adapter):
    dead = slack_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    async with adapter(dead) as a, a.http.get(a.base + "/healthz") as resp:
        assert resp.status == 503


async def test_signed_but_malformed_payloads_get_400_and_unknown_events_200(
    slack_settings, adapter, queue
):
    bad = [
        {"type": "event_callback", "team_id": "T1", "event": "oops", "event_id": "E1"},
        {"type": "event_callback", "team_id": "T1", "event_id": "E2"},
        {"type": "event_callback", "team_id": 7, "event": mention("x", "1.1"), "event_id": "E3"},
        {
            "type": "event_callback",
            "team_id": "T1",
            "event_id": "E4",
            "event": {**message("x", "1.2", channel="D1", channel_type="im"), "user": ["U1"]},
        },
        {"nothing": True},
    ]
    other = {
        "type": "event_callback",
        "team_id": "T1",
        "event_id": "E5",
        "event": {"type": "team_join", "user": {"id": "U9"}},
    }
    async with adapter(slack_settings) as a:
        statuses = [(await a.send.post_raw(json.dumps(b).encode()))[0] for b in bad]
        other_status, _ = await a.send.post_raw(json.dumps(other).encode())
    assert statuses == [400] * len(bad)
    assert other_status == 200
    assert await queued_messages(queue, slack_settings) == []

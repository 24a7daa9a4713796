"""Assistant threads through Bolt's AsyncAssistant, and tool calls shown while streaming.

Real signed events into the adapter (slack_bolt), real slack_sdk against the fake
Web API, real Redis; the tool test runs a real ``sluice worker`` and the simulator.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bots.slack.assistant import RedisThreadContextStore, thread_title
from bots.slack.intake import Intake
from bots.slack.responder import SlackResponderFactory
from core.framework.agent import ToolProgress
from core.messages import IncomingMessage, Reply
from core.settings import Settings
from tests.fakes.slack_api import FakeSlackAPI
from tests.slack.conftest import TEAM, mention, message, queued_messages, worker_env

_ts = itertools.count(1)


def _started(channel: str, thread_ts: str, context: Any) -> dict[str, Any]:
    return {
        "type": "assistant_thread_started",
        "event_ts": thread_ts,
        "assistant_thread": {
            "user_id": "U1",
            "channel_id": channel,
            "thread_ts": thread_ts,
            "context": context,
        },
    }


def _changed(channel: str, thread_ts: str, context: Any) -> dict[str, Any]:
    event = _started(channel, thread_ts, context)
    event["type"] = "assistant_thread_context_changed"
    return event


def _in_thread(text: str, ts: str, channel: str, thread_ts: str) -> dict[str, Any]:
    return message(text, ts, channel=channel, channel_type="im", thread_ts=thread_ts)


async def _context(settings: Settings, channel: str, thread_ts: str) -> str | None:
    intake = Intake(settings)
    try:
        found = await RedisThreadContextStore(intake, 60).find(
            channel_id=channel, thread_ts=thread_ts
        )
    finally:
        await intake.close()
    return None if found is None else found.channel_id


async def _wait_context(settings: Settings, channel: str, thread_ts: str, expected: str) -> None:
    deadline = time.monotonic() + 20
    while await _context(settings, channel, thread_ts) != expected:
        assert time.monotonic() < deadline, "context not saved"
        await asyncio.sleep(0.02)


async def test_thread_start_offers_prompts_and_saves_its_context(
    slack_settings, adapter, fake_slack
):
    async with adapter(slack_settings) as a:
        status, _ = await a.send.event(_started("D7", "700.1", {"channel_id": "C42"}))
        assert status == 200
        await fake_slack.wait_for(
            lambda: fake_slack.calls_of("assistant.threads.setSuggestedPrompts")
        )
    [prompts] = fake_slack.calls_of("assistant.threads.setSuggestedPrompts")
    assert prompts.params["channel_id"] == "D7" and prompts.params["thread_ts"] == "700.1"
    assert prompts.params["prompts"][0]["title"]
    await _wait_context(slack_settings, "D7", "700.1", "C42")


async def test_context_change_is_saved_and_rides_on_the_next_message(
    slack_settings, adapter, queue, fake_slack
):
    async with adapter(slack_settings) as a:
        await a.send.event(_started("D8", "800.1", {}))
        assert await _context(slack_settings, "D8", "800.1") is None
        status, _ = await a.send.event(
            _changed("D8", "800.1", {"channel_id": "C9", "team_id": TEAM})
        )
        assert status == 200
        # The save runs after the ack: wait for it.
        await _wait_context(slack_settings, "D8", "800.1", "C9")
        await a.send.event(_in_thread("what is new here?", "800.2", "D8", "800.1"))
        await fake_slack.wait_for(lambda: fake_slack.calls_of("assistant.threads.setStatus"))
    [msg] = await queued_messages(queue, slack_settings)
    assert msg["meta"]["assistant"] == "1"
    assert msg["meta"]["context_channel"] == "C9"
    assert msg["thread"] == "800.1"


async def test_first_message_titles_the_thread_once_and_each_gets_the_status(
    slack_settings, adapter, queue, fake_slack
):
    async with adapter(slack_settings) as a:
        await a.send.event(_started("D9", "900.1", {}))
        await a.send.event(
            _in_thread("How do I rotate   the keys?\nDetails follow", "900.2", "D9", "900.1")
        )
        await fake_slack.wait_for(lambda: fake_slack.calls_of("assistant.threads.setTitle"))
        await a.send.event(_in_thread("and the tokens?", "900.3", "D9", "900.1"))
        await fake_slack.wait_for(
            lambda: len(fake_slack.calls_of("assistant.threads.setStatus")) == 2
        )
    [title] = fake_slack.calls_of("assistant.threads.setTitle")
    assert title.params["title"] == "How do I rotate the keys?"
    assert title.params["thread_ts"] == "900.1"
    assert all(
        c.params["status"] == "is thinking…"
        for c in fake_slack.calls_of("assistant.threads.setStatus")
    )
    assert len(await queued_messages(queue, slack_settings)) == 2


async def test_a_redelivered_assistant_message_is_enqueued_once(
    slack_settings, adapter, queue, fake_slack
):
    event = _in_thread("hello", "950.2", "D10", "950.1")
    async with adapter(slack_settings) as a:
        assert (await a.send.event(event, event_id="EvA1"))[0] == 200
        assert (await a.send.event(event, event_id="EvA1", retry_num=1))[0] == 200
    assert len(await queued_messages(queue, slack_settings)) == 1


@pytest.mark.parametrize(
    "context",
    [None, "C1", ["C1"], {"channel_id": 5}, {"channel_id": ""}, {"team_id": "T1"}],
)
async def test_a_malformed_context_is_acked_and_not_saved(
    slack_settings, adapter, fake_slack, context
):
    async with adapter(slack_settings) as a:
        status, _ = await a.send.event(_changed("D11", "960.1", context))
        assert status == 200
        assert (await a.send.event(_started("D11", "960.1", context)))[0] == 200
        await fake_slack.wait_for(
            lambda: fake_slack.calls_of("assistant.threads.setSuggestedPrompts")
        )
    assert await _context(slack_settings, "D11", "960.1") is None


def test_thread_title_is_the_first_line_shortened():
    assert thread_title("  one\ntwo") == "one"
    long = thread_title("word " * 40)
    assert len(long) <= 60 and long.endswith("…")
    assert thread_title("   ") == ""


# --- tool calls while streaming ----------------------------------------------------


@pytest.fixture
async def factory(slack_settings, redis) -> AsyncIterator[SlackResponderFactory]:
    f = SlackResponderFactory(slack_settings.model_copy(update={"slack_edit_interval_s": 0}), redis)
    await f.start()
    try:
        yield f
    finally:
        await f.close()


def _msg(*, thread: bool, assistant: bool = False) -> IncomingMessage:
    ts = f"{next(_ts)}.7"
    channel = "D5" if assistant or not thread else "C1"
    meta = {"kind": "assistant" if assistant else "mention", "recipient_user_id": "U1"}
    if thread:
        meta["reply_thread"] = ts
    if assistant:
        meta["assistant"] = "1"
    return IncomingMessage(
        platform="slack",
        tenant=TEAM,
        channel=channel,
        thread=ts if thread else None,
        user="U1",
        message_id=f"{channel}:{ts}",
        text="q",
        is_dm=channel.startswith("D"),
        meta=meta,
    )


async def test_tool_calls_are_task_updates_of_the_stream(factory, fake_slack: FakeSlackAPI):
    m = _msg(thread=True)
    r = factory.responder(m, m.job_id)
    await r.begin()
    await r.tool_progress(ToolProgress("call_1", "lookup", "in_progress"))
    await r.tool_progress(ToolProgress("call_2", "<!here> evil name", "in_progress"))
    await r.tool_progress(ToolProgress("call_1", "lookup", "complete"))
    await r.tool_progress(ToolProgress("call_2", "<!here> evil name", "error"))
    await r.stream("The answer")
    await r.finish(Reply(text="The answer is 42."))
    [reply] = fake_slack.replies("C1")
    assert reply.text == "The answer is 42." and not reply.streaming
    assert reply.tasks["call_1"]["status"] == "complete"
    assert reply.tasks["call_1"]["title"] == "lookup"
    assert reply.tasks["call_2"]["status"] == "error"
    assert reply.tasks["call_2"]["title"] == "hereevilname"
    [start] = fake_slack.calls_of("chat.startStream")
    assert start.params["task_display_mode"] == "timeline"
    assert "markdown_text" not in start.params


async def test_without_a_stream_an_assistant_thread_shows_the_tool_in_its_status(
    slack_settings, redis, fake_slack: FakeSlackAPI
):
    settings = slack_settings.model_copy(update={"slack_native_streaming": False})
    f = SlackResponderFactory(settings, redis)
    await f.start()
    try:
        m = _msg(thread=True, assistant=True)
        r = f.responder(m, m.job_id)
        await r.begin()
        await r.tool_progress(ToolProgress("c1", "search_docs", "in_progress"))
        await r.tool_progress(ToolProgress("c1", "search_docs", "complete"))
        await r.finish(Reply(text="found it"))
    finally:
        await f.close()
    statuses = [c.params["status"] for c in fake_slack.calls_of("assistant.threads.setStatus")]
    assert statuses == ["is thinking…", "is using search_docs…"]
    assert not fake_slack.calls_of("chat.startStream")
    [reply] = fake_slack.replies("D5")
    assert reply.text == "found it"


async def test_a_top_level_dm_shows_only_the_answer(factory, fake_slack: FakeSlackAPI):
    m = _msg(thread=False)
    r = factory.responder(m, m.job_id)
    await r.begin()
    await r.tool_progress(ToolProgress("c1", "lookup", "in_progress"))
    await r.finish(Reply(text="done"))
    assert [c.method for c in fake_slack.calls] == ["chat.postMessage"]


async def test_tool_calls_reach_slack_as_task_updates_end_to_end(
    slack_settings, adapter, worker_process, fake_slack
):
    """Signed mention -> adapter -> queue -> `sluice worker` running a bot with tools ->
    the simulator asks for two tools -> the stream shows both as tasks, then the answer."""
    settings = slack_settings.model_copy(update={"slack_edit_interval_s": 0.0})
    worker_process({**worker_env(settings), "SLUICE_APP": "tests.framework.bots:tool_bot"})
    async with adapter(settings) as a:
        await a.send.event(mention("Both [[tool:whoami]] and [[tool:explode]]", "990.1"))
        await fake_slack.wait_for(
            lambda: any(
                m.thread_ts == "990.1" and not m.streaming and m.text
                for m in fake_slack.replies("C1")
            ),
            timeout_s=30,
        )
    [reply] = [m for m in fake_slack.replies("C1") if m.thread_ts == "990.1"]
    by_name = {t["title"]: t["status"] for t in reply.tasks.values()}
    assert by_name == {"whoami": "complete", "explode": "error"}
    assert reply.markdown

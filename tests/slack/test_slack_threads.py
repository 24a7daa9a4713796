"""Thread context on Slack: mentioned in a thread it has not seen, the worker reads the
earlier messages once (``conversations.replies`` through the real slack_sdk, on the
fake Web API), gives them to the model labelled by user with markup inert, caps a
5,000-message thread with a note, and keeps to the 1-call-a-minute tier."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from core.settings import Settings
from tests.conftest import Sim
from tests.fakes.slack_api import FakeSlackAPI
from tests.slack.conftest import mention, worker_env


def thread_of(n: int, base: int = 500) -> list[dict[str, Any]]:
    """A thread: a parent by U7 and ``n - 1`` replies by U8, one a bot's."""
    out: list[dict[str, Any]] = [
        {"type": "message", "user": "U7", "text": "Parent: the launch plan", "ts": f"{base}.000001"}
    ]
    for i in range(1, n):
        out.append(
            {"type": "message", "user": "U8", "text": f"reply {i}", "ts": f"{base}.{i + 1:06d}"}
        )
    return out


def thread_context_of(sim: Sim, text: str) -> list[str]:
    """The thread-context system messages of the model requests that asked ``text``."""
    found = []
    for body in sim.requests():
        messages = body.get("messages") or []
        if messages and text in str(messages[-1].get("content")):
            found += [
                str(m["content"])
                for m in messages
                if m["role"] == "system" and "Earlier messages in this thread" in str(m["content"])
            ]
    return found


async def final_reply(fake: FakeSlackAPI, starts: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        done = [m.text for m in fake.replies() if not m.streaming and starts in m.text]
        if done:
            return done[0]
        assert time.monotonic() < deadline, [m.text for m in fake.replies()]
        await asyncio.sleep(0.05)


async def test_mention_in_an_unseen_thread_reads_it_once_and_the_model_sees_it(
    slack_settings: Settings,
    adapter: Any,
    worker_process: Any,
    fake_slack: FakeSlackAPI,
    llm_sim: Sim,
) -> None:
    messages = thread_of(3)
    messages[1]["text"] = "ping <!here> and <@U9|bob>, see <https://x.test|the doc> &lt;b&gt;"
    messages.append(
        {
            "type": "message",
            "bot_id": "B2",
            "subtype": "bot_message",
            "text": "a build bot says hi",
            "ts": "500.000009",
        }
    )
    fake_slack.add_thread("C1", "500.000001", messages)
    worker_process(worker_env(slack_settings))
    async with adapter(slack_settings) as a:
        await a.send.event(mention("summarise this thread", "500.000100", thread_ts="500.000001"))
        reply = await final_reply(fake_slack, "Echo: summarise this thread")
        assert not reply.startswith("_(")  # a short thread: no note
        [context] = thread_context_of(llm_sim, "summarise this thread")
        assert "[user U7]: Parent: the launch plan" in context
        assert "[user U8]: ping @here and @bob, see the doc (https://x.test) <b>" in context
        assert "[bot B2]: a build bot says hi" in context
        assert "<!here>" not in context and "<@U9" not in context
        # A second mention in the same thread: the thread is not read again, and the
        # model still has it in view.
        await a.send.event(mention("and the risks?", "500.000200", thread_ts="500.000001"))
        await final_reply(fake_slack, "Echo: and the risks?")
        assert len(thread_context_of(llm_sim, "and the risks?")) == 1
    assert len(fake_slack.calls_of("conversations.replies")) == 1


async def test_a_thread_of_5000_messages_is_capped_with_a_note(
    slack_settings: Settings,
    adapter: Any,
    worker_process: Any,
    fake_slack: FakeSlackAPI,
    llm_sim: Sim,
) -> None:
    fake_slack.add_thread("C1", "600.000001", thread_of(5000, base=600))
    settings = slack_settings.model_copy(update={"thread_context_max_messages": 50})
    worker_process(worker_env(settings))
    async with adapter(settings) as a:
        await a.send.event(mention("summarise it", "601.000001", thread_ts="600.000001"))
        reply = await final_reply(fake_slack, "Echo: summarise it")
    assert reply.startswith(
        "_(This thread has more than 1,000 earlier messages; I read 1,000 of them and "
        "looked at the first and the latest 49 of those.)_"
    )
    [context] = thread_context_of(llm_sim, "summarise it")
    assert "Parent: the launch plan" in context and "reply 999" in context
    assert "[user U8]: reply 951\n" in context and "[user U8]: reply 950\n" not in context
    assert len(context) < settings.thread_context_max_chars + 1000
    calls = fake_slack.calls_of("conversations.replies")
    assert len(calls) == 5 and all(int(c.params["limit"]) == 200 for c in calls)


async def test_one_call_a_minute_tier_reads_one_page_of_15_and_never_gets_a_429(
    slack_settings: Settings,
    adapter: Any,
    worker_process: Any,
    fake_slack: FakeSlackAPI,
    llm_sim: Sim,
) -> None:
    fake_slack.replies_per_minute = 1
    fake_slack.add_thread("C1", "700.000001", thread_of(40, base=700))
    fake_slack.add_thread("C1", "800.000001", thread_of(5, base=800))
    settings = slack_settings.model_copy(update={"slack_replies_per_minute": 1})
    worker_process(worker_env(settings))
    async with adapter(settings) as a:
        await a.send.event(mention("first thread", "700.000900", thread_ts="700.000001"))
        first = await final_reply(fake_slack, "Echo: first thread")
        await a.send.event(mention("second thread", "800.000900", thread_ts="800.000001"))
        second = await final_reply(fake_slack, "Echo: second thread")
    [call] = fake_slack.calls_of("conversations.replies")  # the budget allowed one
    assert int(call.params["limit"]) == 15
    assert first.startswith("_(This thread has more than 15 earlier messages")
    assert second.startswith("_(I couldn't read this thread's earlier messages just now.)_")
    assert thread_context_of(llm_sim, "second thread") == []

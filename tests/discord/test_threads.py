"""Thread context on Discord: a message in a thread the bot has not seen, or a reply to
someone's message, makes the worker read the earlier messages once (REST through the
paced client, on the fake) and give them to the model, labelled and with mentions inert;
a long thread is capped with a note."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import SecretStr

from core.settings import Settings
from tests.conftest import Sim
from tests.discord.conftest import CHANNEL, THREAD, running_adapter
from tests.fakes.discord_fake import DiscordFake
from tests.helpers import settings_env

ALICE = DiscordFake.user(610000000000000001, "alice")
BOB = DiscordFake.user(610000000000000002, "bob")
CAROL = DiscordFake.user(610000000000000003, "carol")
BUILDBOT = DiscordFake.user(610000000000000009, "buildbot", bot=True)


def contexts(sim: Sim, text: str) -> list[str]:
    """The thread-context system messages of the model requests that asked ``text``."""
    out = []
    for body in sim.requests():
        messages = body.get("messages") or []
        if messages and text in str(messages[-1].get("content")):
            out += [
                str(m["content"])
                for m in messages
                if m["role"] == "system" and "Earlier messages in this thread" in str(m["content"])
            ]
    return out


async def answer(fake: DiscordFake, channel: str, starts: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        done = [
            m["content"]
            for m in fake.bot_messages(channel)
            if starts in m["content"] and m.get("components")
        ]
        if done:
            return str(done[0])
        assert time.monotonic() < deadline, [m["content"] for m in fake.bot_messages()]
        await asyncio.sleep(0.05)


def _settings(settings: Settings, fake: DiscordFake, **extra: Any) -> Settings:
    return settings.model_copy(
        update={
            "discord_token": SecretStr(fake.token),
            "discord_api_url": fake.api_url,
            "discord_stream_interval_s": 0.3,
            "discord_message_content": True,
            **extra,
        }
    )


def history_reads(fake: DiscordFake, channel: str) -> int:
    return len(
        [c for c in fake.calls_to("GET", "/channels/{channel_id}/messages") if c.major == channel]
    )


async def test_a_thread_is_read_once_and_a_reply_chain_is_followed(
    fake: DiscordFake, settings: Settings, worker_process: Any, llm_sim: Sim
) -> None:
    s = _settings(settings, fake)
    fake.add_history(THREAD, ALICE, "We ship on Friday")
    fake.add_history(THREAD, BOB, "<@610000000000000001> @everyone <@&400000000000000001> ok")
    fake.add_history(THREAD, BUILDBOT, "build 42 is green")
    first = fake.add_history(CHANNEL, ALICE, "Should we cache the answers?")
    second = fake.add_history(
        CHANNEL,
        BOB,
        "Only per tenant",
        message_reference={"message_id": first["id"], "channel_id": CHANNEL},
    )
    worker_process(settings_env(s))
    async with running_adapter(s, fake):
        await fake.send_user_message(THREAD, CAROL, "summarise this thread", mention_bot=True)
        await answer(fake, THREAD, "Echo: summarise this thread")
        [context] = contexts(llm_sim, "summarise this thread")
        assert f"[user {ALICE['id']}]: We ship on Friday" in context
        assert (
            f"[user {BOB['id']}]: @610000000000000001 @everyone @role400000000000000001 ok"
            in context
        )
        assert f"[bot {BUILDBOT['id']}]: build 42 is green" in context
        assert "<@" not in context
        await fake.send_user_message(THREAD, CAROL, "and who decided?", mention_bot=True)
        await answer(fake, THREAD, "Echo: and who decided?")
        assert len(contexts(llm_sim, "and who decided?")) == 1
        assert history_reads(fake, THREAD) == 1  # read once

        await fake.send_user_message(
            CHANNEL, CAROL, "what do you think?", mention_bot=True, reply_to=second
        )
        await answer(fake, CHANNEL, "what do you think?")
        [chain] = contexts(llm_sim, "what do you think?")
        assert chain.index("Should we cache the answers?") < chain.index("Only per tenant")


async def test_a_long_thread_is_capped_with_a_note(
    fake: DiscordFake, settings: Settings, worker_process: Any, llm_sim: Sim
) -> None:
    s = _settings(settings, fake, thread_context_fetch_max=150, thread_context_max_messages=20)
    for i in range(300):
        fake.add_history(THREAD, ALICE if i % 2 else BOB, f"message {i}")
    worker_process(settings_env(s))
    async with running_adapter(s, fake):
        await fake.send_user_message(THREAD, CAROL, "summarise it", mention_bot=True)
        text = await answer(fake, THREAD, "Echo: summarise it")
    assert text.startswith(
        "_(This thread has more than 150 earlier messages; I read 150 of them and looked "
        "at the first and the latest 19 of those.)_"
    )
    [context] = contexts(llm_sim, "summarise it")
    assert "message 299" in context and "message 280" not in context
    assert history_reads(fake, THREAD) == 2  # pages of 100 and 50

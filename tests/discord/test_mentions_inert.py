"""Mentions the model writes never ping on Discord, however the answer is cut.

Discord has no escaping to get wrong chunk by chunk: every edit carries the whole
text so far, and every message the responder sends or edits says
``allowed_mentions: {"parse": []}``, which turns off ``@everyone``, ``@here``, user
and role pings whatever the content holds. These tests check that over streamed
chunks cut inside mentions and over replies long enough to be split at 2000
characters (a mention may straddle the cut), on channel messages and on an
interaction's webhook.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from bots.discord.responder import DiscordResponderFactory
from core.messages import IncomingMessage, Reply
from core.settings import Settings
from tests.discord.conftest import CHANNEL, GUILD, ROLE
from tests.fakes.discord_fake import DEFAULT_LIMITS, DiscordFake
from tests.fuzz.strategies import fuzz

MENTIONS = [
    "@everyone",
    "@here",
    "<@400000000000000001>",
    "<@!400000000000000002>",
    "<@&400000000000000003>",
]
TOKENS = st.sampled_from(
    [*MENTIONS, "@", "<", ">", "&", "every", "one", "word ", " ", "\n", "\n\n"]
)
# Up to ~3,000 characters: long answers are split into two messages.
TEXT = st.builds(
    lambda n, tail: "word " * n + tail,
    st.integers(min_value=0, max_value=560),
    st.lists(TOKENS, min_size=1, max_size=40).map("".join),
).filter(str.strip)

_ids = itertools.count(800_000_000_000_000_001)


@pytest.fixture
async def fake() -> AsyncIterator[DiscordFake]:
    """The fake Discord with room for many replies: these tests look at content, not pacing."""
    roomy = {route: (10_000, 1.0) for route in DEFAULT_LIMITS}
    async with DiscordFake(limits=roomy, global_limit=10_000) as f:
        f.add_guild(GUILD, channels=[CHANNEL], roles=[ROLE])
        yield f


@pytest.fixture
async def factory(
    discord_settings: Settings, redis: Redis
) -> AsyncIterator[DiscordResponderFactory]:
    f = DiscordResponderFactory(discord_settings, redis)
    await f.start()
    yield f
    await f.close()


def _incoming(fake: DiscordFake) -> IncomingMessage:
    message_id = str(next(_ids))
    fake.messages[message_id] = {
        "id": message_id,
        "channel_id": CHANNEL,
        "guild_id": GUILD,
        "author": DiscordFake.user(1, "u"),
        "content": "q",
    }
    return IncomingMessage(
        platform="discord",
        tenant=GUILD,
        channel=CHANNEL,
        user="1",
        message_id=message_id,
        text="q",
        meta={"reply_to": message_id},
    )


async def _answer(
    factory: DiscordResponderFactory, msg: IncomingMessage, pieces: list[str]
) -> None:
    responder = factory.responder(msg, msg.job_id)
    await responder.begin()
    text = ""
    for piece in pieces:
        text += piece
        await responder.stream(text)
    await responder.finish(Reply(text=text))


def _content_calls(fake: DiscordFake) -> list[Any]:
    """Every request that carried message content (posts and edits, channel or webhook)."""
    return [
        c
        for c in fake.calls
        if c.method in ("POST", "PATCH") and isinstance(c.body, dict) and "content" in c.body
    ]


def _replies_to(fake: DiscordFake, msg: IncomingMessage) -> list[dict[str, Any]]:
    first = [
        m
        for m in fake.bot_messages(CHANNEL)
        if (m.get("message_reference") or {}).get("message_id") == msg.message_id
    ]
    assert len(first) == 1
    start = int(first[0]["id"])
    others = [m for m in fake.bot_messages(CHANNEL) if int(m["id"]) >= start]
    return sorted(others, key=lambda m: int(m["id"]))


@fuzz(40)
@given(text=TEXT, cuts=st.lists(st.integers(min_value=1, max_value=3_000), max_size=6))
async def test_any_answer_cut_anywhere_is_sent_with_every_ping_turned_off(
    factory: DiscordResponderFactory, fake: DiscordFake, text: str, cuts: list[int]
) -> None:
    fake.calls.clear()
    for m in fake.bot_messages(CHANNEL):
        del fake.messages[m["id"]]
    msg = _incoming(fake)
    points = sorted({c for c in cuts if c < len(text)})
    await _answer(factory, msg, [text[a:b] for a, b in itertools.pairwise([0, *points, len(text)])])
    sent = _content_calls(fake)
    assert sent
    assert all(c.body["allowed_mentions"] == {"parse": []} for c in sent)
    shown = [m["content"] for m in _replies_to(fake, msg)]
    assert all(len(s) <= 2000 for s in shown)
    assert re.sub(r"\s", "", "".join(shown)) == re.sub(r"\s", "", text)


async def test_a_mention_straddling_the_2000_character_split_pings_no_one(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    for cut_inside in range(len("@everyone") + 1):
        fake.calls.clear()
        for m in fake.bot_messages(CHANNEL):
            del fake.messages[m["id"]]
        msg = _incoming(fake)
        text = "x" * (2000 - cut_inside) + "@everyone <@&400000000000000003> tail"
        await _answer(factory, msg, [text[:1999], text[1999:]])
        shown = [m["content"] for m in _replies_to(fake, msg)]
        assert len(shown) == 2 and "".join(shown) == text
        assert all(c.body["allowed_mentions"] == {"parse": []} for c in _content_calls(fake))


async def test_an_interaction_answer_with_mentions_pings_no_one(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    inter = await fake.invoke_ask(CHANNEL, DiscordFake.user(1, "u"), "q")
    inter.callback_type = 5  # deferred by the adapter
    msg = IncomingMessage(
        platform="discord",
        tenant=GUILD,
        channel=CHANNEL,
        user="1",
        message_id=inter.id,
        text="q",
        meta={"interaction_token": inter.token, "application_id": fake.application_id},
    )
    text = "@everyone <@&400000000000000003> " * 80  # two messages
    await _answer(factory, msg, [text[:6], text[6:26], text[26:]])  # "@every" | "one <@&…"
    assert inter.original is not None and inter.followups
    webhook = [c for c in _content_calls(fake) if c.route.split(" ", 1)[1].startswith("/webhooks/")]
    assert webhook and all(c.body["allowed_mentions"] == {"parse": []} for c in webhook)

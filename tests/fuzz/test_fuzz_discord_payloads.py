"""Fuzz: Discord messages of any content, author and mentions, through the real adapter.

Each example builds a MESSAGE_CREATE payload as Discord's gateway sends it, lets
the adapter's own discord.py client parse it (``discord.Message``, as its gateway
handler does) and hands it to the adapter's intake (checks, dedupe, enqueue on the
real Redis). Properties: never an exception; messages from bots are dropped; a DM
or a mention from a person is queued, with the bot's mention stripped and the rest
of the text kept. ``/ask`` interactions go through the fake gateway and discord.py's
command tree: each is deferred and queued with its question.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import discord
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from redis.asyncio import Redis

from bots.discord.gateway import SluiceClient
from bots.discord.intake import strip_mention
from core.settings import Settings
from tests.discord.conftest import CHANNEL, GUILD, ROLE, queued, running_adapter, wait_for
from tests.fakes.discord_fake import DiscordFake
from tests.fuzz.strategies import HOSTILE_TEXT, fuzz

_ids = itertools.count(1)
DM_BASE = 510_000_000_000_000_000


@pytest.fixture
async def client(discord_settings: Settings, fake: DiscordFake) -> AsyncIterator[SluiceClient]:
    settings = discord_settings.model_copy(
        update={
            "discord_typing": False,
            "discord_threads": False,
            "queued_notice_after_s": 0.0,
            # Hundreds of examples from a few ids: the door's limits are not under test.
            "user_requests_per_window": None,
        }
    )
    async with running_adapter(settings, fake) as c:
        yield c


NAME = st.one_of(HOSTILE_TEXT.map(lambda t: t[:32] or "x"), st.just("u"))
SNOWFLAKE = st.integers(min_value=10**17, max_value=2**63 - 1).map(str)


@fuzz(150)
@given(
    content=HOSTILE_TEXT,
    name=NAME,
    author_id=SNOWFLAKE,
    is_bot=st.booleans(),
    where=st.sampled_from(["dm", "guild mention", "guild plain", "guild reply to bot"]),
    roles=st.lists(st.sampled_from([ROLE, "400000000000000009"]), max_size=2, unique=True),
    other_mentions=st.lists(SNOWFLAKE, max_size=3),
)
async def test_any_discord_message_is_queued_or_dropped_never_a_crash(
    client: SluiceClient,
    fake: DiscordFake,
    redis: Redis,
    content: str,
    name: str,
    author_id: str,
    is_bot: bool,
    where: str,
    roles: list[str],
    other_mentions: list[str],
) -> None:
    assert client.user is not None
    bot_id = str(client.user.id)
    author = {**DiscordFake.user(author_id, name, bot=is_bot), "global_name": name}
    mentions: list[dict[str, Any]] = [DiscordFake.user(m, "m") for m in other_mentions]
    if where == "guild mention":
        content = f"<@{bot_id}> {content}"
        mentions.append(fake.bot_user)
    payload: dict[str, Any] = {
        "id": fake.snowflake(),
        "channel_id": CHANNEL,
        "author": author,
        "content": content,
        "timestamp": "2026-12-04T20:00:00.000000+00:00",
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": "@everyone" in content,
        "mentions": mentions,
        "mention_roles": [r for r in roles if f"<@&{r}>" in content],
        "attachments": [],
        "embeds": [],
        "pinned": False,
        "type": 0,
        "flags": 0,
        "components": [],
    }
    if where == "dm":
        payload["channel_id"] = str(DM_BASE + next(_ids))
        # The default DM policy answers members of a guild the bot shares.
        fake.add_member(GUILD, author)
    else:
        payload["guild_id"] = GUILD
        payload["member"] = {
            "roles": roles,
            "joined_at": "2026-01-01T00:00:00.000000+00:00",
            "deaf": False,
            "mute": False,
            "nick": name,
        }
    if where == "guild reply to bot":
        replied = {**payload, "id": fake.snowflake(), "author": fake.bot_user, "content": "hi"}
        replied.pop("member")
        payload["type"] = 19
        payload["message_reference"] = {"message_id": replied["id"], "channel_id": CHANNEL}
        payload["referenced_message"] = replied
        payload["mentions"] = [*mentions, fake.bot_user]

    # What the adapter's gateway handler does with MESSAGE_CREATE (discord.py's own parse).
    state = client._connection
    channel, _ = state._get_guild_channel(payload)
    message = discord.Message(state=state, channel=channel, data=payload)  # type: ignore[arg-type]
    taken = await client.intake.on_message(message, client.user)

    from_person = not is_bot and author_id != bot_id
    addressed = where != "guild plain"
    event(f"{where}, {'person' if from_person else 'bot'}: {'queued' if taken else 'dropped'}")
    if not from_person:
        assert not taken
    elif addressed and content.strip():
        assert taken, payload
    if taken:
        [msg] = [m for m in await queued(redis, client.settings) if m.message_id == payload["id"]]
        assert msg.text == strip_mention(content, bot_id)
        assert msg.user == author_id
        assert msg.tenant == (f"dm-{author_id}" if where == "dm" else GUILD)


@fuzz(60)
@given(question=HOSTILE_TEXT, name=NAME, author_id=SNOWFLAKE, in_guild=st.booleans())
async def test_any_ask_interaction_is_deferred_and_queued(
    client: SluiceClient,
    fake: DiscordFake,
    redis: Redis,
    question: str,
    name: str,
    author_id: str,
    in_guild: bool,
) -> None:
    """``/ask`` through the fake gateway (INTERACTION_CREATE, discord.py's command tree)."""
    user = {**DiscordFake.user(author_id, name), "global_name": name}
    channel = CHANNEL
    if not in_guild:
        channel = await fake.dm_channel(str(DM_BASE + next(_ids)), user)
        fake.add_member(GUILD, user)  # the default DM policy answers members
    inter = await fake.invoke_ask(channel, user, question)
    await wait_for(lambda: inter.callback_type is not None, timeout_s=20)
    assert inter.callback_type == 5  # deferred: the answer follows

    async def job() -> list[Any]:
        return [m for m in await queued(redis, client.settings) if m.message_id == inter.id]

    await wait_for(job, timeout_s=20)
    [msg] = await job()
    assert msg.text == question.strip()
    assert msg.user == author_id

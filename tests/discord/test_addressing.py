"""Who the Discord adapter answers: replies to the bot with the ping off, channels that
listen without a mention (setting or ``/listen``), and admins marked for ``/model``.

Real discord.py against the fake gateway; jobs land in Redis.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from core.infra.redis import Keys
from core.settings import Settings
from core.traffic.choices import Choices
from tests.discord.conftest import (
    CHANNEL,
    GUILD,
    OTHER_CHANNEL,
    THREAD,
    IntakeLog,
    queued,
    wait_for,
)
from tests.fakes.discord_fake import DiscordFake

ALICE = DiscordFake.user(630000000000000001, "alice")
BOB = DiscordFake.user(630000000000000002, "bob")
MANAGE_GUILD = 1 << 5


def said_by(fake: DiscordFake, author: dict[str, Any], channel: str = CHANNEL) -> dict[str, Any]:
    """A message already in the channel (known to the fake's REST API)."""
    return fake.add_history(channel, author, "Earlier message")


async def _texts(redis: Redis, settings: Settings) -> list[str]:
    return [m.text for m in await queued(redis, settings)]


async def test_reply_to_the_bot_with_the_ping_off_is_answered(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    bot_said = said_by(fake, fake.bot_user)
    async with adapter(discord_message_content=True):
        await fake.send_user_message(CHANNEL, ALICE, "why though?", reply_to=bot_said, ping=False)
        await wait_for(lambda: queued(redis, discord_settings))
    [msg] = await queued(redis, discord_settings)
    assert msg.text == "why though?"
    assert fake.calls_to("GET", "/channels/{channel_id}/messages/") == []  # Discord said whose


async def test_reply_without_the_referenced_message_is_checked_over_rest(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings, intake_log: IntakeLog
) -> None:
    bot_said = said_by(fake, fake.bot_user)
    bob_said = said_by(fake, BOB)
    async with adapter(discord_message_content=True):
        # Discord may leave referenced_message out; the adapter asks whose message it was.
        to_bob = await fake.send_user_message(
            CHANNEL, ALICE, "to bob", reply_to=bob_said, ping=False, include_referenced=False
        )
        await fake.send_user_message(
            CHANNEL, ALICE, "to the bot", reply_to=bot_said, ping=False, include_referenced=False
        )
        await wait_for(lambda: queued(redis, discord_settings))
        await intake_log.handled(to_bob)
    assert len(fake.calls_to("GET", "/channels/{channel_id}/messages/")) == 2
    assert await _texts(redis, discord_settings) == ["to the bot"]


async def test_ping_off_reply_without_the_content_intent_cannot_be_read(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings, intake_log: IntakeLog
) -> None:
    bot_said = said_by(fake, fake.bot_user)
    async with adapter():
        # Discord blanks a reply that does not mention the bot; nothing to answer.
        unseen = await fake.send_user_message(
            CHANNEL, ALICE, "unseen", reply_to=bot_said, ping=False
        )
        await fake.send_user_message(CHANNEL, ALICE, "seen", reply_to=bot_said)
        await wait_for(lambda: queued(redis, discord_settings))
        await intake_log.handled(unseen)
    assert await _texts(redis, discord_settings) == ["seen"]


async def test_listen_channels_setting_answers_without_a_mention(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings, intake_log: IntakeLog
) -> None:
    async with adapter(discord_message_content=True, discord_listen_channels=[CHANNEL]):
        elsewhere = await fake.send_user_message(OTHER_CHANNEL, ALICE, "not here")
        await fake.send_user_message(CHANNEL, ALICE, "hello there")
        await wait_for(lambda: queued(redis, discord_settings))
        await intake_log.handled(elsewhere)
    [msg] = await queued(redis, discord_settings)
    assert (msg.channel, msg.text) == (CHANNEL, "hello there")


async def test_listen_on_stored_in_redis_covers_the_channel_and_its_threads(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    choices = Choices(redis, Keys(discord_settings.key_prefix))
    await choices.set_listening("discord", GUILD, OTHER_CHANNEL, True)
    await choices.set_listening("discord", GUILD, CHANNEL, True)
    async with adapter(discord_message_content=True):
        await fake.send_user_message(OTHER_CHANNEL, ALICE, "in the channel")
        await wait_for(lambda: queued(redis, discord_settings))
        await choices.set_listening("discord", GUILD, OTHER_CHANNEL, False)
        await fake.send_user_message(THREAD, ALICE, "in a thread of a listening channel")
        await wait_for(lambda: _has(redis, discord_settings, 2))
    texts = await _texts(redis, discord_settings)
    assert texts == ["in the channel", "in a thread of a listening channel"]


async def _has(redis: Redis, settings: Settings, n: int) -> bool:
    return len(await queued(redis, settings)) >= n


async def test_members_who_manage_the_server_are_marked_admin(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    admin_role = "410000000000000009"
    fake.add_role(GUILD, admin_role, permissions=MANAGE_GUILD)
    async with adapter():
        await fake.send_user_message(CHANNEL, BOB, "plain member", mention_bot=True)
        await fake.send_user_message(
            CHANNEL, ALICE, "server manager", mention_bot=True, roles=[admin_role]
        )
        await wait_for(lambda: _has(redis, discord_settings, 2))
    by_text = {m.text: m for m in await queued(redis, discord_settings)}
    assert "admin" not in by_text["plain member"].meta
    assert by_text["server manager"].meta["admin"] == "1"

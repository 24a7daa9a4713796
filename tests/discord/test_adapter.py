"""The Discord adapter: real discord.py against the fake gateway; jobs land in Redis."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from core.settings import Settings
from tests.discord.conftest import CHANNEL, GUILD, queued, wait_for
from tests.fakes.discord_fake import MESSAGE_CONTENT_INTENT, DiscordFake

ALICE = DiscordFake.user(600000000000000001, "alice")


async def test_mention_in_a_channel_is_enqueued_without_the_mention(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    async with adapter():
        sent = await fake.send_user_message(CHANNEL, ALICE, "what is a sluice?",
                                            mention_bot=True)
        await wait_for(lambda: queued(redis, discord_settings))
    [msg] = await queued(redis, discord_settings)
    assert msg.platform == "discord"
    assert (msg.tenant, msg.channel, msg.thread) == (GUILD, CHANNEL, None)
    assert msg.text == "what is a sluice?"
    assert msg.message_id == sent["id"]
    assert msg.meta["reply_to"] == sent["id"]
    assert not msg.is_dm
    assert fake.identifies[0]["intents"] & MESSAGE_CONTENT_INTENT == 0


async def test_plain_channel_message_is_not_for_the_bot(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    async with adapter():
        await fake.send_user_message(CHANNEL, ALICE, "just chatting")
        await fake.send_user_message(CHANNEL, ALICE, "hey bot", mention_bot=True)
        await wait_for(lambda: queued(redis, discord_settings))
        await asyncio.sleep(0.1)
    assert [m.text for m in await queued(redis, discord_settings)] == ["hey bot"]

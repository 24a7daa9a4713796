"""The Discord adapter: real discord.py against the fake gateway; jobs land in Redis."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from bots.discord.interactions import TOKEN_TTL_S, token_key
from core.infra.redis import Keys
from core.settings import Settings
from tests.discord.conftest import (
    CHANNEL,
    DM_CHANNEL,
    GUILD,
    OTHER_CHANNEL,
    ROLE,
    THREAD,
    IntakeLog,
    queued,
    wait_for,
)
from tests.fakes.discord_fake import MESSAGE_CONTENT_INTENT, DiscordFake

ALICE = DiscordFake.user(600000000000000001, "alice")


async def test_mention_in_a_channel_is_enqueued_without_the_mention(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    async with adapter():
        sent = await fake.send_user_message(CHANNEL, ALICE, "what is a sluice?", mention_bot=True)
        await wait_for(lambda: queued(redis, discord_settings))
        # Typing shows while the message waits for a worker (sent after the enqueue).
        await wait_for(lambda: fake.calls_to("POST", "/channels/{channel_id}/typing"))
    [msg] = await queued(redis, discord_settings)
    assert msg.platform == "discord"
    # In a guild channel each user has their own conversation with the bot.
    assert (msg.tenant, msg.channel, msg.thread) == (GUILD, CHANNEL, f"user:{ALICE['id']}")
    assert msg.text == "what is a sluice?"
    assert msg.message_id == sent["id"]
    assert msg.meta["reply_to"] == sent["id"]
    assert not msg.is_dm
    assert fake.identifies[0]["intents"] & MESSAGE_CONTENT_INTENT == 0
    assert [c.major for c in fake.calls_to("POST", "/channels/{channel_id}/typing")] == [CHANNEL]


async def test_plain_channel_message_is_not_for_the_bot(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings, intake_log: IntakeLog
) -> None:
    async with adapter():
        chat = await fake.send_user_message(CHANNEL, ALICE, "just chatting")
        await fake.send_user_message(CHANNEL, ALICE, "hey bot", mention_bot=True)
        await wait_for(lambda: queued(redis, discord_settings))
        await intake_log.handled(chat)
    assert [m.text for m in await queued(redis, discord_settings)] == ["hey bot"]


BOB = DiscordFake.user(600000000000000002, "bob")
OTHER_BOT = DiscordFake.user(600000000000000003, "otherbot", bot=True)


async def test_reply_to_a_bot_message_is_a_conversation(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    bot_said = {
        "id": fake.snowflake(),
        "channel_id": CHANNEL,
        "author": fake.bot_user,
        "content": "Earlier answer",
        "timestamp": "2026-01-01T00:00:00+00:00",
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "pinned": False,
        "type": 0,
        "flags": 0,
    }
    async with adapter():
        sent = await fake.send_user_message(CHANNEL, ALICE, "and why?", reply_to=bot_said)
        await wait_for(lambda: queued(redis, discord_settings))
    [msg] = await queued(redis, discord_settings)
    assert msg.text == "and why?"
    assert msg.meta["reply_to"] == sent["id"]


async def test_direct_message_is_a_conversation_in_the_users_own_dm_tenant(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    fake.add_member(GUILD, ALICE)  # the default DM policy answers members of the bot's guilds
    async with adapter():
        dm = await fake.dm_channel(DM_CHANNEL, ALICE)
        await fake.send_user_message(dm, ALICE, "hello in private")
        await wait_for(lambda: queued(redis, discord_settings))
    [msg] = await queued(redis, discord_settings)
    assert (msg.tenant, msg.channel, msg.is_dm, msg.text) == (
        f"dm-{ALICE['id']}",
        DM_CHANNEL,
        True,
        "hello in private",
    )


async def test_thread_message_needs_message_content_and_is_its_own_conversation(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings, intake_log: IntakeLog
) -> None:
    async with adapter():
        blank = await fake.send_user_message(THREAD, ALICE, "no intent: content is blank")
        await intake_log.handled(blank)
    assert await queued(redis, discord_settings) == []
    async with adapter(discord_message_content=True):
        await fake.send_user_message(THREAD, ALICE, "in the thread")
        await wait_for(lambda: queued(redis, discord_settings))
    [msg] = await queued(redis, discord_settings)
    assert (msg.channel, msg.thread, msg.text) == (THREAD, None, "in the thread")
    assert fake.identifies[-1]["intents"] & MESSAGE_CONTENT_INTENT


async def test_same_message_create_twice_enqueues_one_job(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings, intake_log: IntakeLog
) -> None:
    async with adapter():
        sent = await fake.send_user_message(CHANNEL, ALICE, "once", mention_bot=True)
        await fake.dispatch("MESSAGE_CREATE", sent)  # a replay after a resume
        await wait_for(lambda: queued(redis, discord_settings))
        await intake_log.handled(sent)  # one of the two is logged as the duplicate
    assert len(await queued(redis, discord_settings)) == 1
    marker = await redis.ttl(f"{discord_settings.key_prefix}:dedupe:discord:{sent['id']}")
    assert marker > 86000


async def test_own_and_other_bots_messages_are_ignored(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings, intake_log: IntakeLog
) -> None:
    async with adapter():
        beep = await fake.send_user_message(CHANNEL, OTHER_BOT, "beep", mention_bot=True)
        me = await fake.send_user_message(CHANNEL, fake.bot_user, "me", mention_bot=True)
        await fake.send_user_message(CHANNEL, ALICE, "human", mention_bot=True)
        await wait_for(lambda: queued(redis, discord_settings))
        await intake_log.handled(beep, me)
    assert [m.text for m in await queued(redis, discord_settings)] == ["human"]


async def test_allow_and_deny_lists_filter_users_channels_and_roles(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings, intake_log: IntakeLog
) -> None:
    async with adapter(
        discord_deny_users=[BOB["id"]], discord_allow_channels=[CHANNEL], discord_allow_roles=[ROLE]
    ):
        refused = [
            await fake.send_user_message(
                CHANNEL, BOB, "denied user", mention_bot=True, roles=[ROLE]
            ),
            await fake.send_user_message(
                OTHER_CHANNEL, ALICE, "other channel", mention_bot=True, roles=[ROLE]
            ),
            await fake.send_user_message(CHANNEL, ALICE, "no role", mention_bot=True),
        ]
        await fake.send_user_message(CHANNEL, ALICE, "welcome", mention_bot=True, roles=[ROLE])
        await wait_for(lambda: queued(redis, discord_settings))
        await intake_log.handled(*refused)
    assert [m.text for m in await queued(redis, discord_settings)] == ["welcome"]
    async with adapter(discord_deny_guilds=[GUILD]):
        denied = await fake.send_user_message(CHANNEL, ALICE, "guild denied", mention_bot=True)
        await intake_log.handled(denied)
    assert [m.text for m in await queued(redis, discord_settings)] == ["welcome"]


async def test_threads_setting_opens_a_thread_for_a_new_conversation(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    async with adapter(discord_threads=True):
        sent = await fake.send_user_message(CHANNEL, ALICE, "Plan a trip\nmore", mention_bot=True)
        await wait_for(lambda: queued(redis, discord_settings))
        thread = fake.channels[sent["id"]]
    [msg] = await queued(redis, discord_settings)
    assert thread["type"] == 11 and thread["name"] == "Plan a trip"
    assert msg.channel == thread["id"] and "reply_to" not in msg.meta


async def test_ask_defers_and_enqueues(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    async with adapter():
        assert [c["name"] for c in fake.commands] == ["ask"]
        inter = await fake.invoke_ask(CHANNEL, ALICE, "what time is it?")
        await wait_for(lambda: queued(redis, discord_settings))
    # DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE; the fake, like Discord, refuses it after 3 s.
    assert inter.callback_type == 5
    [msg] = await queued(redis, discord_settings)
    assert msg.text == "what time is it?"
    assert msg.meta["application_id"] == fake.application_id
    # The job carries a reference; the token waits in its own short-lived key.
    assert inter.token not in str(msg.model_dump()) and "interaction_token" not in msg.meta
    key = token_key(Keys(discord_settings.key_prefix), msg.meta["interaction"])
    assert await redis.get(key) == inter.token.encode()
    assert 0 < await redis.ttl(key) <= TOKEN_TTL_S


async def test_enqueue_failure_releases_the_dedupe_claim(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings, intake_log: IntakeLog
) -> None:
    async with adapter() as client:
        queue = client.intake.queue

        async def broken(*args: object, **kwargs: object) -> None:
            raise OSError("redis went away")

        queue.enqueue_job = broken  # type: ignore[method-assign]
        sent = await fake.send_user_message(CHANNEL, ALICE, "lost?", mention_bot=True)
        await intake_log.handled(sent)  # "discord enqueue failed message=…"
        key = f"{discord_settings.key_prefix}:dedupe:discord:{sent['id']}"
        assert not await redis.exists(key)
        del queue.enqueue_job  # the instance attribute; back to the real method
        await fake.dispatch("MESSAGE_CREATE", sent)  # replayed after a resume
        await wait_for(lambda: queued(redis, discord_settings))
    assert [m.text for m in await queued(redis, discord_settings)] == ["lost?"]


async def test_ask_from_a_denied_user_gets_a_private_refusal_and_no_job(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    async with adapter(discord_deny_users=[BOB["id"]]):
        refused = await fake.invoke_ask(CHANNEL, BOB, "let me in")
        await wait_for(lambda: refused.callback_type is not None)
        await fake.invoke_ask(CHANNEL, ALICE, "allowed")
        await wait_for(lambda: queued(redis, discord_settings))
    assert refused.callback_type == 4  # CHANNEL_MESSAGE_WITH_SOURCE, ephemeral
    callback = next(c for c in fake.calls if refused.token in c.path)
    assert callback.body["data"]["flags"] & 64  # EPHEMERAL
    assert [m.text for m in await queued(redis, discord_settings)] == ["allowed"]


async def test_events_replayed_after_a_gateway_resume_are_not_enqueued_twice(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings, intake_log: IntakeLog
) -> None:
    async with adapter():
        sent = await fake.send_user_message(CHANNEL, ALICE, "before", mention_bot=True)
        await wait_for(lambda: queued(redis, discord_settings))
        await fake.reconnect(replay=[("MESSAGE_CREATE", sent)])
        await wait_for(lambda: fake.resumes == 1)
        await fake.send_user_message(CHANNEL, ALICE, "after", mention_bot=True)
        await wait_for(lambda: _count(redis, discord_settings, 2))
        await intake_log.handled(sent)  # the replay, logged as a duplicate
    assert [m.text for m in await queued(redis, discord_settings)] == ["before", "after"]


async def _count(redis: Redis, settings: Settings, n: int) -> bool:
    return len(await queued(redis, settings)) >= n


def test_id_lists_read_from_the_environment_as_commas_or_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLUICE_DISCORD_ALLOW_GUILDS", " 1, 2 ,,3")
    monkeypatch.setenv("SLUICE_DISCORD_DENY_USERS", '["4", 5]')
    s = Settings(_env_file=None)
    assert s.discord_allow_guilds == ["1", "2", "3"]
    assert s.discord_deny_users == ["4", "5"]
    assert s.discord_allow_roles == []

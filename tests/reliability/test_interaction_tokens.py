"""Discord ``/ask`` interaction tokens stay out of job payloads, arq's job results and
Redis key names: the job carries a reference, the token waits in one short-lived key
that the delivered reply deletes (``bots/discord/interactions.py``). The real
responder against the fake Discord REST API, a real Redis.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from bots.discord.interactions import keep_token, token_key
from bots.discord.responder import DiscordResponderFactory
from core.errors import DeliveryError
from core.infra.redis import Keys
from core.messages import IncomingMessage, Reply
from core.settings import Settings
from tests.discord import conftest as discord_conftest
from tests.discord.conftest import CHANNEL, GUILD
from tests.fakes.discord_fake import DiscordFake

discord_settings = discord_conftest.discord_settings  # the fixture, here too


@pytest.fixture
async def factory(
    discord_settings: Settings, redis: Redis
) -> AsyncIterator[DiscordResponderFactory]:
    f = DiscordResponderFactory(discord_settings, redis)
    await f.start()
    yield f
    await f.close()


def ask_message(interaction_id: str, meta: dict[str, str]) -> IncomingMessage:
    return IncomingMessage(
        platform="discord",
        tenant=GUILD,
        channel=CHANNEL,
        user="1",
        message_id=interaction_id,
        text="q",
        meta=meta,
    )


async def _keys_and_values(redis: Redis, prefix: str) -> bytes:
    out: list[bytes] = []
    async for key in redis.scan_iter(match=f"*{prefix}*", count=1000):
        out.append(key)
        kind = (await redis.type(key)).decode()
        if kind == "string":
            out.append(await redis.get(key) or b"")
        elif kind == "hash":
            for k, v in (await redis.hgetall(key)).items():
                out += [k, v]
    return b"\n".join(out)


async def test_an_ask_reply_uses_the_token_by_reference_and_deletes_it_once_delivered(
    factory: DiscordResponderFactory, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    keys = Keys(discord_settings.key_prefix)
    inter = await fake.invoke_ask(CHANNEL, DiscordFake.user(1, "u"), "q")
    inter.callback_type = 5  # deferred by the adapter
    ref = await keep_token(redis, keys, inter.token)
    msg = ask_message(inter.id, {"interaction": ref, "application_id": fake.application_id})
    assert inter.token not in msg.model_dump_json()
    responder = factory.responder(msg, msg.job_id)
    await responder.begin()
    await responder.stream("the answer so far")
    # While the reply is being written: the token is only a key's value, never a name.
    during = await _keys_and_values(redis, discord_settings.key_prefix)
    assert during.count(inter.token.encode()) == 1
    assert await redis.exists(token_key(keys, ref))
    await responder.finish(Reply(text="the answer " + "long " * 500))
    assert inter.original is not None and inter.original["content"].startswith("the answer")
    assert len(inter.followups) == 1
    after = await _keys_and_values(redis, discord_settings.key_prefix)
    assert b":discord:bucket:" in after  # the webhook route's bucket, named by the reference
    assert inter.token.encode() not in after
    assert not await redis.exists(token_key(keys, ref))


async def test_an_ask_whose_token_expired_is_a_delivery_error_without_a_call(
    factory: DiscordResponderFactory, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    inter = await fake.invoke_ask(CHANNEL, DiscordFake.user(1, "u"), "q")
    inter.callback_type = 5
    ref = await keep_token(redis, Keys(discord_settings.key_prefix), inter.token)
    await redis.delete(token_key(Keys(discord_settings.key_prefix), ref))  # 15 min later
    msg = ask_message(inter.id, {"interaction": ref, "application_id": fake.application_id})
    responder = factory.responder(msg, msg.job_id)
    await responder.begin()
    calls = len(fake.calls)
    with pytest.raises(DeliveryError, match="interaction token expired"):
        await responder.finish(Reply(text="late answer"))
    assert len(fake.calls) == calls
    assert inter.original is None

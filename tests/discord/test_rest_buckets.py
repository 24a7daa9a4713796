"""Discord REST buckets keyed by ``X-RateLimit-Bucket``, and 429 scopes honoured.

Real aiohttp requests from :class:`bots.discord.rest.DiscordRest` to the fake Discord,
whose routes can share one bucket (one hash) and whose 429s carry ``X-RateLimit-Scope``.
"""

from __future__ import annotations

import asyncio
import hashlib

from redis.asyncio import Redis

from bots.discord.rest import DiscordRest, Route
from core.infra.redis import Keys
from core.settings import Settings
from tests.discord.conftest import CHANNEL, OTHER_CHANNEL
from tests.fakes.discord_fake import DiscordFake

POST = "POST /channels/{channel_id}/messages"
PATCH = "PATCH /channels/{channel_id}/messages/{message_id}"


def post(channel: str) -> Route:
    return Route(
        "POST", "/channels/{channel_id}/messages", channel, f"/channels/{channel}/messages"
    )


def patch(channel: str, message_id: str) -> Route:
    return Route(
        "PATCH",
        "/channels/{channel_id}/messages/{message_id}",
        channel,
        f"/channels/{channel}/messages/{message_id}",
    )


async def test_routes_discord_puts_in_one_bucket_share_one_budget_across_workers(
    fake: DiscordFake, discord_settings: Settings, redis: Redis
) -> None:
    fake.bucket_groups = {POST: "messages", PATCH: "messages"}
    fake.limits[POST] = fake.limits[PATCH] = (4, 1.0)
    first, second = DiscordRest(discord_settings, redis), DiscordRest(discord_settings, redis)
    try:
        # One call of each route teaches the pool their bucket (the same hash).
        created = await first.request(post(CHANNEL), json={"content": "hello"})
        await first.request(patch(CHANNEL, created["id"]), json={"content": "hello!"})
        expected = hashlib.md5(b"messages").hexdigest()
        keys = Keys(discord_settings.key_prefix)
        for route in (POST, PATCH):
            assert await redis.get(keys.discord_route_bucket(route)) == expected.encode()
        # Another worker knows it from Redis before sending anything.
        assert await second.bucket_of(post(CHANNEL)) == f"{expected}:{CHANNEL}"
        assert await second.bucket_of(patch(CHANNEL, "1")) == f"{expected}:{CHANNEL}"
        # Posts and edits from both workers draw on the one budget: no 429.
        await asyncio.gather(
            *[
                w.request(post(CHANNEL), json={"content": f"p{i}"})
                for i, w in enumerate([first, second] * 3)
            ],
            *[
                w.request(patch(CHANNEL, created["id"]), json={"content": f"e{i}"})
                for i, w in enumerate([second, first] * 3)
            ],
        )
    finally:
        await first.close()
        await second.close()
    assert [c.status for c in fake.calls if c.status == 429] == []
    assert len(fake.calls_to("POST", "/channels/{channel_id}/messages")) == 7
    assert len(fake.calls_to("PATCH", "/channels/{channel_id}/messages/")) == 7


async def test_a_shared_scope_429_waits_for_the_resource_without_penalising_the_bot(
    fake: DiscordFake, discord_settings: Settings, redis: Redis
) -> None:
    fake.limit_once("POST", rf"/channels/{CHANNEL}/messages$", scope="shared", retry_after=0.3)
    rest = DiscordRest(discord_settings, redis)
    keys = Keys(discord_settings.key_prefix)
    try:
        sent = await rest.request(post(CHANNEL), json={"content": "busy channel"})
        other = await rest.request(post(OTHER_CHANNEL), json={"content": "elsewhere"})
        # Not the bot's own limit: no lowered global rate for the pool.
        assert not await redis.exists(keys.discord_global_learned())
    finally:
        await rest.close()
    assert sent["content"] == "busy channel" and other["content"] == "elsewhere"
    assert (rest.stats.shared_limited, rest.stats.limited) == (1, 0)
    assert [c.status for c in fake.calls] == [429, 200, 200]


async def test_a_global_scope_429_pauses_the_pool_and_lowers_its_rate(
    fake: DiscordFake, discord_settings: Settings, redis: Redis
) -> None:
    fake.limit_once("POST", rf"/channels/{CHANNEL}/messages$", scope="global", retry_after=0.2)
    rest = DiscordRest(discord_settings, redis)
    keys = Keys(discord_settings.key_prefix)
    try:
        await rest.request(post(CHANNEL), json={"content": "x"})
        assert await redis.exists(keys.discord_global_learned())
    finally:
        await rest.close()
    assert (rest.stats.shared_limited, rest.stats.limited) == (0, 1)


async def test_a_user_scope_429_waits_out_the_bucket_only(
    fake: DiscordFake, discord_settings: Settings, redis: Redis
) -> None:
    fake.limit_once("POST", rf"/channels/{CHANNEL}/messages$", scope="user", retry_after=0.2)
    rest = DiscordRest(discord_settings, redis)
    keys = Keys(discord_settings.key_prefix)
    try:
        await rest.request(post(CHANNEL), json={"content": "x"})
        assert not await redis.exists(keys.discord_global_learned())
    finally:
        await rest.close()
    assert (rest.stats.shared_limited, rest.stats.limited) == (0, 1)
    assert [c.status for c in fake.calls] == [429, 200]

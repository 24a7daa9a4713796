"""Sharding: each process's shards get only their guilds' events (SLUICE_DISCORD_SHARDS).

Real discord.py clients (``AutoShardedClient`` with ``shard_ids``/``shard_count``)
against the fake gateway, which routes guild events to shard ``(guild_id >> 22) % count``
and DMs to shard 0, as Discord does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import discord
import pytest
from redis.asyncio import Redis

from bots.discord.gateway import ShardedSluiceClient, SluiceClient, make_client
from core.settings import Settings
from tests.discord.conftest import queued, wait_for
from tests.fakes.discord_fake import DiscordFake

GUILD_A = "100000000000000001"  # shard 0 of 2
GUILD_B = "110000000000000001"  # shard 1 of 2
CHANNEL_A = "210000000000000001"
CHANNEL_B = "210000000000000002"
ALICE = DiscordFake.user(620000000000000001, "alice")


@pytest.fixture
async def two_guilds() -> AsyncIterator[DiscordFake]:
    async with DiscordFake() as f:
        assert (f.shard_of(GUILD_A, 2), f.shard_of(GUILD_B, 2)) == (0, 1)
        f.add_guild(GUILD_A, channels=[CHANNEL_A])
        f.add_guild(GUILD_B, channels=[CHANNEL_B])
        yield f


@asynccontextmanager
async def connected(settings: Settings, fake: DiscordFake) -> AsyncIterator[SluiceClient]:
    client = make_client(settings, guild_ready_timeout=0.05)
    task = asyncio.create_task(client.start(fake.token))
    try:
        await asyncio.wait_for(client.wait_until_ready(), 30)
        yield client
    finally:
        await client.close()
        await task


def _settings(redis_url: str, fake: DiscordFake, shards: str | None) -> Settings:
    return Settings(
        _env_file=None,
        redis_url=redis_url,
        key_prefix=f"t{uuid.uuid4().hex[:12]}",
        discord_token=fake.token,
        discord_api_url=fake.api_url,
        discord_shards=shards,
        discord_dm_policy="everyone",
    )


async def _clean(redis: Redis, *settings: Settings) -> None:
    for s in settings:
        async for key in redis.scan_iter(match=f"{s.key_prefix}:*", count=1000):
            await redis.delete(key)


async def test_two_processes_with_different_shard_ranges_each_get_only_their_guilds(
    two_guilds: DiscordFake, redis_url: str, redis: Redis
) -> None:
    fake = two_guilds
    first = _settings(redis_url, fake, "0-0/2")
    second = _settings(redis_url, fake, "1/2")
    try:
        async with connected(first, fake) as a, connected(second, fake) as b:
            assert isinstance(a, ShardedSluiceClient) and isinstance(b, ShardedSluiceClient)
            shards = sorted(tuple(i["shard"]) for i in fake.identifies)
            assert shards == [(0, 2), (1, 2)]
            assert [str(g.id) for g in a.guilds] == [GUILD_A]
            assert [str(g.id) for g in b.guilds] == [GUILD_B]
            to_a = await fake.send_user_message(CHANNEL_A, ALICE, "for A", mention_bot=True)
            to_b = await fake.send_user_message(CHANNEL_B, ALICE, "for B", mention_bot=True)
            dm = await fake.dm_channel("510000000000000001", ALICE)
            to_dm = await fake.send_user_message(dm, ALICE, "a DM")
            await wait_for(lambda: _count(redis, first, 2))
            await wait_for(lambda: _count(redis, second, 1))
        got_a = {m.message_id for m in await queued(redis, first)}
        got_b = {m.message_id for m in await queued(redis, second)}
        assert got_a == {to_a["id"], to_dm["id"]}  # DMs go to shard 0
        assert got_b == {to_b["id"]}
        # Each message went out on one shard's connection only.
        sent = [(shard, i) for shard, event, i in fake.shard_events if event == "MESSAGE_CREATE"]
        assert sorted(sent) == sorted(
            [((0, 2), to_a["id"]), ((0, 2), to_dm["id"]), ((1, 2), to_b["id"])]
        )
    finally:
        await _clean(redis, first, second)


async def _count(redis: Redis, settings: Settings, n: int) -> bool:
    return len(await queued(redis, settings)) >= n


async def test_auto_runs_every_shard_discord_recommends_in_one_process(
    two_guilds: DiscordFake, redis_url: str, redis: Redis
) -> None:
    fake = two_guilds
    fake.recommended_shards = 2
    settings = _settings(redis_url, fake, "auto")
    try:
        async with connected(settings, fake) as client:
            assert isinstance(client, discord.AutoShardedClient)
            assert sorted(tuple(i["shard"]) for i in fake.identifies) == [(0, 2), (1, 2)]
            assert sorted(str(g.id) for g in client.guilds) == [GUILD_A, GUILD_B]
            await fake.send_user_message(CHANNEL_A, ALICE, "for A", mention_bot=True)
            await fake.send_user_message(CHANNEL_B, ALICE, "for B", mention_bot=True)
            await wait_for(lambda: _count(redis, settings, 2))
        assert sorted(m.text for m in await queued(redis, settings)) == ["for A", "for B"]
    finally:
        await _clean(redis, settings)


def test_unset_shards_is_one_plain_connection(redis_url: str) -> None:
    settings = Settings(_env_file=None, redis_url=redis_url, discord_token="x")
    client = make_client(settings)
    assert type(client) is SluiceClient


@pytest.mark.parametrize("spec", ["0-4/4", "3-1/8", "x/2", "1-2", "-1/2", "0/0"])
def test_bad_shard_ranges_are_refused_with_the_reason(spec: str) -> None:
    with pytest.raises(ValueError, match="shard"):
        Settings(_env_file=None, discord_shards=spec)

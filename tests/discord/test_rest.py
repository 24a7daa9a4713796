"""Pacing of Discord REST calls shared by every worker through Redis."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
from redis.asyncio import Redis

from bots.discord.rest import DiscordRest, Route
from core.infra.redis import Keys
from core.settings import Settings
from tests.discord.conftest import CHANNEL, OTHER_CHANNEL
from tests.fakes.discord_fake import DiscordFake
from tests.helpers import wait_until


def post(channel: str) -> Route:
    return Route(
        "POST", "/channels/{channel_id}/messages", channel, f"/channels/{channel}/messages"
    )


async def test_two_workers_share_one_channel_bucket_without_429(
    fake: DiscordFake, discord_settings: Settings, redis: Redis
) -> None:
    fake.limits["POST /channels/{channel_id}/messages"] = (5, 1.0)
    workers = [DiscordRest(discord_settings, redis) for _ in range(2)]
    started = time.monotonic()
    try:
        await asyncio.gather(
            *[
                w.request(post(CHANNEL), json={"content": f"m{w_i}-{i}"})
                for w_i, w in enumerate(workers)
                for i in range(6)
            ]
        )
    finally:
        for w in workers:
            await w.close()
    assert len(fake.bot_messages(CHANNEL)) == 12
    assert [c.status for c in fake.calls if c.status == 429] == []
    assert time.monotonic() - started >= 2.0  # 12 posts at 5 per second: three windows


async def test_429_from_a_bucket_used_elsewhere_is_waited_out_once(
    fake: DiscordFake, discord_settings: Settings, redis: Redis
) -> None:
    fake.limits["POST /channels/{channel_id}/messages"] = (2, 1.0)
    async with aiohttp.ClientSession() as other_client:  # e.g. another bot process
        for i in range(2):
            async with other_client.post(
                f"{fake.api_url}/channels/{CHANNEL}/messages",
                json={"content": f"elsewhere {i}"},
                headers={"Authorization": f"Bot {fake.token}"},
            ) as resp:
                assert resp.status == 200
    rest = DiscordRest(discord_settings, redis)
    try:
        started = time.monotonic()
        data = await rest.request(post(CHANNEL), json={"content": "paced"})
        waited = time.monotonic() - started
    finally:
        await rest.close()
    assert data["content"] == "paced"
    assert [c.status for c in fake.calls] == [200, 200, 429, 200]
    assert waited >= 0.5


async def test_global_429_pauses_every_worker_then_all_requests_succeed(
    fake: DiscordFake, discord_settings: Settings, redis: Redis
) -> None:
    fake.global_limit = 4  # a tighter global limit than the settings expect
    fake.limits["POST /channels/{channel_id}/messages"] = (50, 1.0)
    workers = [DiscordRest(discord_settings, redis) for _ in range(2)]
    try:
        results = await asyncio.gather(
            *[
                w.request(post(ch), json={"content": f"{w_i}-{ch}-{i}"})
                for w_i, w in enumerate(workers)
                for ch in (CHANNEL, OTHER_CHANNEL)
                for i in range(3)
            ]
        )
    finally:
        for w in workers:
            await w.close()
    assert len(results) == 12 and all(r["id"] for r in results)
    limited = Counter(c.body["content"] for c in fake.calls if c.is_global_429)
    assert limited, "the tight global limit was reached"
    # Requests already in flight meet the 429; after it the pool slows down.
    assert max(limited.values()) <= 2


async def test_best_effort_request_is_skipped_when_the_bucket_is_busy(
    fake: DiscordFake, discord_settings: Settings, redis: Redis
) -> None:
    fake.limits["POST /channels/{channel_id}/messages"] = (2, 5.0)
    rest = DiscordRest(discord_settings, redis)
    try:
        await rest.request(post(CHANNEL), json={"content": "learn the bucket"})
        skipped = await rest.request(post(CHANNEL), json={"content": "x"}, best_effort=True)
        final = await rest.request(post(CHANNEL), json={"content": "must go out"})
    finally:
        await rest.close()
    # One slot was left: the best-effort call leaves it to the request that must go out.
    assert skipped is None and final["content"] == "must go out"
    assert [c.status for c in fake.calls] == [200, 200]


async def test_requests_still_in_flight_at_a_new_window_count_against_it(
    fake: DiscordFake, discord_settings: Settings, redis: Redis
) -> None:
    """Requests taken in one window that reach Discord only after its window turned
    over (a slow network, a busy host) count in Discord's new window: the pool's new
    window must leave room for them, or the fresh posts meet 429s."""
    fake.limits["POST /channels/{channel_id}/messages"] = (5, 1.0)
    rest = DiscordRest(discord_settings, redis)
    try:
        await rest.request(post(CHANNEL), json={"content": "learn the bucket"})
        fake.hold = asyncio.Event()
        late = [
            asyncio.create_task(rest.request(post(CHANNEL), json={"content": f"late {i}"}))
            for i in range(4)
        ]
        await wait_until(lambda: fake.held == 4, 30, "four posts held on the way")
        # The pool's window (which ends after Discord's) turns over while they travel.
        bucket = Keys(discord_settings.key_prefix).discord_bucket(
            await rest.bucket_of(post(CHANNEL))
        )

        async def window_over() -> bool:
            reset_at = int(await redis.hget(bucket, "reset_at") or 0)
            seconds, micros = await redis.time()
            return seconds * 1000 + micros // 1000 >= reset_at

        while not await window_over():  # noqa: ASYNC110 (Redis time: no event to wait on)
            await asyncio.sleep(0.05)
        fake.hold.set()
        await asyncio.gather(
            *late, *[rest.request(post(CHANNEL), json={"content": f"new {i}"}) for i in range(5)]
        )
    finally:
        await rest.close()
    assert len(fake.bot_messages(CHANNEL)) == 10
    assert [c.status for c in fake.calls if c.status == 429] == []

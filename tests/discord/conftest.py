"""Fixtures for the Discord tests: the fake Discord, settings, a running adapter."""

from __future__ import annotations

import asyncio
import logging
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from redis.asyncio import Redis

with warnings.catch_warnings():
    # discord.py imports the stdlib's audioop (voice support), deprecated in 3.11+.
    warnings.simplefilter("ignore", DeprecationWarning)
    import discord  # noqa: F401

from bots.discord.gateway import SluiceClient
from core.infra.serializer import deserialize
from core.messages import IncomingMessage
from core.settings import Settings
from tests.fakes.discord_fake import DiscordFake

GUILD = "100000000000000001"
CHANNEL = "200000000000000001"
OTHER_CHANNEL = "200000000000000002"
THREAD = "300000000000000001"
ROLE = "400000000000000001"
DM_CHANNEL = "500000000000000001"


@pytest.fixture
async def fake() -> AsyncIterator[DiscordFake]:
    """The fake Discord with one guild: two channels, a thread the bot is in, a role."""
    async with DiscordFake() as f:
        f.add_guild(GUILD, channels=[CHANNEL, OTHER_CHANNEL], roles=[ROLE])
        f.add_thread(GUILD, CHANNEL, THREAD)
        yield f


@pytest.fixture
async def discord_settings(redis_url: str, fake: DiscordFake) -> AsyncIterator[Settings]:
    """Settings for adapter and responder tests (no LLM): the fake, a unique key prefix."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    settings = Settings(
        _env_file=None,
        redis_url=redis_url,
        key_prefix=prefix,
        discord_token=fake.token,
        discord_api_url=fake.api_url,
        discord_stream_interval_s=0.0,
    )
    yield settings
    redis = Redis.from_url(redis_url)
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        await redis.delete(key)
    await redis.aclose()


@asynccontextmanager
async def running_adapter(settings: Settings, fake: DiscordFake) -> AsyncIterator[SluiceClient]:
    """``sluice discord``'s client, connected to the fake and ready."""
    client = SluiceClient(settings, guild_ready_timeout=0.05)
    task = asyncio.create_task(client.start(fake.token))
    try:
        await asyncio.wait_for(client.wait_until_ready(), 10)
        yield client
    finally:
        await client.close()
        await task


@pytest.fixture
def adapter(discord_settings: Settings, fake: DiscordFake) -> Callable[..., Any]:
    """A factory: ``async with adapter(**setting_overrides) as client``."""

    def make(**overrides: Any) -> Any:
        settings = discord_settings.model_copy(update=overrides)
        return running_adapter(settings, fake)

    return make


async def queued(redis: Redis, settings: Settings) -> list[IncomingMessage]:
    """The messages of the reply jobs waiting in the queue, oldest first."""
    out = []
    for job_id in await redis.zrange(settings.queue_name, 0, -1):
        raw = await redis.get(b"arq:job:" + job_id)
        if raw is not None:
            out.append(IncomingMessage.model_validate(deserialize(raw)["a"][0]))
    return out


async def wait_for(predicate: Callable[[], Any], timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` (sync or async) until it is true."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class IntakeLog:
    """The adapter's decision on each message, as it logs it (drop, refusal, duplicate,
    failed enqueue: each names ``message=<id>``)."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self._caplog = caplog

    def decided(self, message_id: str) -> bool:
        needle = f"message={message_id} "
        return any(
            r.name == "bots.discord.intake" and needle in r.getMessage() + " "
            for r in self._caplog.records
        )

    async def handled(self, *sent: dict[str, Any], timeout_s: float = 10.0) -> None:
        """Wait until the adapter logged its decision on each of ``sent`` (messages it
        does not enqueue): after that, nothing more comes of them."""
        await wait_for(lambda: all(self.decided(str(m["id"])) for m in sent), timeout_s)


@pytest.fixture
def intake_log(caplog: pytest.LogCaptureFixture) -> IntakeLog:
    """Waits on the Discord adapter's per-message log lines (debug level included)."""
    caplog.set_level(logging.DEBUG, logger="bots.discord.intake")
    return IntakeLog(caplog)

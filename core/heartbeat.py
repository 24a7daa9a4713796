"""Heartbeats: every long-running process says it is alive, ``sluice status`` reads them.

One sorted set per deployment (``Keys.heartbeats()``): member ``<role>:<host>:<pid>``
(roles: ``worker``, ``adapter:web``, ``adapter:slack``, ``adapter:discord``), score the
time of the last beat. arq's own health-check key is one per queue, shared by every
worker, so it cannot count workers; this can.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core import metrics
from core.metrics import process_ident
from core.redis import Keys
from core.settings import Settings

logger = logging.getLogger(__name__)


async def beat(redis: Redis, keys: Keys, member: str, max_age_s: float) -> None:
    """Record one beat of ``member`` and drop members silent for ``max_age_s`` or more."""
    now = time.time()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(keys.heartbeats(), {member: now})
        pipe.zremrangebyscore(keys.heartbeats(), 0, now - max(max_age_s * 10, 3600))
        await pipe.execute()


async def forget(redis: Redis, keys: Keys, member: str) -> None:
    """Remove ``member`` (a clean shutdown)."""
    await redis.zrem(keys.heartbeats(), member)


async def live(redis: Redis, keys: Keys, max_age_s: float) -> dict[str, float]:
    """Members that beat within ``max_age_s``, with the age of their last beat."""
    now = time.time()
    raw = await redis.zrangebyscore(keys.heartbeats(), now - max_age_s, "+inf", withscores=True)
    out: dict[str, float] = {}
    for member, score in raw:
        name = member.decode() if isinstance(member, bytes) else str(member)
        out[name] = max(0.0, now - float(score))
    return out


async def _loop(redis: Redis, keys: Keys, member: str, interval_s: float) -> None:
    while True:
        try:
            await beat(redis, keys, member, interval_s * 3)
        except (RedisError, OSError) as e:
            logger.warning("heartbeat of %s failed: %s", member, e)
        await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def heartbeating(
    redis: Redis, keys: Keys, role: str, interval_s: float
) -> AsyncIterator[str]:
    """Beat every ``interval_s`` while the block runs; yields the member name."""
    member = f"{role}:{process_ident()}"
    task = asyncio.create_task(_loop(redis, keys, member, interval_s))
    try:
        yield member
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(RedisError, OSError):
            await forget(redis, keys, member)


def add_heartbeat(
    app: web.Application, redis: Redis, keys: Keys, role: str, interval_s: float
) -> None:
    """Beat for an adapter's aiohttp app while it runs."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with heartbeating(redis, keys, role, interval_s):
            yield

    app.cleanup_ctx.append(ctx)


@contextlib.asynccontextmanager
async def process_ops(settings: Settings, role: str) -> AsyncIterator[None]:
    """Heartbeat for a long-running process, and with ``SLUICE_METRICS_PORT`` its
    ``/metrics`` and ``/healthz`` server (the Discord adapter, Slack in Socket Mode).

    Opens its own small Redis connection; does nothing without ``REDIS_URL``.
    """
    if not settings.redis_url:
        yield
        return
    redis: Redis = Redis.from_url(settings.redis_url, socket_connect_timeout=2)
    try:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(
                heartbeating(
                    redis, Keys(settings.key_prefix), role, settings.health_check_interval_s
                )
            )
            if settings.metrics_port is not None:
                refresher = metrics.queue_refresher(redis, settings)
                metrics.add_refresher(refresher)
                stack.callback(metrics.remove_refresher, refresher)

                async def health() -> dict[str, Any]:
                    await redis.ping()
                    return {"ok": True, "role": role}

                try:
                    runner, _port = await metrics.start_metrics_server(
                        settings.metrics_port, host=settings.metrics_host, health=health
                    )
                except OSError as e:
                    # One process running several roles (`sluice dev`): the worker has it.
                    logger.warning("no metrics server for %s: %s", role, e)
                else:
                    stack.push_async_callback(runner.cleanup)
            yield
    finally:
        await redis.aclose()

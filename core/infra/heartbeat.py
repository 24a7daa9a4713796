"""Heartbeats: every long-running process says it is alive, ``sluice status`` reads them.

One sorted set per deployment (``Keys.heartbeats()``): member ``<role>:<host>:<pid>``
(roles: ``worker``, ``adapter:web``, ``adapter:slack``, ``adapter:discord``), score the
time of the last beat. arq's own health-check key is one per queue, shared by every
worker, so it cannot count workers; this can.

Beats and ages are in Redis server time (``TIME``), not the host's clock: workers on
many hosts compare each other's beats (:mod:`workers.reaper`), and a host whose clock
is off must not make a live worker look silent (see :mod:`core.infra.clock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.infra import metrics
from core.infra.clock import redis_now
from core.infra.metrics import process_ident
from core.infra.redis import Keys, client
from core.infra.scripts import Lua
from core.settings import Settings

logger = logging.getLogger(__name__)


# KEYS: heartbeats. ARGV: member, drop members older than (s). Returns 1 when the
# member was there already (0: its first beat, or it was taken for dead meanwhile).
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, now - tonumber(ARGV[2]))
if known then return 1 end
return 0
"""


async def beat(redis: Redis, keys: Keys, member: str, max_age_s: float) -> bool:
    """Record one beat of ``member`` (at Redis server time) and drop members silent
    for ``max_age_s`` x 10 (at least an hour); ``True`` when ``member`` had beaten
    before and was not dropped since."""
    known = await Lua(redis, _BEAT)([keys.heartbeats()], [member, max(max_age_s * 10, 3600)])
    return bool(known)


async def forget(redis: Redis, keys: Keys, member: str) -> None:
    """Remove ``member`` (a clean shutdown)."""
    await redis.zrem(keys.heartbeats(), member)


async def live(redis: Redis, keys: Keys, max_age_s: float) -> dict[str, float]:
    """Members that beat within ``max_age_s`` (Redis server time), with the age of
    their last beat."""
    now = await redis_now(redis)
    raw = await redis.zrangebyscore(keys.heartbeats(), now - max_age_s, "+inf", withscores=True)
    out: dict[str, float] = {}
    for member, score in raw:
        name = member.decode() if isinstance(member, bytes) else str(member)
        out[name] = max(0.0, now - float(score))
    return out


async def _loop(redis: Redis, keys: Keys, member: str, interval_s: float) -> None:
    first = True
    while True:
        try:
            known = await beat(redis, keys, member, interval_s * 3)
        except (RedisError, OSError) as e:
            logger.warning("heartbeat of %s failed: %s", member, e)
        else:
            if not known and not first:
                # Cut off for longer than SLUICE_WORKER_DEAD_AFTER_S: a live worker
                # handed its jobs back (workers.reaper), which it no longer delivers.
                logger.warning("%s beats again after being taken for dead; rejoining", member)
            first = False
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
    if not settings.redis_url and not settings.redis_sentinels:
        yield
        return
    redis: Redis = client(settings, socket_connect_timeout=2)
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

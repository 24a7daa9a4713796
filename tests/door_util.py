"""Helpers for the door tests: close and open the shared LLM budget, as a provider's
429 with a long retry-after does, so reply jobs hold their worker slots waiting in line."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from core.infra.redis import Keys


async def close_budget(redis: Redis, prefix: str, for_s: float) -> None:
    """Nothing is granted for ``for_s`` seconds (the bucket's ``blocked`` time)."""
    sec, usec = await redis.time()
    now_ms = int(sec) * 1000 + int(usec) // 1000
    await redis.hset(  # type: ignore[misc]
        Keys(prefix).llm("bucket"),
        mapping={"blocked": now_ms + int(for_s * 1000), "rl": 0, "ts": now_ms},
    )


async def empty_budget(redis: Redis, prefix: str) -> None:
    """An empty bucket that refills at the budget's rate (no burst to start with)."""
    sec, usec = await redis.time()
    now_ms = int(sec) * 1000 + int(usec) // 1000
    await redis.hset(Keys(prefix).llm("bucket"), mapping={"rl": 0, "ts": now_ms})  # type: ignore[misc]


async def open_budget(redis: Redis, prefix: str) -> None:
    """Grant again, with room for a burst."""
    key = Keys(prefix).llm("bucket")
    await redis.hdel(key, "blocked")  # type: ignore[misc]
    await redis.hset(key, "rl", 50)  # type: ignore[misc]


async def until(check: Callable[[], Awaitable[object]], timeout_s: float, what: str) -> None:
    """Poll the async ``check`` every 50 ms until it is true; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)

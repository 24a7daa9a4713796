"""A bot for the purge tests, run in worker processes: ``SLUICE_APP=tests.history.bots:NAME``."""

from __future__ import annotations

from redis.asyncio import Redis

from core.framework.bot import Bot
from core.settings import get_settings

purge_bot = Bot(name="purge-test", system_prompt="You use tools.")


def gate_key(prefix: str, name: str) -> str:
    """The list a test pushes to to let the ``gate`` tool ``name`` return."""
    return f"{prefix}:test:gate:{name}"


@purge_bot.tool(timeout_s=120)
async def gate(name: str) -> str:
    """Waits until the test opens the gate, so that the reply job is running meanwhile.

    Args:
        name: The gate's name.
    """
    settings = get_settings()
    redis: Redis = Redis.from_url(settings.redis_url or "")
    key = gate_key(settings.key_prefix, name)
    try:
        await redis.set(key + ":entered", "1", ex=3600)
        opened = await redis.blpop([key], timeout=110)  # type: ignore[misc]
    finally:
        await redis.aclose()
    return f"gate {name} opened" if opened else f"gate {name} never opened"


@purge_bot.tool
async def lookup(topic: str) -> str:
    """Looks a topic up.

    Args:
        topic: What to look up.
    """
    return f"notes about {topic}"

"""A bot whose ``@bot.on_feedback`` hook pushes each vote to Redis, for the feedback tests
(``SLUICE_APP=tests.slack.feedback_bot:bot``, run in worker processes)."""

from __future__ import annotations

from redis.asyncio import Redis

from core.framework.bot import Bot
from core.messages import Feedback
from core.settings import get_settings

bot = Bot(name="feedback-test", system_prompt="You answer briefly.")


def votes_key(prefix: str) -> str:
    """The list the hook pushes each vote to (as JSON)."""
    return f"{prefix}:test:feedback"


@bot.on_feedback
async def remember(feedback: Feedback) -> None:
    settings = get_settings()
    redis: Redis = Redis.from_url(settings.redis_url or "")
    try:
        await redis.rpush(votes_key(settings.key_prefix), feedback.model_dump_json())  # type: ignore[misc]
    finally:
        await redis.aclose()

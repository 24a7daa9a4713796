"""Replies the platform did not take: kept in Redis and delivered again, never lost.

When a responder's ``finish()`` raises :class:`~core.errors.DeliveryRetryableError`
(a 429, 5xx or network error that outlasted the responder's own retries), the reply
job keeps the finished reply under ``Keys.undelivered(job_id)``, records it in history
at once, and ends its arq try with ``Retry(defer=...)``. When the job runs again,
:func:`load` finds the kept reply before anything else: the job only delivers it
(``begin()``/``finish()``), without the conversation's turn, the model, or history,
so a delivery retry never costs a second LLM call nor counts as a re-run.

The responders are idempotent per job id (what they posted is in ``Keys.delivered``),
so a retried ``finish()`` completes the message already posted instead of posting a
second one. After ``SLUICE_DELIVERY_MAX_TRIES`` attempts the reply is given up with
one error log line; it stays in history.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from core.infra import metrics
from core.infra.redis import Keys
from core.messages import IncomingMessage, Reply
from core.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Undelivered:
    """A kept reply and how many delivery attempts it has had."""

    reply: Reply
    attempts: int


async def load(redis: Redis, keys: Keys, job_id: str) -> Undelivered | None:
    """The reply kept for ``job_id``, if its delivery is still owed."""
    raw: dict[Any, Any] = await redis.hgetall(keys.undelivered(job_id))  # type: ignore[misc]
    state = {_s(k): _s(v) for k, v in raw.items()}
    if "reply" not in state:
        return None
    return Undelivered(Reply.model_validate_json(state["reply"]), int(state.get("attempts", 0)))


async def keep(redis: Redis, keys: Keys, settings: Settings, job_id: str, reply: Reply) -> int:
    """Keep ``reply`` for a later attempt and count the failed one; returns the count."""
    key = keys.undelivered(job_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, "reply", reply.model_dump_json())
        pipe.hincrby(key, "attempts", 1)
        pipe.expire(key, settings.dedupe_ttl_s)
        _, attempts, _ = await pipe.execute()
    return int(attempts)


async def count_failure(redis: Redis, keys: Keys, settings: Settings, job_id: str) -> int:
    """Count one more failed attempt of a kept reply; returns the count."""
    key = keys.undelivered(job_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hincrby(key, "attempts", 1)
        pipe.expire(key, settings.dedupe_ttl_s)
        attempts, _ = await pipe.execute()
    return int(attempts)


async def forget(redis: Redis, keys: Keys, job_id: str) -> None:
    """The reply was delivered (or given up): drop it."""
    await redis.delete(keys.undelivered(job_id))


def backoff_s(settings: Settings, attempts: int, retry_after_s: float | None = None) -> float:
    """Wait before the next attempt after ``attempts`` failed ones: base, 2x base, 4x …
    (or the platform's longer ``Retry-After``), at most ``SLUICE_DELIVERY_RETRY_MAX_S``."""
    wait = settings.delivery_retry_base_s * 2.0 ** max(0, attempts - 1)
    return min(settings.delivery_retry_max_s, max(wait, retry_after_s or 0.0))


def log_given_up(msg: IncomingMessage, job_id: str, attempts: int, error: Exception) -> None:
    """The one loud line of a reply the platform never took (no text, no secrets)."""
    metrics.DELIVERY_GIVEN_UP.labels(msg.platform).inc()
    logger.error(
        "reply given up after %d delivery attempts platform=%s tenant=%s channel=%s "
        "message=%s job=%s: %s (the answer is kept in history)",
        attempts,
        msg.platform,
        msg.tenant,
        msg.channel,
        msg.message_id,
        job_id,
        error,
    )


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)

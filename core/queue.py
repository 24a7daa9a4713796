"""Enqueueing reply jobs: the one thing adapters do with an accepted message."""

from __future__ import annotations

import logging

from arq.connections import ArqRedis, create_pool
from redis.exceptions import RedisError

from core.errors import QueueError
from core.messages import IncomingMessage
from core.redis import redis_settings
from core.serializer import deserialize, serialize
from core.settings import Settings

logger = logging.getLogger(__name__)


async def connect_queue(settings: Settings) -> ArqRedis:
    """A Redis pool that enqueues with Sluice's serializer (not pickle)."""
    return await create_pool(
        redis_settings(settings),
        job_serializer=serialize,
        job_deserializer=deserialize,
        default_queue_name=settings.queue_name,
    )


async def enqueue_reply(redis: ArqRedis, settings: Settings, msg: IncomingMessage) -> bool:
    """Enqueue the ``reply`` job for ``msg``.

    Returns ``False`` when a job with the same id already exists (a duplicate
    delivery), ``True`` when a new job was queued.

    Raises:
        QueueError: Redis could not be reached; the adapter must not ack then, so
            that the platform delivers again.
    """
    try:
        job = await redis.enqueue_job(
            "reply",
            msg.model_dump(mode="json"),
            _job_id=msg.job_id,
            _queue_name=settings.queue_name,
        )
    except (RedisError, OSError) as e:
        raise QueueError(f"cannot enqueue message {msg.message_id}: {e}") from e
    logger.info(
        "enqueued platform=%s tenant=%s message=%s job=%s lane=%s new=%s",
        msg.platform,
        msg.tenant,
        msg.message_id,
        msg.job_id,
        msg.lane,
        job is not None,
    )
    return job is not None

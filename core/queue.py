"""Enqueueing reply jobs: the one thing adapters do with an accepted message."""

from __future__ import annotations

import logging

from arq.connections import ArqRedis, create_pool
from redis.exceptions import RedisError

from core.errors import QueueError
from core.messages import IncomingMessage
from core.redis import Keys, redis_settings
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


def arq_job_id(settings: Settings, msg: IncomingMessage) -> str:
    """The arq job id of a message's reply job.

    arq's own keys (``arq:job:<id>``, ``arq:result:<id>``) are not prefixed, so the
    id carries ``SLUICE_KEY_PREFIX``: two deployments sharing one Redis never take
    each other's messages for duplicates.
    """
    return f"{settings.key_prefix}:{msg.job_id}"


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
            _job_id=arq_job_id(settings, msg),
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


async def accept_message(
    redis: ArqRedis, settings: Settings, msg: IncomingMessage, *extra_keys: str
) -> bool:
    """Dedupe and enqueue one delivered message; the one call adapters make.

    Returns ``True`` when the message was new and is now queued, ``False`` for a
    duplicate (a platform retry, a redelivery, the same message under two event
    types). Duplicates are recognised by a marker that lives ``SLUICE_DEDUPE_TTL_S``
    (24 h) and, until the marker is written, by arq's refusal of a second job with
    the same id, which is atomic. The marker is written only after the job is
    queued, so a message that was not enqueued is never taken for a duplicate.

    ``extra_keys`` are further identities of the same delivery (e.g. Slack's event
    id) that must also count as seen.

    Raises:
        QueueError: Redis is unreachable; the adapter must answer with an error so
            that the platform delivers again.
    """
    keys = Keys(settings.key_prefix)
    markers = [keys.dedupe(msg.platform, msg.job_id)]
    markers += [keys.dedupe(msg.platform, k) for k in extra_keys]
    try:
        if await redis.exists(*markers):
            logger.info("duplicate platform=%s message=%s", msg.platform, msg.message_id)
            return False
    except (RedisError, OSError) as e:
        raise QueueError(f"cannot check message {msg.message_id}: {e}") from e
    if not await enqueue_reply(redis, settings, msg):
        return False
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for marker in markers:
                pipe.set(marker, b"1", ex=settings.dedupe_ttl_s)
            await pipe.execute()
    except (RedisError, OSError) as e:
        # The job is queued; until its result expires arq still refuses a duplicate.
        logger.warning("dedupe marker not written for message=%s: %s", msg.message_id, e)
    return True

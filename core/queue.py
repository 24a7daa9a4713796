"""Enqueueing reply jobs: the one thing adapters do with an accepted message."""

from __future__ import annotations

import functools
import logging
import time
from datetime import UTC, datetime, timedelta

from arq.connections import ArqRedis, create_pool
from redis.exceptions import RedisError

from core import tracing
from core.bot import Bot, load_bot
from core.budget import estimate_wait_s
from core.errors import BotDefinitionError, QueueError
from core.lanes import LANES, choose_lane, lane_queue_name, priority_ms
from core.messages import IncomingMessage
from core.ordering import forget_arrival, register_arrival
from core.redis import Keys, redis_settings
from core.serializer import deserialize, serialize
from core.settings import Settings

logger = logging.getLogger(__name__)

# Ahead of every lane (their head starts are seconds); the notice is stale after a minute.
NOTICE_HEAD_START_MS = 3_600_000
NOTICE_EXPIRES = timedelta(seconds=60)


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


@tracing.traced_enqueue
async def enqueue_reply(redis: ArqRedis, settings: Settings, msg: IncomingMessage) -> bool:
    """Enqueue the ``reply`` job for ``msg``, in its lane and its conversation's line.

    The lane comes from the bot's lane rules (:func:`core.lanes.choose_lane`); with
    ``SLUICE_LANE_QUEUES=score`` (default) it sets the job's score in the one queue
    (arrival minus the lane's head start), with ``per-lane`` it picks the lane's queue.

    Returns ``False`` when a job with the same id already exists (a duplicate
    delivery), ``True`` when a new job was queued.

    Raises:
        QueueError: Redis could not be reached; the adapter must not ack then, so
            that the platform delivers again.
    """
    bot = _load_bot(settings)
    msg = with_lane(settings, msg, bot)
    keys = Keys(settings.key_prefix)
    queue, score_ms = queue_slot(settings, msg.lane, int(time.time() * 1000))
    try:
        added = await register_arrival(
            redis, keys, msg, keep_text=bot is not None and bot.merge_burst_s > 0
        )
        try:
            job = await redis.enqueue_job(
                "reply",
                msg.model_dump(mode="json"),
                _job_id=arq_job_id(settings, msg),
                _queue_name=queue,
                _defer_until=datetime.fromtimestamp(score_ms / 1000, tz=UTC),
            )
        except BaseException:
            if added:
                await forget_arrival(redis, keys, msg)
            raise
        if job is None and added:
            # A duplicate of a message already answered: not waiting in line.
            await forget_arrival(redis, keys, msg)
        if job is not None:
            await redis.hincrby(keys.lanes(), f"enqueued:{msg.lane}", 1)  # type: ignore[misc]
    except (RedisError, OSError) as e:
        raise QueueError(f"cannot enqueue message {msg.message_id}: {e}") from e
    if job is not None and settings.queued_notice_after_s > 0:
        await _tell_if_queued(redis, settings, keys, msg, queue, score_ms)
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


@tracing.traced_receive
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


async def _tell_if_queued(
    redis: ArqRedis,
    settings: Settings,
    keys: Keys,
    msg: IncomingMessage,
    queue: str,
    score_ms: int,
) -> None:
    """When the expected wait passes ``SLUICE_QUEUED_NOTICE_AFTER_S``, queue a tiny
    ``notify_queued`` job ahead of everything, so the user sees where they stand while
    the reply job still waits for a worker (responders without ``queued`` skip it)."""
    try:
        wait_s = await estimate_wait_s(redis, keys, settings, queue, score_ms)
        if wait_s is None or wait_s <= settings.queued_notice_after_s:
            return
        await redis.enqueue_job(
            "notify_queued",
            msg.model_dump(mode="json"),
            round(wait_s),
            _job_id=f"{settings.key_prefix}:queued:{msg.job_id}",
            _queue_name=queue,
            _defer_until=datetime.fromtimestamp((score_ms - NOTICE_HEAD_START_MS) / 1000, tz=UTC),
            _expires=NOTICE_EXPIRES,
        )
    except (RedisError, OSError) as e:
        # The message itself is queued; only the courtesy notice is lost.
        logger.warning("queued notice not sent for message=%s: %s", msg.message_id, e)


def queue_slot(settings: Settings, lane: str, arrived_ms: int) -> tuple[str, int]:
    """The queue a message of ``lane`` waits in and its score there: arrival minus the
    lane's head start in the one queue, arrival in its lane's queue (``per-lane``)."""
    if settings.lane_queues == "per-lane":
        return lane_queue_name(settings, lane), arrived_ms
    return settings.queue_name, priority_ms(settings, lane, arrived_ms)


def reply_queues(settings: Settings) -> list[str]:
    """Every queue a reply job can be in."""
    if settings.lane_queues == "per-lane":
        return [lane_queue_name(settings, lane) for lane in LANES]
    return [settings.queue_name]


def _load_bot(settings: Settings) -> Bot | None:
    try:
        return _bot_at(settings.app)
    except BotDefinitionError as e:
        logger.error("cannot load the bot to choose a lane: %s", e)
        return None


@functools.lru_cache(maxsize=8)
def _bot_at(path: str | None) -> Bot:
    # Once per process: a bot factory function must not run on every enqueue.
    return load_bot(path)


def message_lane(settings: Settings, msg: IncomingMessage) -> str:
    """The lane :func:`enqueue_reply` puts ``msg`` in (the bot of ``SLUICE_APP`` decides),
    for adapters that tell the sender, e.g. the web chat's 202 body."""
    return with_lane(settings, msg, _load_bot(settings)).lane


def with_lane(settings: Settings, msg: IncomingMessage, bot: Bot | None) -> IncomingMessage:
    """``msg`` with the lane its bot's rules choose (the adapter's lane when none match)."""
    if bot is None:
        return msg
    lane = choose_lane(bot, msg)
    return msg if lane == msg.lane else msg.model_copy(update={"lane": lane})

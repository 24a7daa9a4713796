"""Dedupe and enqueue: the only work the Slack adapter does with a message.

Duplicate deliveries (Slack retries with ``X-Slack-Retry-Num``, late redeliveries,
one message arriving as both ``app_mention`` and ``message``) are caught twice, by
:func:`core.traffic.queue.accept_message`:

1. The arq job id is derived from (team, channel, ts), and arq creates a job only
   if no job or result with that id exists, inside a WATCH/MULTI transaction. This
   is the atomic check: two concurrent deliveries enqueue one job.
2. Markers on the job id and on Slack's event id live ``SLUICE_DEDUPE_TTL_S``
   (24 h), longer than arq keeps a job result. They are written only *after* the
   job was enqueued, so a message whose enqueue failed is never dropped: Slack gets
   an error status and delivers it again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from core.errors import QueueError
from core.infra.redis import Keys
from core.messages import IncomingMessage
from core.settings import Settings
from core.traffic.queue import accept_message, connect_queue

logger = logging.getLogger(__name__)

Outcome = Literal["enqueued", "duplicate"]


class Intake:
    """Accepts Slack messages into the reply queue, once each."""

    def __init__(self, settings: Settings, redis: ArqRedis | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._redis = redis
        self._owns_redis = redis is None
        self._lock = asyncio.Lock()

    async def redis(self) -> ArqRedis:
        """The queue connection, opened on first use."""
        if self._redis is None:
            async with self._lock:
                if self._redis is None:
                    try:
                        self._redis = await connect_queue(self.settings)
                    except (RedisError, OSError) as e:
                        raise QueueError(f"cannot connect to Redis: {e}") from e
        return self._redis

    async def close(self) -> None:
        """Close the connection if this object opened it."""
        if self._redis is not None and self._owns_redis:
            await self._redis.aclose()
            self._redis = None

    async def is_bot_thread(self, team: str, channel: str, thread_ts: str) -> bool:
        """The bot answers in this thread, so follow-ups need no mention.

        Raises:
            QueueError: Redis is unreachable (the event must not be acked).
        """
        try:
            redis = await self.redis()
            return bool(await redis.exists(self.keys.slack_thread(team, channel, thread_ts)))
        except (RedisError, OSError) as e:
            raise QueueError(f"cannot read thread marker: {e}") from e

    async def accept(self, msg: IncomingMessage, event_key: str | None = None) -> Outcome:
        """Enqueue the reply job for ``msg`` unless it was accepted before.

        ``event_key`` (Slack's event id) counts as a second identity of the delivery.
        A thread the bot answers in is remembered, so follow-ups need no mention.

        Raises:
            QueueError: Redis is unreachable; nothing was recorded, so a redelivery
                of the same event will be accepted.
        """
        redis = await self.redis()
        extra = [f"event:{event_key}"] if event_key else []
        if not await accept_message(redis, self.settings, msg, *extra):
            return "duplicate"
        if msg.thread and not msg.is_dm:
            try:
                await redis.set(
                    self.keys.slack_thread(msg.tenant, msg.channel, msg.thread),
                    "1",
                    ex=self.settings.slack_thread_ttl_s,
                )
            except (RedisError, OSError):
                logger.warning(
                    "could not remember thread of message=%s", msg.message_id, exc_info=True
                )
        return "enqueued"

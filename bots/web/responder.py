"""Delivers replies to web chat sessions through a Redis stream per session.

The web adapter's ``/api/events`` endpoint reads the stream and forwards it to the
page as server-sent events, so any worker on any host can answer any tab.
"""

from __future__ import annotations

import json
import time
from typing import Any

from redis.asyncio import Redis

from core.errors import FileRefusedError
from core.infra.redis import Keys
from core.messages import FileRef, IncomingMessage, Reply
from core.responder import Responder
from core.settings import Settings

OUTBOX_MAXLEN = 500
OUTBOX_TTL_S = 3600
# A streaming answer's deltas renew the outbox's TTL at most this often (every other
# event renews it): one EXPIRE per answer's stream instead of one per delta.
DELTA_TTL_RENEW_S = 60.0


async def publish(
    redis: Redis, keys: Keys, session: str, event: dict[str, Any], *, expire: bool = True
) -> None:
    """Append one event to a session's outbox (bounded; with ``expire``, its TTL renewed
    to ``OUTBOX_TTL_S``)."""
    key = keys.web_outbox(session)
    data: dict[Any, Any] = {"data": json.dumps(event)}
    if not expire:
        await redis.xadd(key, data, maxlen=OUTBOX_MAXLEN, approximate=True)
        return
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xadd(key, data, maxlen=OUTBOX_MAXLEN, approximate=True)
        pipe.expire(key, OUTBOX_TTL_S)
        await pipe.execute()


class WebResponder(Responder):
    """Streams one answer to one web chat session as ``delta`` events, then ``done``."""

    def __init__(self, factory: WebResponderFactory, msg: IncomingMessage, job_id: str) -> None:
        self._f = factory
        self._msg = msg
        self._job_id = job_id
        self._sent = 0
        self._last = 0.0
        self._renewed: float | None = None  # when this responder last renewed the TTL

    async def _emit(self, event: dict[str, Any]) -> None:
        """Publish ``event``. Every event but a delta renews the outbox's TTL, a delta
        only when this responder renewed it more than ``DELTA_TTL_RENEW_S`` ago: the
        outbox then outlives the stream by ``OUTBOX_TTL_S`` less that, at worst."""
        event["message_id"] = self._msg.message_id
        now = time.monotonic()
        expire = (
            event["type"] != "delta"
            or self._renewed is None
            or now - self._renewed >= DELTA_TTL_RENEW_S
        )
        await publish(self._f.redis, self._f.keys, self._msg.channel, event, expire=expire)
        if expire:
            self._renewed = now

    async def begin(self) -> None:
        """Tell the page the answer is being worked on."""
        # A re-run job starts its text again from the beginning.
        await self._emit({"type": "start"})

    async def queued(self, wait_s: float, place: int | None = None) -> None:
        """Tell the page the message waits in line, ``place`` in line if known (shown
        until the answer starts; a later call refreshes it)."""
        event: dict[str, Any] = {"type": "queued", "wait_s": round(wait_s)}
        if place is not None:
            event["place"] = place
        await self._emit(event)

    async def withdraw_queued(self) -> None:
        """This message gets no reply of its own (merged into an earlier message's
        turn, which answers it): tell the page, which drops its pending bubble and
        ignores a late ``queued`` event for it."""
        await self._emit({"type": "merged"})

    async def stream(self, text: str) -> None:
        """Send what is new since the last event, at most every ``stream_min_interval_s``."""
        now = time.monotonic()
        if now - self._last < self._f.settings.stream_min_interval_s:
            return
        self._last = now
        if len(text) > self._sent:
            await self._emit({"type": "delta", "text": text[self._sent :]})
            self._sent = len(text)

    async def finish(self, reply: Reply) -> None:
        """Send the whole final reply; the page replaces what it streamed with it."""
        await self._emit(
            {"type": "done", "text": reply.text, "kind": reply.kind, "cached": reply.cached}
        )


class WebResponderFactory:
    """Responder factory for ``platform="web"``."""

    platform = "web"

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.key_prefix)

    async def start(self) -> None:
        """Nothing to open: the worker's Redis client is shared."""

    async def close(self) -> None:
        """Nothing to close."""

    async def fetch_file(
        self, msg: IncomingMessage, ref: FileRef, *, max_bytes: int, timeout_s: float
    ) -> bytes:
        """The web chat does not take files.

        Raises:
            FileRefusedError: always.
        """
        raise FileRefusedError(f"{ref.name} was not read: the web chat does not take files.")

    def responder(self, msg: IncomingMessage, job_id: str) -> WebResponder:
        """A responder for one job."""
        return WebResponder(self, msg, job_id)

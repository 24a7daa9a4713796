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


async def publish(redis: Redis, keys: Keys, session: str, event: dict[str, Any]) -> None:
    """Append one event to a session's outbox (bounded, expiring)."""
    key = keys.web_outbox(session)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xadd(key, {"data": json.dumps(event)}, maxlen=OUTBOX_MAXLEN, approximate=True)
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

    async def _emit(self, event: dict[str, Any]) -> None:
        event["message_id"] = self._msg.message_id
        await publish(self._f.redis, self._f.keys, self._msg.channel, event)

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

"""A client for the web chat adapter, as a page uses it: POST messages, read SSE."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from arq.connections import ArqRedis

from bots.web.app import create_web_app
from core.queue import connect_queue
from core.settings import Settings
from sluice.dev import serve


@contextlib.asynccontextmanager
async def web_adapter(settings: Settings) -> AsyncIterator[tuple[str, ArqRedis]]:
    """Run the web adapter in this process on a free port; yields its base URL."""
    redis = await connect_queue(settings)
    try:
        async with serve(create_web_app(settings, redis), "127.0.0.1", 0) as port:
            yield f"http://127.0.0.1:{port}", redis
    finally:
        await redis.aclose()


class ChatSession:
    """One browser tab: a session id, its event stream, its sent messages."""

    def __init__(self, http: aiohttp.ClientSession, base: str, session: str) -> None:
        self.http = http
        self.base = base
        self.session = session
        self.events: list[dict[str, Any]] = []
        self._new = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ChatSession:
        self._task = asyncio.create_task(self._listen())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        url = f"{self.base}/api/events?session={self.session}"
        async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=None)) as resp:
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    self.events.append(json.loads(line[6:]))
                    self._new.set()

    async def send(self, text: str) -> str:
        """Send a message; returns its message id."""
        async with self.http.post(
            f"{self.base}/api/messages", json={"session": self.session, "text": text}
        ) as resp:
            body = await resp.json()
            assert resp.status == 202, body
            message_id: str = body["message_id"]
            return message_id

    def events_for(self, message_id: str) -> list[dict[str, Any]]:
        """Events about one message (user echo, start, deltas, done)."""
        return [e for e in self.events if e.get("message_id") == message_id]

    async def wait_for(
        self, message_id: str, event_type: str, timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Wait for the first event of a type (``start``, ``delta``, ``done``) of a message."""
        async with asyncio.timeout(timeout_s):
            while True:
                found = [e for e in self.events_for(message_id) if e["type"] == event_type]
                if found:
                    return found[0]
                self._new.clear()
                await self._new.wait()

    async def reply(self, message_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait for the ``done`` event of a message."""
        return await self.wait_for(message_id, "done", timeout_s)

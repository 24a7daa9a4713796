"""Talk to a worker process through the web chat adapter, as a page would."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from arq.connections import ArqRedis

from core.messages import IncomingMessage
from core.settings import Settings
from core.traffic.queue import enqueue_reply
from tests.webchat import ChatSession, web_adapter


class Chat:
    """One web chat session; ``ask`` sends a DM, ``ask_in_channel`` a channel message."""

    def __init__(self, tab: ChatSession, redis: ArqRedis, settings: Settings) -> None:
        self.tab = tab
        self.redis = redis
        self.settings = settings

    async def ask(self, text: str) -> dict[str, Any]:
        """Send ``text`` from the page (a DM) and wait for the final reply."""
        return await self.tab.reply(await self.tab.send(text))

    async def ask_in_channel(self, text: str, **fields: Any) -> dict[str, Any]:
        """Enqueue ``text`` as a channel (not DM) message; its reply comes to this page."""
        msg = IncomingMessage(
            platform="web",
            tenant="web",
            channel=self.tab.session,
            user=self.tab.session.user,
            message_id=uuid.uuid4().hex,
            text=text,
            ts=time.time(),
            is_dm=False,
            **fields,
        )
        assert await enqueue_reply(self.redis, self.settings, msg)
        return await self.tab.reply(msg.message_id)


@contextlib.asynccontextmanager
async def chat(settings: Settings) -> AsyncIterator[Chat]:
    """A web adapter in this process and one open chat tab on it."""
    async with web_adapter(settings) as (base, redis), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            yield Chat(tab, redis, settings)

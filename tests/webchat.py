"""A client for the web chat adapter, as a page uses it: get a session, POST messages,
read SSE."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from arq.connections import ArqRedis
from pydantic import SecretStr

from bots.web.app import connect_web_redis, create_web_app
from bots.web.security import COOKIE
from core.settings import Settings
from sluice.dev import serve


def with_web_secret(settings: Settings) -> Settings:
    """``settings`` with a ``SLUICE_WEB_SECRET`` (derived from its key prefix when unset),
    so that every web adapter of one test accepts the same session cookies."""
    if settings.web_secret is not None:
        return settings
    secret = hashlib.sha256(f"web-secret:{settings.key_prefix}".encode()).hexdigest()
    return settings.model_copy(update={"web_secret": SecretStr(secret)})


@contextlib.asynccontextmanager
async def web_adapter(settings: Settings) -> AsyncIterator[tuple[str, ArqRedis]]:
    """Run the web adapter in this process on a free port; yields its base URL."""
    settings = with_web_secret(settings)
    redis = await connect_web_redis(settings)
    try:
        async with serve(create_web_app(settings, redis), "127.0.0.1", 0) as port:
            yield f"http://127.0.0.1:{port}", redis
    finally:
        await redis.aclose()


class WebSession(str):
    """A server-issued session id (usable wherever the id is, e.g. outbox keys) that
    carries its signed cookie and its user id."""

    cookie: str
    user: str

    def __new__(cls, session: str, cookie: str, user: str) -> WebSession:
        obj = super().__new__(cls, session)
        obj.cookie = cookie
        obj.user = user
        return obj

    def headers(self) -> dict[str, str]:
        """The ``Cookie`` header a browser holding this session sends."""
        return {"Cookie": f"{COOKIE}={self.cookie}"}


async def open_session(
    http: aiohttp.ClientSession,
    base: str,
    *,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> WebSession:
    """``POST /api/session`` as the page does; returns the issued session."""
    async with http.post(f"{base}/api/session", json=body or {}, headers=headers) as resp:
        got = await resp.json()
        assert resp.status == 200, got
        morsel = resp.cookies.get(COOKIE)
        assert morsel is not None, "no session cookie set"
        return WebSession(got["session"], morsel.value, got["user"])


async def post_message(
    http: aiohttp.ClientSession,
    base: str,
    session: WebSession,
    text: str,
    message_id: str | None = None,
) -> aiohttp.ClientResponse:
    """``POST /api/messages`` with a session's cookie; the caller reads the response."""
    body: dict[str, Any] = {"text": text}
    if message_id is not None:
        body["id"] = message_id
    async with http.post(f"{base}/api/messages", json=body, headers=session.headers()) as resp:
        await resp.read()
        return resp


class ChatSession:
    """One browser: a server-issued session (a new one unless ``session`` is given,
    e.g. to come back to a conversation), its event stream, its sent messages."""

    def __init__(
        self, http: aiohttp.ClientSession, base: str, session: WebSession | None = None
    ) -> None:
        self.http = http
        self.base = base
        self._session = session
        self.events: list[dict[str, Any]] = []
        self.refused: str | None = None  # why the event stream was refused, if it was
        self._new = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def session(self) -> WebSession:
        """The session (its id is the conversation's channel)."""
        assert self._session is not None, "enter the ChatSession first"
        return self._session

    async def __aenter__(self) -> ChatSession:
        if self._session is None:
            self._session = await open_session(self.http, self.base)
        self._task = asyncio.create_task(self._listen())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        url = f"{self.base}/api/events"
        async with self.http.get(
            url, headers=self.session.headers(), timeout=aiohttp.ClientTimeout(total=None)
        ) as resp:
            if resp.status != 200:
                self.refused = f"{resp.status} {await resp.text()}"
                self._new.set()
                return
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    self.events.append(json.loads(line[6:]))
                    self._new.set()

    async def send(self, text: str) -> str:
        """Send a message; returns its message id."""
        async with self.http.post(
            f"{self.base}/api/messages", json={"text": text}, headers=self.session.headers()
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
                assert self.refused is None, f"the event stream was refused: {self.refused}"
                found = [e for e in self.events_for(message_id) if e["type"] == event_type]
                if found:
                    return found[0]
                self._new.clear()
                await self._new.wait()

    async def reply(self, message_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait for the ``done`` event of a message."""
        return await self.wait_for(message_id, "done", timeout_s)

"""Fixtures for the Slack adapter: the fake Web API, the adapter on a free port, signed events."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from arq.connections import ArqRedis
from pydantic import SecretStr

from bots.slack.app import SlackApp, build_app, web_app
from core.settings import Settings
from core.traffic.queue import connect_queue
from tests.fakes.slack_api import EventSender, FakeSlackAPI, ResponseURLSink
from tests.helpers import settings_env

SIGNING_SECRET = "test-signing-secret"
BOT_TOKEN = "xoxb-T1-single"
TEAM = "T1"
BOT_USER = "UBOT"


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlackAPI]:
    """The fake Slack Web API; ``BOT_TOKEN`` is a bot of team ``T1``."""
    fake = FakeSlackAPI()
    fake.add_token(BOT_TOKEN, TEAM, bot_user_id=BOT_USER)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def response_sink() -> AsyncIterator[ResponseURLSink]:
    """Receives slash-command response_url posts."""
    sink = ResponseURLSink()
    await sink.start()
    try:
        yield sink
    finally:
        await sink.stop()


@pytest.fixture
def slack_settings(settings: Settings, fake_slack: FakeSlackAPI) -> Settings:
    """Single-workspace settings pointing at the fake Web API."""
    return settings.model_copy(
        update={
            "slack_bot_token": SecretStr(BOT_TOKEN),
            "slack_signing_secret": SecretStr(SIGNING_SECRET),
            "slack_api_url": fake_slack.url,
            "slack_edit_interval_s": 0.3,
        }
    )


@pytest.fixture
def oauth_settings(slack_settings: Settings, fake_slack: FakeSlackAPI) -> Settings:
    """Multi-workspace (OAuth) settings, tokens encrypted at rest."""
    from cryptography.fernet import Fernet

    return slack_settings.model_copy(
        update={
            "slack_bot_token": None,
            "slack_client_id": fake_slack.client_id,
            "slack_client_secret": SecretStr(fake_slack.client_secret),
            "encryption_key": SecretStr(Fernet.generate_key().decode()),
        }
    )


class Adapter:
    """A running Slack adapter (HTTP mode) and a signed-request sender for it."""

    def __init__(
        self, base: str, app: SlackApp, sender: EventSender, http: aiohttp.ClientSession
    ) -> None:
        self.base = base
        self.app = app
        self.send = sender
        self.http = http


@contextlib.asynccontextmanager
async def running_adapter(settings: Settings) -> AsyncIterator[Adapter]:
    """``sluice slack``'s HTTP server in this process, on a free port."""
    slack = await build_app(settings)
    runner = web.AppRunner(web_app(slack, settings), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)  # as serve_http does
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    # No client-side connection cap: concurrent events really arrive concurrently.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        try:
            yield Adapter(
                base, slack, EventSender(http, base + "/slack/events", SIGNING_SECRET), http
            )
        finally:
            await runner.cleanup()


@pytest.fixture
def adapter() -> Callable[[Settings], contextlib.AbstractAsyncContextManager[Adapter]]:
    """Factory: ``async with adapter(settings) as a``."""
    return running_adapter


@pytest.fixture
async def queue(settings: Settings) -> AsyncIterator[ArqRedis]:
    """An arq pool on the test's Redis (to look at queued jobs)."""
    pool = await connect_queue(settings)
    try:
        yield pool
    finally:
        await pool.aclose()


async def queued_messages(pool: ArqRedis, settings: Settings) -> list[dict[str, Any]]:
    """The payloads of the reply jobs waiting in the queue."""
    jobs = await pool.queued_jobs(queue_name=settings.queue_name)
    return [j.args[0] for j in jobs]


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment for a worker subprocess that answers on the fake Slack."""
    return settings_env(settings)


def mention(
    text: str, ts: str, *, channel: str = "C1", user: str = "U1", thread_ts: str | None = None
) -> dict[str, Any]:
    """An ``app_mention`` event."""
    event = {
        "type": "app_mention",
        "user": user,
        "text": f"<@{BOT_USER}> {text}",
        "ts": ts,
        "channel": channel,
        "event_ts": ts,
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def message(
    text: str,
    ts: str,
    *,
    channel: str = "C1",
    user: str = "U1",
    channel_type: str = "channel",
    thread_ts: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A ``message`` event."""
    event = {
        "type": "message",
        "user": user,
        "text": text,
        "ts": ts,
        "channel": channel,
        "channel_type": channel_type,
        "event_ts": ts,
        **extra,
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event

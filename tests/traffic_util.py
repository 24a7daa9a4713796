"""Helpers for the traffic tests: post to web adapters, read session outboxes from Redis."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from redis.asyncio import Redis

from core.infra.redis import Keys
from tests.webchat import WebSession


async def post(http: aiohttp.ClientSession, base: str, session: WebSession, text: str) -> str:
    """Send one message through a web adapter with a session from
    :func:`tests.webchat.open_session`; returns its message id."""
    async with http.post(
        f"{base}/api/messages", json={"text": text}, headers=session.headers()
    ) as resp:
        body = await resp.json()
        assert resp.status == 202, body
        message_id: str = body["message_id"]
        return message_id


async def outbox(redis: Redis, prefix: str, session: str) -> list[dict[str, Any]]:
    """Every event of a web session, each with ``at_ms`` (its stream id's time)."""
    entries = await redis.xrange(Keys(prefix).web_outbox(session))
    out = []
    for entry_id, fields in entries:
        event = json.loads(fields[b"data"])
        event["at_ms"] = int(entry_id.decode().split("-")[0])
        out.append(event)
    return out


async def wait_done(
    redis: Redis, prefix: str, sent: list[tuple[str, str]], timeout_s: float
) -> dict[str, list[dict[str, Any]]]:
    """Wait until every ``(session, message_id)`` has its ``done`` event; returns the
    events per message id."""
    deadline = time.monotonic() + timeout_s
    sessions = sorted({s for s, _ in sent})
    while True:
        by_id: dict[str, list[dict[str, Any]]] = {}
        for session in sessions:
            for e in await outbox(redis, prefix, session):
                by_id.setdefault(e["message_id"], []).append(e)
        missing = [m for _, m in sent if not any(e["type"] == "done" for e in by_id.get(m, []))]
        if not missing:
            return by_id
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(missing)} of {len(sent)} messages not answered")
        await asyncio.sleep(0.2)


def done_event(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The last ``done`` event among a message's events."""
    return [e for e in events if e["type"] == "done"][-1]


def p95(values: list[float]) -> float:
    """The 95th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, round(0.95 * len(ordered)) - 1)]

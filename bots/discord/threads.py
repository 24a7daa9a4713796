"""Reading a Discord thread or reply chain's earlier messages for context.

Called by a worker through :meth:`DiscordResponderFactory.fetch_thread`, once per
thread (:mod:`core.history.threads` caches the result for every worker):

- In a thread: ``GET /channels/{thread}/messages?before=<message>&limit=100``, newest
  first, page after page up to ``SLUICE_THREAD_CONTEXT_FETCH_MAX`` messages.
- A reply to someone's message (``meta["context_of"]``): the chain of replies,
  ``GET /channels/{channel}/messages/{id}`` one hop at a time, up to
  :data:`MAX_CHAIN` hops.

Requests go through the shared, paced :class:`~bots.discord.rest.DiscordRest` client
(Discord's per-route buckets). Mentions are made inert: ``<@123>`` becomes ``@123``,
``<@&1>`` ``@role1``, ``<#1>`` ``#1``. Without the message-content intent Discord
returns other users' messages with empty text; those are left out.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from bots.discord.rest import DiscordRest, Route
from core.errors import DeliveryError, ThreadUnavailable
from core.messages import FetchedThread, IncomingMessage, ThreadMessage

PAGE = 100
MAX_CHAIN = 25
_SNOWFLAKE = re.compile(r"\d{1,20}")
_USER = re.compile(r"<@!?(\d{1,20})>")
_ROLE = re.compile(r"<@&(\d{1,20})>")
_CHANNEL = re.compile(r"<#(\d{1,20})>")


def inert(text: str) -> str:
    """Discord mention markup as plain text."""
    text = _USER.sub(r"@\1", text)
    text = _ROLE.sub(r"@role\1", text)
    return _CHANNEL.sub(r"#\1", text)


def _message(raw: Any) -> ThreadMessage | None:
    if not isinstance(raw, dict):
        return None
    found = raw.get("author")
    author: dict[str, Any] = found if isinstance(found, dict) else {}
    content = raw.get("content")
    author_id = str(author.get("id") or "")
    if not isinstance(content, str) or not _SNOWFLAKE.fullmatch(author_id):
        return None
    try:
        ts = datetime.fromisoformat(str(raw.get("timestamp"))).timestamp()
    except ValueError:
        return None
    return ThreadMessage(
        author=author_id, text=inert(content), ts=ts, is_bot=bool(author.get("bot"))
    )


async def _get(rest: DiscordRest, route: Route, params: dict[str, str] | None = None) -> Any:
    try:
        return await rest.request(route, params=params, context=f"thread {route.major}")
    except DeliveryError as e:
        raise ThreadUnavailable(f"discord {route.method} {route.template} failed: {e}") from e


async def fetch_thread(rest: DiscordRest, msg: IncomingMessage, max_messages: int) -> FetchedThread:
    """The messages before ``msg`` in its thread or reply chain, oldest first.

    Raises:
        ThreadUnavailable: Discord refused or kept failing.
    """
    ref = msg.meta.get("context_of")
    if ref:
        return await _chain(rest, msg, ref, min(max_messages, MAX_CHAIN))
    found: list[ThreadMessage] = []
    before = msg.message_id
    complete = True
    while _SNOWFLAKE.fullmatch(before):
        limit = min(PAGE, max_messages - len(found))
        path = f"/channels/{msg.channel}/messages"
        route = Route("GET", "/channels/{channel_id}/messages", msg.channel, path)
        page = await _get(rest, route, {"before": before, "limit": str(limit)})
        if not isinstance(page, list) or not page:
            break
        found += [m for m in (_message(r) for r in page) if m is not None and m.text.strip()]
        oldest = page[-1].get("id") if isinstance(page[-1], dict) else None
        if len(page) < limit or not isinstance(oldest, str):
            break
        if len(found) >= max_messages:
            complete = False
            break
        before = oldest
    found.sort(key=lambda m: m.ts)
    return FetchedThread(messages=found, total=len(found), complete=complete)


async def _chain(rest: DiscordRest, msg: IncomingMessage, ref: str, hops: int) -> FetchedThread:
    found: list[ThreadMessage] = []
    next_id: str | None = ref
    for _ in range(hops):
        if not next_id or not _SNOWFLAKE.fullmatch(next_id):
            break
        path = f"/channels/{msg.channel}/messages/{next_id}"
        route = Route("GET", "/channels/{channel_id}/messages/{message_id}", msg.channel, path)
        raw = await _get(rest, route)
        m = _message(raw)
        if m is not None and m.text.strip():
            found.append(m)
        reference = raw.get("message_reference") if isinstance(raw, dict) else None
        next_id = str(reference.get("message_id") or "") if isinstance(reference, dict) else None
    found.sort(key=lambda m: m.ts)
    return FetchedThread(messages=found, total=len(found), complete=not next_id)

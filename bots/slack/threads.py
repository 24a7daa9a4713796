"""Reading a Slack thread's earlier messages for context (``conversations.replies``).

Called by a worker through :meth:`SlackResponderFactory.fetch_thread`, once per thread
(:mod:`core.history.threads` caches the result for every worker). Pages of 200
messages, up to ``SLUICE_THREAD_CONTEXT_FETCH_MAX``; every call takes one unit of the
workspace's ``SLUICE_SLACK_REPLIES_PER_MINUTE`` budget, counted in Redis across all
workers. Apps outside the Slack Marketplace may make one call a minute of at most 15
messages: with the setting at 1, one page of 15 is read. A budget used up, a 429 that
lasts, or an error raises :class:`core.errors.ThreadUnavailable`, and the message is
answered without the thread (the next message in it tries again).

Slack markup in the fetched text is made inert: ``<@U1>`` becomes ``@U1``,
``<!here>`` ``@here``, ``<#C1|general>`` ``#general``, ``<https://x|label>``
``label (https://x)``; the text goes to the model, never back to Slack as it is.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from slack_sdk.errors import SlackApiError

from bots.slack.convert import unescape
from core.errors import DeliveryError, ThreadUnavailable
from core.messages import FetchedThread, IncomingMessage, ThreadMessage

if TYPE_CHECKING:
    from bots.slack.responder import SlackResponderFactory

logger = logging.getLogger(__name__)

PAGE = 200
NON_MARKETPLACE_PAGE = 15
_MARKUP = re.compile(r"<([^<>\n]{1,500})>")
_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_TS = re.compile(r"\d{1,12}(\.\d{1,9})?")
# Subtypes that are not something a person (or bot) said.
_SKIP = frozenset({"channel_join", "channel_leave", "message_deleted", "tombstone"})


def inert(text: str) -> str:
    """Slack ``mrkdwn`` markup as plain text that pings no one (see the module docstring)."""

    def one(m: re.Match[str]) -> str:
        target, _, label = m.group(1).partition("|")
        if target.startswith(("@", "#")):
            return target[0] + (label or target[1:])
        if target.startswith("!"):
            name = label or target[1:].split("^", 1)[0]
            return "@" + name.lstrip("@")
        return f"{label} ({target})" if label and label != target else target

    return unescape(_MARKUP.sub(one, text))


async def _take_budget(factory: SlackResponderFactory, team: str) -> None:
    """One conversations.replies call of ``team`` this minute, or ThreadUnavailable."""
    key = factory.keys.slack_replies_budget(team, int(time.time() // 60))
    try:
        used = int(await factory.redis.incr(key))
        if used == 1:
            await factory.redis.expire(key, 120)
    except (RedisError, OSError) as e:
        raise ThreadUnavailable(f"cannot count conversations.replies calls: {e}") from e
    if used > factory.settings.slack_replies_per_minute:
        raise ThreadUnavailable(
            f"conversations.replies budget of workspace {team} is used for this minute"
        )


def _message(raw: Any) -> ThreadMessage | None:
    if not isinstance(raw, dict) or raw.get("subtype") in _SKIP:
        return None
    ts = str(raw.get("ts") or "")
    text = raw.get("text")
    if not _TS.fullmatch(ts) or not isinstance(text, str):
        return None
    author = str(raw.get("user") or raw.get("bot_id") or "unknown")
    if not _ID.fullmatch(author):
        author = "unknown"
    return ThreadMessage(
        author=author,
        text=inert(text),
        ts=float(ts),
        is_bot=bool(raw.get("bot_id") or raw.get("subtype") == "bot_message"),
    )


async def fetch_thread(
    factory: SlackResponderFactory, msg: IncomingMessage, max_messages: int
) -> FetchedThread:
    """The messages before ``msg`` in its thread, oldest first (see the module docstring).

    Raises:
        ThreadUnavailable: out of budget, rate limited, or Slack refused.
    """
    thread_ts = msg.thread
    current = msg.meta.get("ts") or ""
    if not thread_ts or not _TS.fullmatch(current):
        return FetchedThread(messages=[], total=0)
    one_page = factory.settings.slack_replies_per_minute <= 1
    limit = NON_MARKETPLACE_PAGE if one_page else PAGE
    try:
        client = factory.client(await factory.token_for(msg))
    except DeliveryError as e:
        raise ThreadUnavailable(str(e)) from e
    found: list[ThreadMessage] = []
    replies = 0
    cursor: str | None = None
    complete = True
    while True:
        await _take_budget(factory, msg.tenant)
        kwargs: dict[str, Any] = {
            "channel": msg.channel,
            "ts": thread_ts,
            "limit": min(limit, max_messages - len(found)),
            "latest": current,
            "inclusive": False,
        }
        if cursor:
            kwargs["cursor"] = cursor
        try:
            resp = await factory.call(msg.tenant, client.conversations_replies, **kwargs)
        except (SlackApiError, DeliveryError) as e:
            raise ThreadUnavailable(f"conversations.replies failed: {e}") from e
        for raw in resp.get("messages") or []:
            m = _message(raw)
            if m is None or m.ts >= float(current):
                continue
            if isinstance(raw, dict) and raw.get("ts") == thread_ts:
                replies = (
                    int(raw.get("reply_count") or 0)
                    if str(raw.get("reply_count") or "0").isdigit()
                    else 0
                )
            found.append(m)
        meta = resp.get("response_metadata") or {}
        cursor = str(meta.get("next_cursor") or "") or None
        if not cursor or not resp.get("has_more"):
            break
        if one_page or len(found) >= max_messages:
            complete = False
            break
    found.sort(key=lambda m: m.ts)
    # reply_count counts the mention itself (and any later reply): the parent and the
    # replies before it are at most reply_count.
    return FetchedThread(messages=found, total=max(len(found), replies), complete=complete)

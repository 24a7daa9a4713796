"""Slack's assistant threads through Bolt's ``AsyncAssistant``.

:func:`build_assistant` returns the middleware that ``register`` adds to the app
(``app.use``). It handles the assistant thread's events:

- ``assistant_thread_started``: the suggested prompts
  (``assistant.threads.setSuggestedPrompts``) and the thread's context is saved;
- ``assistant_thread_context_changed``: the new context (the channel the user is
  viewing beside the thread) is saved in Redis (:class:`RedisThreadContextStore`),
  shared by every adapter process;
- a user's message in the thread: Sluice's usual chain (skip bots → select →
  lane → dedupe and enqueue), the message carrying the saved context
  (``meta["context_channel"]``); after the ack the thread's status is set ("is
  thinking…", ``assistant.threads.setStatus``) and, on its first message, its title
  (``assistant.threads.setTitle``, the question's first line).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import RedisError
from slack_bolt.async_app import AsyncAssistant
from slack_bolt.context.assistant.thread_context import AssistantThreadContext
from slack_bolt.context.assistant.thread_context_store.async_store import (
    AsyncAssistantThreadContextStore,
)
from slack_bolt.context.async_context import AsyncBoltContext
from slack_bolt.context.get_thread_context.async_get_thread_context import (
    AsyncGetThreadContext,
)
from slack_bolt.context.save_thread_context.async_save_thread_context import (
    AsyncSaveThreadContext,
)
from slack_bolt.context.set_status.async_set_status import AsyncSetStatus
from slack_bolt.context.set_suggested_prompts.async_set_suggested_prompts import (
    AsyncSetSuggestedPrompts,
)
from slack_bolt.context.set_title.async_set_title import AsyncSetTitle
from slack_bolt.middleware.async_custom_middleware import AsyncCustomMiddleware
from slack_bolt.middleware.async_middleware import AsyncMiddleware
from slack_sdk.errors import SlackApiError

from bots.slack.intake import Intake
from core.errors import QueueError
from core.messages import IncomingMessage

if TYPE_CHECKING:
    from bots.slack.listeners import SluiceListeners

logger = logging.getLogger(__name__)

THINKING = "is thinking…"
TITLE_MAX = 60
# The fields of an assistant thread's context (all strings); anything else is dropped.
_CONTEXT_FIELDS = ("channel_id", "team_id", "enterprise_id")
_MSG = "sluice_message"


def clean_context(raw: Any) -> dict[str, str] | None:
    """An ``assistant_thread.context`` as a dict of strings, or ``None`` if it names
    no channel (Slack sends ``{}`` when the user is not viewing one)."""
    if not isinstance(raw, dict):
        return None
    context = {k: raw[k] for k in _CONTEXT_FIELDS if isinstance(raw.get(k), str) and raw[k]}
    return context if "channel_id" in context else None


def thread_title(text: str) -> str:
    """A thread title from the first message: its first line, at most 60 characters."""
    line = " ".join((text.strip().splitlines() or [""])[0].split())
    return line if len(line) <= TITLE_MAX else line[: TITLE_MAX - 1].rstrip() + "…"


class RedisThreadContextStore(AsyncAssistantThreadContextStore):
    """Assistant thread contexts in Redis, kept as long as a thread marker
    (``SLUICE_SLACK_THREAD_TTL_S``), so every adapter process sees the same one.

    Bolt's default store keeps it in the metadata of the bot's first message in the
    thread, which needs a ``conversations.replies`` call per message; this needs one
    Redis read.
    """

    def __init__(self, intake: Intake, ttl_s: int) -> None:
        self.intake = intake
        self.ttl_s = ttl_s

    async def save(self, *, channel_id: str, thread_ts: str, context: dict[str, str]) -> None:
        """Save ``context`` (only its known string fields).

        Raises:
            QueueError: Redis is unreachable.
        """
        cleaned = clean_context(context)
        if cleaned is None:
            return
        key = self.intake.keys.slack_assistant(channel_id, thread_ts)
        try:
            redis = await self.intake.redis()
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, "context", json.dumps(cleaned))
                pipe.expire(key, self.ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as e:
            raise QueueError(f"cannot save assistant thread context: {e}") from e

    async def find(self, *, channel_id: str, thread_ts: str) -> AssistantThreadContext | None:
        """The saved context, or ``None``.

        Raises:
            QueueError: Redis is unreachable.
        """
        key = self.intake.keys.slack_assistant(channel_id, thread_ts)
        try:
            redis = await self.intake.redis()
            raw = await cast("Awaitable[Any]", redis.hget(key, "context"))
        except (RedisError, OSError) as e:
            raise QueueError(f"cannot read assistant thread context: {e}") from e
        if raw is None:
            return None
        try:
            context = clean_context(json.loads(raw))
        except ValueError:
            return None
        return AssistantThreadContext(context) if context else None

    async def first_title(self, channel_id: str, thread_ts: str) -> bool:
        """``True`` once per thread: the caller sets its title.

        Raises:
            QueueError: Redis is unreachable.
        """
        key = self.intake.keys.slack_assistant(channel_id, thread_ts)
        try:
            redis = await self.intake.redis()
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(key, "titled", "1")
                pipe.expire(key, self.ttl_s)
                first, _ = await pipe.execute()
        except (RedisError, OSError) as e:
            raise QueueError(f"cannot mark assistant thread title: {e}") from e
        return bool(first)


class AssistantHandlers:
    """The ``AsyncAssistant`` listeners, sharing the app's Sluice listeners."""

    def __init__(self, sluice: SluiceListeners, store: RedisThreadContextStore) -> None:
        self.sluice = sluice
        self.store = store

    async def thread_started(
        self,
        event: dict[str, Any],
        set_suggested_prompts: AsyncSetSuggestedPrompts,
        save_thread_context: AsyncSaveThreadContext,
    ) -> None:
        """A thread opened: offer the suggested prompts, save its context."""
        thread = event.get("assistant_thread") or {}
        context = clean_context(thread.get("context"))
        if context is not None:
            try:
                await save_thread_context(context)
            except QueueError as e:
                logger.warning("assistant thread context not saved: %s", e)
        try:
            await set_suggested_prompts(prompts=self.sluice.prompts)
        except SlackApiError as e:
            logger.warning("setSuggestedPrompts failed: %s", e.response.get("error"))

    async def context_changed(
        self, event: dict[str, Any], save_thread_context: AsyncSaveThreadContext
    ) -> None:
        """The user switched channels beside the thread: save the new context."""
        thread = event.get("assistant_thread") or {}
        context = clean_context(thread.get("context"))
        if context is None:
            return
        try:
            await save_thread_context(context)
        except QueueError as e:
            logger.warning("assistant thread context not saved: %s", e)

    async def with_context(
        self,
        context: AsyncBoltContext,
        get_thread_context: AsyncGetThreadContext,
        next: Callable[[], Awaitable[Any]],
    ) -> None:
        """Middleware: add the thread's saved context to the message."""
        msg: IncomingMessage = context[_MSG]
        try:
            found = await get_thread_context()
        except QueueError as e:
            logger.warning("assistant thread context not read: %s", e)
            found = None
        if found is not None:
            context[_MSG] = msg.model_copy(
                update={"meta": {**msg.meta, "context_channel": found.channel_id}}
            )
        await next()

    async def accepted(
        self, context: AsyncBoltContext, set_status: AsyncSetStatus, set_title: AsyncSetTitle
    ) -> None:
        """After the ack: "is thinking…", and the title on the thread's first message."""
        msg: IncomingMessage = context[_MSG]
        try:
            await set_status(THINKING)
        except SlackApiError as e:
            logger.warning(
                "setStatus failed tenant=%s message=%s: %s",
                msg.tenant,
                msg.message_id,
                e.response.get("error"),
            )
        title = thread_title(msg.text)
        if not title or not msg.thread:
            return
        try:
            if await self.store.first_title(msg.channel, msg.thread):
                await set_title(title)
        except (QueueError, SlackApiError) as e:
            logger.warning("assistant thread title not set message=%s: %s", msg.message_id, e)


def build_assistant(sluice: SluiceListeners, intake: Intake, ttl_s: int) -> AsyncAssistant:
    """The ``AsyncAssistant`` middleware for ``app.use``."""
    store = RedisThreadContextStore(intake, ttl_s)
    handlers = AssistantHandlers(sluice, store)
    assistant = AsyncAssistant(thread_context_store=store, logger=logger)

    def chain(*funcs: Callable[..., Awaitable[Any]]) -> Sequence[AsyncMiddleware]:
        return [AsyncCustomMiddleware(app_name="sluice", func=f) for f in funcs]

    assistant.thread_started(handlers.thread_started)
    assistant.thread_context_changed(handlers.context_changed)
    # Bolt's annotation says one middleware; it takes a list (and inserts into it).
    assistant.user_message(
        middleware=list(  # type: ignore[arg-type]
            chain(
                sluice.skip_bots,
                sluice.select_assistant,
                handlers.with_context,
                sluice.choose_lane,
                sluice.enqueue,
            )
        )
    )(handlers.accepted)
    return assistant

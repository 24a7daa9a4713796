"""Sluice's Bolt listeners, and :func:`register` to add them to any ``AsyncApp``.

Every conversational listener runs the same short chain of listener middleware,
each calling ``next()`` to pass the message on:

``skip_bots`` (own and other bots' messages, edits, deletions) → ``select_*``
(is this a message Sluice answers? build the neutral message) → ``choose_lane`` →
``enqueue`` (dedupe and enqueue; a duplicate is acked and stops here; Redis down
answers 503 so that Slack delivers again).

A middleware that does not call ``next()`` and returns nothing hands the event on to
the app's other listeners, so Sluice only claims the messages it answers. The
listeners themselves only do cheap Web API calls after the ack (an "is thinking…"
status, suggested prompts); the model is called by workers, never here. Assistant
threads go through Bolt's ``AsyncAssistant`` (:mod:`bots.slack.assistant`), with the
same chain.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_bolt.context.async_context import AsyncBoltContext
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.oauth.installation_store.async_installation_store import AsyncInstallationStore
from slack_sdk.web.async_client import AsyncWebClient

from bots.slack.assistant import THINKING, build_assistant
from bots.slack.convert import is_user_message, message_from_command, message_from_event
from bots.slack.intake import Intake
from core.errors import QueueError
from core.framework.bot import load_bot
from core.messages import IncomingMessage
from core.settings import Settings

logger = logging.getLogger(__name__)

Next = Callable[[], Awaitable[Any]]
LaneRule = Callable[[IncomingMessage], str]

DEFAULT_PROMPTS: list[dict[str, str]] = [
    {"title": "Summarise", "message": "Summarise the key points of a topic I'll paste."},
    {"title": "Explain", "message": "Explain a concept to me in simple terms."},
    {"title": "Draft", "message": "Help me draft a short, friendly message."},
]
BUSY_TEXT = "Sorry, I can't take questions right now. Please try again in a minute."
ASK_USAGE = "Ask me anything: `/ask <your question>`"
_MSG = "sluice_message"


class SluiceListeners:
    """The listener middleware and listeners; one instance per app."""

    def __init__(
        self,
        settings: Settings,
        intake: Intake,
        *,
        installation_store: AsyncInstallationStore | None = None,
        lane: LaneRule | None = None,
        suggested_prompts: Sequence[dict[str, str]] | None = None,
        ask_command: str = "/ask",
    ) -> None:
        self.settings = settings
        self.ask_command = ask_command
        self.bot = load_bot(settings.app)
        self.intake = intake
        self.installation_store = installation_store
        # By default the bot definition's lane rules (SLUICE_APP) choose the lane.
        self.lane = lane or self.bot.lane_for
        self.prompts = list(suggested_prompts or DEFAULT_PROMPTS)

    # --- middleware chain ---------------------------------------------------------

    async def skip_bots(self, body: dict[str, Any], context: AsyncBoltContext, next: Next) -> None:
        """Pass on only new messages written by people."""
        if is_user_message(body.get("event") or {}, context.bot_user_id):
            await next()

    async def select_mention(
        self, body: dict[str, Any], context: AsyncBoltContext, next: Next
    ) -> None:
        """Every mention of the bot is answered, in its thread."""
        context[_MSG] = message_from_event(body, context.bot_user_id, kind="mention")
        await next()

    async def select_assistant(
        self, body: dict[str, Any], context: AsyncBoltContext, next: Next
    ) -> None:
        """A user's message in an assistant thread (``AsyncAssistant`` matched it)."""
        context[_MSG] = message_from_event(body, context.bot_user_id, kind="assistant")
        await next()

    async def select_message(
        self, body: dict[str, Any], context: AsyncBoltContext, next: Next
    ) -> BoltResponse | None:
        """DMs, follow-ups in the bot's threads, and DM thread messages the assistant
        middleware passed on (e.g. a ``thread_broadcast``)."""
        event: dict[str, Any] = body["event"]
        thread_ts = event.get("thread_ts")
        if event.get("channel_type") == "im":
            kind = "assistant" if thread_ts else "dm"
        elif thread_ts and thread_ts != event.get("ts"):
            team = body.get("team_id") or ""
            try:
                known = await self.intake.is_bot_thread(team, event["channel"], thread_ts)
            except QueueError as e:
                logger.error("slack event not acked (Redis): %s", e)
                return BoltResponse(status=503, body="queue unavailable")
            if not known:
                return None
            kind = "thread"
        else:
            return None
        context[_MSG] = message_from_event(body, context.bot_user_id, kind=kind)
        await next()
        return None

    async def select_command(
        self, body: dict[str, Any], context: AsyncBoltContext, next: Next
    ) -> BoltResponse | None:
        """``/ask <question>`` (empty: the usage line), or one of the bot's commands."""
        name = str(body.get("command") or "")
        if name == self.ask_command:
            if not str(body.get("text") or "").strip():
                return BoltResponse(
                    status=200, body={"response_type": "ephemeral", "text": ASK_USAGE}
                )
            context[_MSG] = message_from_command(body)
        else:
            context[_MSG] = message_from_command(body, command=name.lstrip("/"))
        await next()
        return None

    async def choose_lane(self, context: AsyncBoltContext, next: Next) -> None:
        """Apply the lane rule."""
        msg: IncomingMessage = context[_MSG]
        lane = self.lane(msg)
        if lane != msg.lane:
            context[_MSG] = msg.model_copy(update={"lane": lane})
        await next()

    async def enqueue(
        self, body: dict[str, Any], context: AsyncBoltContext, next: Next
    ) -> BoltResponse | None:
        """Dedupe and enqueue; only a newly enqueued message reaches the listener."""
        msg: IncomingMessage = context[_MSG]
        is_command = "command" in body
        event_key = None if is_command else body.get("event_id")
        try:
            outcome = await self.intake.accept(msg, event_key)
        except QueueError as e:
            logger.error(
                "slack message not accepted tenant=%s message=%s: %s", msg.tenant, msg.message_id, e
            )
            if is_command:  # Slack never redelivers commands: tell the user instead
                return BoltResponse(
                    status=200, body={"response_type": "ephemeral", "text": BUSY_TEXT}
                )
            return BoltResponse(status=503, body="queue unavailable")
        if outcome == "duplicate":
            return BoltResponse(status=200, body="")
        await next()
        return None

    # --- listeners -----------------------------------------------------------------

    async def accepted(self, context: AsyncBoltContext, client: AsyncWebClient) -> None:
        """After the ack: show the assistant status while the message waits."""
        msg: IncomingMessage = context[_MSG]
        if msg.meta.get("assistant") and msg.thread:
            try:
                await client.assistant_threads_setStatus(
                    channel_id=msg.channel, thread_ts=msg.thread, status=THINKING
                )
            except SlackApiError as e:
                logger.warning(
                    "setStatus failed tenant=%s message=%s: %s",
                    msg.tenant,
                    msg.message_id,
                    e.response.get("error"),
                )

    async def command_accepted(self, ack: Any) -> None:
        """Ack ``/ask`` so that the question shows in the channel."""
        await ack(response_type="in_channel")

    async def uninstalled(self, context: AsyncBoltContext) -> None:
        """``app_uninstalled``: forget the workspace's tokens."""
        if self.installation_store is None:
            logger.warning(
                "app_uninstalled team=%s (single-workspace mode: nothing stored)", context.team_id
            )
            return
        await self.installation_store.async_delete_installation(
            enterprise_id=context.enterprise_id, team_id=context.team_id
        )

    async def tokens_revoked(self, event: dict[str, Any], context: AsyncBoltContext) -> None:
        """``tokens_revoked``: forget revoked bot tokens."""
        tokens = event.get("tokens") or {}
        if self.installation_store is None or not tokens.get("bot"):
            return
        await self.installation_store.async_delete_bot(
            enterprise_id=context.enterprise_id, team_id=context.team_id
        )


def register(
    app: AsyncApp,
    settings: Settings,
    *,
    intake: Intake | None = None,
    installation_store: AsyncInstallationStore | None = None,
    lane: LaneRule | None = None,
    suggested_prompts: Sequence[dict[str, str]] | None = None,
    command: str = "/ask",
) -> SluiceListeners:
    """Add Sluice's listeners to an existing Bolt ``AsyncApp`` (plugin mode).

    The app keeps its own listeners: Sluice claims only mentions, DMs, assistant
    threads (through a Bolt ``AsyncAssistant`` added with ``app.use``), follow-ups in
    threads it answers, and ``command``. Other messages
    reach the app's listeners as before. The bot definition named by ``SLUICE_APP``
    supplies the lane rules (unless ``lane`` is given) and its commands, each
    registered as a slash command (``/name``) beside ``command``. Workers
    (``sluice worker``) answer what is enqueued here. ``intake`` defaults to one
    that connects to ``REDIS_URL`` on first use; call
    ``await listeners.intake.close()`` on shutdown.
    """
    sluice = SluiceListeners(
        settings,
        intake or Intake(settings),
        installation_store=installation_store,
        lane=lane,
        suggested_prompts=suggested_prompts,
        ask_command=command,
    )
    chain: list[Callable[..., Any]] = [sluice.choose_lane, sluice.enqueue]
    app.event("app_mention", middleware=[sluice.skip_bots, sluice.select_mention, *chain])(
        sluice.accepted
    )
    app.event("message", middleware=[sluice.skip_bots, sluice.select_message, *chain])(
        sluice.accepted
    )
    app.command(command, middleware=[sluice.select_command, *chain])(sluice.command_accepted)
    # The bot definition's commands (`@bot.command`) as slash commands of their own.
    for spec in sluice.bot.command_specs("slack"):
        if f"/{spec.name}" != command:
            app.command(f"/{spec.name}", middleware=[sluice.select_command, *chain])(
                sluice.command_accepted
            )
    # Assistant threads: Bolt's AsyncAssistant (it claims their events before the
    # listeners above see them).
    app.use(build_assistant(sluice, sluice.intake, settings.slack_thread_ttl_s))
    app.event("app_uninstalled")(sluice.uninstalled)
    app.event("tokens_revoked")(sluice.tokens_revoked)
    return sluice

"""The adapter's work on each gateway event: check, dedupe, enqueue. Never calls the LLM.

Used by the standalone client (:mod:`bots.discord.gateway`) and by the plugin Cog
(:mod:`bots.discord.cog`) alike. A message goes through a short chain of checks,
each returning the reason to drop it or ``None``:

1. :func:`not_from_a_bot` — the bot itself and other bots are ignored.
2. :func:`allowed` — the allow and deny lists of guilds, channels, roles and users.
3. :func:`addressed_to_bot` — a DM, a mention, a reply to one of the bot's messages
   (with the reply ping on or off), a message in a thread the bot is in, or a
   message in a channel where the bot listens without a mention
   (``SLUICE_DISCORD_LISTEN_CHANNELS`` or an admin's ``/listen on``); anything else is
   not for us.
4. :func:`has_text` — without the message-content intent Discord blanks messages
   that do not mention the bot (e.g. plain messages in a thread); nothing to answer.

A DM then meets the DM policy (``SLUICE_DISCORD_DM_POLICY``, :meth:`DiscordIntake.dm_refusal`):
``everyone``; ``members`` (the default): the author must be a member of an allowed
guild (``SLUICE_DISCORD_ALLOW_GUILDS``, else of any guild the bot is in) and pass the
role lists there, looked up over REST and remembered for a few minutes; ``nobody``.
A refused DM gets one short notice per user per hour and is otherwise ignored.
Each DM user is their own tenant, ``dm-<user id>``, so limits and budgets are theirs.

Then the message id is claimed in Redis (gateway resumes can replay events), a
thread is opened if ``SLUICE_DISCORD_THREADS`` is on, and the reply job is enqueued.
If enqueueing fails the claim is released, so a replay can still be answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import discord
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from bots.discord.interactions import keep_token
from bots.discord.rest import DiscordHTTPError, DiscordRest, Route
from core.errors import DeliveryError, QueueError
from core.infra.redis import Keys
from core.messages import FileRef, IncomingMessage, Platform
from core.settings import Settings
from core.traffic.choices import Choices
from core.traffic.queue import arq_job_id, connect_queue, enqueue_reply

logger = logging.getLogger(__name__)

ASK_FAILED = "Sorry, I couldn't take your question just now. Please try again in a minute."
ASK_REFUSED = "Sorry, I can't answer you here."
DM_REFUSED = {
    "nobody": "Sorry, I don't answer direct messages. Mention me in a server instead.",
    "members": "Sorry, I only answer direct messages from members of the servers I serve.",
    "unchecked": "Sorry, I couldn't check whether I may answer you here. "
    "Please try again in a minute.",
}
DM_NOTICE_WINDOW_S = 3600  # at most one refusal notice per user per hour
DM_MEMBER_CACHE_S = 300  # a membership verdict is looked up again after this
DM_MAX_GUILD_LOOKUPS = 10  # guilds asked per verdict (allowed guilds first)
LISTEN_CACHE_S = 5.0  # an admin's /listen reaches every adapter within this
LISTEN_CACHE_MAX = 10_000
CLOSE_WAIT_S = 5.0  # close() waits this long for the events being handled


# Attachments taken into one job payload (Discord allows 10 per message).
MAX_FILE_REFS = 20


def dm_tenant(user_id: str) -> str:
    """The tenant of a user's DMs: their own, so one user cannot spend another's budget.

    No ``:`` in it: conversation ids are ``platform:tenant:channel:thread`` and are
    split on ``:`` when history is flushed, exported and purged.
    """
    return f"dm-{user_id}"


@dataclass(frozen=True)
class Event:
    """The facts of one Discord message that the checks look at."""

    message_id: str
    author_id: str
    author_is_bot: bool
    author_name: str
    guild_id: str | None
    channel_id: str
    parent_id: str | None  # the parent channel when the message is in a thread
    role_ids: frozenset[str] = field(default_factory=frozenset)
    content: str = ""
    mentions_bot: bool = False
    replies_to_bot: bool = False
    in_bot_thread: bool = False
    listening: bool = False  # the bot answers this channel without a mention
    is_admin: bool = False  # the author may manage the server (``/model``, ``/listen``)
    reply_to_id: str | None = None  # the message this one replies to, if any
    attachments: int = 0

    @property
    def is_dm(self) -> bool:
        """A direct message (no guild)."""
        return self.guild_id is None


Check = Callable[[Event, Settings, str], str | None]


def user_thread(guild_id: str | None, parent_id: str | None, user_id: str) -> str | None:
    """The conversation within a channel: per user in a guild's text channel.

    In a busy guild channel each person talking to the bot has their own
    conversation (their own context, answered in parallel with everyone else's);
    a Discord thread, or a DM, is one conversation shared by whoever is in it.
    """
    if guild_id is None or parent_id is not None:
        return None
    return f"user:{user_id}"


def not_from_a_bot(event: Event, settings: Settings, bot_id: str) -> str | None:
    """Drop the bot's own messages and other bots'."""
    if event.author_id == bot_id:
        return "own message"
    return "from a bot" if event.author_is_bot else None


def _listed(value: str | None, allow: list[str], deny: list[str]) -> str | None:
    if value is not None and value in deny:
        return "denied"
    if allow and value not in allow:
        return "not allowed"
    return None


def allowed(event: Event, settings: Settings, bot_id: str) -> str | None:
    """Apply the allow and deny lists (a thread counts as its parent channel too)."""
    s = settings
    if not event.is_dm and (
        why := _listed(event.guild_id, s.discord_allow_guilds, s.discord_deny_guilds)
    ):
        return f"guild {why}"
    channels = {event.channel_id} | ({event.parent_id} if event.parent_id else set())
    if channels & set(s.discord_deny_channels):
        return "channel denied"
    if (
        s.discord_allow_channels
        and not event.is_dm
        and not (channels & set(s.discord_allow_channels))
    ):
        return "channel not allowed"
    if why := _listed(event.author_id, s.discord_allow_users, s.discord_deny_users):
        return f"user {why}"
    if not event.is_dm:
        if event.role_ids & set(s.discord_deny_roles):
            return "role denied"
        if s.discord_allow_roles and not event.role_ids & set(s.discord_allow_roles):
            return "role not allowed"
    return None


def addressed_to_bot(event: Event, settings: Settings, bot_id: str) -> str | None:
    """Keep DMs, mentions, replies to the bot and messages in the bot's threads."""
    if (
        event.is_dm
        or event.mentions_bot
        or event.replies_to_bot
        or event.in_bot_thread
        or event.listening
    ):
        return None
    return "not addressed to the bot"


def has_text(event: Event, settings: Settings, bot_id: str) -> str | None:
    """Drop messages whose content Discord did not send (message-content intent off);
    a message with attachments and no text is kept."""
    if event.content.strip() or event.attachments:
        return None
    return "no content (message-content intent off?)"


CHECKS: tuple[Check, ...] = (not_from_a_bot, allowed, addressed_to_bot, has_text)


def run_checks(event: Event, settings: Settings, bot_id: str) -> str | None:
    """The first reason to drop ``event``, or ``None`` to accept it."""
    for check in CHECKS:
        reason = check(event, settings, bot_id)
        if reason is not None:
            return reason
    return None


def event_from_message(message: discord.Message, bot_id: int) -> Event:
    """Read what the checks need from a discord.py message."""
    channel = message.channel
    thread = channel if isinstance(channel, discord.Thread) else None
    ref = message.reference.resolved if message.reference else None
    roles = getattr(message.author, "roles", [])
    perms = getattr(message.author, "guild_permissions", None)
    return Event(
        message_id=str(message.id),
        author_id=str(message.author.id),
        author_is_bot=message.author.bot,
        author_name=message.author.display_name,
        guild_id=str(message.guild.id) if message.guild else None,
        channel_id=str(message.channel.id),
        parent_id=str(thread.parent_id) if thread else None,
        role_ids=frozenset(str(r.id) for r in roles),
        content=message.content,
        mentions_bot=any(u.id == bot_id for u in message.mentions),
        replies_to_bot=isinstance(ref, discord.Message) and ref.author.id == bot_id,
        in_bot_thread=thread is not None and (thread.owner_id == bot_id or thread.me is not None),
        is_admin=bool(perms is not None and perms.manage_guild),
        reply_to_id=str(message.reference.message_id)
        if message.type == discord.MessageType.reply
        and message.reference is not None
        and message.reference.message_id is not None
        else None,
        attachments=len(message.attachments),
    )


def files_of(message: discord.Message) -> list[FileRef]:
    """References to a message's attachments (downloaded by the worker, never here)."""
    return [
        FileRef(
            id=str(a.id),
            name=a.filename[:1024] or "file",
            mimetype=(a.content_type or "")[:255],
            size=max(0, a.size),
            url=a.url if len(a.url) <= 4096 else "",
        )
        for a in message.attachments[:MAX_FILE_REFS]
    ]


def event_from_interaction(interaction: discord.Interaction) -> Event:
    """Read what the allow and deny lists need from an application command."""
    channel = interaction.channel
    thread = channel if isinstance(channel, discord.Thread) else None
    roles = getattr(interaction.user, "roles", [])
    return Event(
        message_id=str(interaction.id),
        author_id=str(interaction.user.id),
        author_is_bot=interaction.user.bot,
        author_name=interaction.user.display_name,
        guild_id=str(interaction.guild_id) if interaction.guild_id else None,
        channel_id=str(interaction.channel_id),
        parent_id=str(thread.parent_id) if thread else None,
        role_ids=frozenset(str(r.id) for r in roles),
    )


def strip_mention(text: str, bot_id: str) -> str:
    """The text without mentions of the bot (``<@id>`` and ``<@!id>``)."""
    return re.sub(rf"<@!?{re.escape(bot_id)}>", "", text).strip()


class DiscordIntake:
    """Turns accepted Discord messages and ``/ask`` interactions into reply jobs.

    ``guild_ids`` gives the ids of the guilds the bot is in (the client's cache); the
    ``members`` DM policy looks there when no guild allow-list is set.
    """

    def __init__(
        self, settings: Settings, guild_ids: Callable[[], Iterable[str]] | None = None
    ) -> None:
        self.settings = settings
        self.guild_ids = guild_ids
        self._keys = Keys(settings.key_prefix)
        self._queue: ArqRedis | None = None
        self.rest: DiscordRest | None = None
        self._listen_cache: dict[str, tuple[float, bool]] = {}
        # The event handlers running now: close() lets them finish before the pools go.
        self._busy: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Connect to Redis (the queue) and open the paced REST client."""
        if self._queue is None:
            self._queue = await connect_queue(self.settings)
            self._choices = Choices(self._queue, self._keys)
            self.rest = DiscordRest(self.settings, self._queue)
            await self.rest.start()

    async def close(self) -> None:
        """Let the events being handled finish (up to a few seconds), then close the REST
        client and the Redis pool."""
        busy = [t for t in self._busy if t is not asyncio.current_task()]
        if busy:
            await asyncio.wait(busy, timeout=CLOSE_WAIT_S)
        if self.rest is not None:
            await self.rest.close()
            self.rest = None
        if self._queue is not None:
            await self._queue.aclose()
            self._queue = None

    @property
    def queue(self) -> ArqRedis:
        """The Redis pool jobs are enqueued with."""
        if self._queue is None:
            raise RuntimeError("DiscordIntake.start() was not awaited")
        return self._queue

    @contextlib.asynccontextmanager
    async def _handling(self) -> AsyncIterator[None]:
        task = asyncio.current_task()
        if task is None:  # not in a task: nothing to wait for at close
            yield
            return
        self._busy.add(task)
        try:
            yield
        finally:
            self._busy.discard(task)

    async def on_message(self, message: discord.Message, me: discord.abc.User) -> bool:
        """Handle one MESSAGE_CREATE; ``True`` when a reply job was enqueued."""
        async with self._handling():
            return await self._on_message(message, me)

    async def _on_message(self, message: discord.Message, me: discord.abc.User) -> bool:
        bot_id = str(me.id)
        event = event_from_message(message, me.id)
        if (
            not_from_a_bot(event, self.settings, bot_id) is None
            and allowed(event, self.settings, bot_id) is None
            and addressed_to_bot(event, self.settings, bot_id) is not None
            and has_text(event, self.settings, bot_id) is None
        ):
            event = await self._look_further(event, message, bot_id)
        reason = run_checks(event, self.settings, bot_id)
        if reason is not None:
            logger.debug(
                "discord drop message=%s channel=%s: %s", event.message_id, event.channel_id, reason
            )
            return False
        if event.is_dm:
            refusal = await self.dm_refusal(event.author_id)
            if refusal is not None:
                await self._dm_notice(event.channel_id, event.author_id, DM_REFUSED[refusal])
                # Logged once the notice is out (or skipped): the message is done with.
                logger.info(
                    "discord DM refused message=%s user=%s: policy %s (%s)",
                    event.message_id,
                    event.author_id,
                    self.settings.discord_dm_policy,
                    refusal,
                )
                return False
        msg = IncomingMessage(
            platform=Platform.DISCORD,
            tenant=event.guild_id or dm_tenant(event.author_id),
            channel=event.channel_id,
            thread=user_thread(event.guild_id, event.parent_id, event.author_id),
            user=event.author_id,
            message_id=event.message_id,
            text=strip_mention(event.content, bot_id),
            user_name=event.author_name,
            is_dm=event.is_dm,
            ts=message.created_at.timestamp(),
            meta={"reply_to": event.message_id, **({"admin": "1"} if event.is_admin else {})},
            files=files_of(message),
        )
        return await self._accept(msg, event)

    async def on_ask(self, interaction: discord.Interaction, question: str) -> bool:
        """Handle ``/ask``: defer at once (Discord's 3-second window), then enqueue.

        The allow and deny lists apply as to messages; a refused user gets a short
        note only they can see.
        """
        async with self._handling():
            return await self._on_ask(interaction, question)

    async def _on_ask(self, interaction: discord.Interaction, question: str) -> bool:
        reason = allowed(event_from_interaction(interaction), self.settings, "")
        if reason is not None:
            logger.info(
                "discord /ask refused interaction=%s channel=%s: %s",
                interaction.id,
                interaction.channel_id,
                reason,
            )
            await interaction.response.send_message(ASK_REFUSED, ephemeral=True)
            return False
        await interaction.response.defer(thinking=True)
        if interaction.guild_id is None:
            refusal = await self.dm_refusal(str(interaction.user.id))
            if refusal is not None:
                logger.info(
                    "discord /ask refused in a DM interaction=%s user=%s: policy %s (%s)",
                    interaction.id,
                    interaction.user.id,
                    self.settings.discord_dm_policy,
                    refusal,
                )
                await interaction.edit_original_response(
                    content=DM_REFUSED[refusal], allowed_mentions=discord.AllowedMentions.none()
                )
                return False
        try:
            # The job carries only a reference: the token stays out of job payloads,
            # arq's results and key names (bots.discord.interactions).
            ref = await keep_token(self.queue, self._keys, interaction.token)
        except (RedisError, OSError) as e:
            logger.error(
                "discord cannot reach Redis for /ask interaction=%s: %s", interaction.id, e
            )
            await interaction.edit_original_response(
                content=ASK_FAILED, allowed_mentions=discord.AllowedMentions.none()
            )
            return False
        msg = IncomingMessage(
            platform=Platform.DISCORD,
            tenant=str(interaction.guild_id)
            if interaction.guild_id
            else dm_tenant(str(interaction.user.id)),
            channel=str(interaction.channel_id),
            thread=user_thread(
                str(interaction.guild_id) if interaction.guild_id else None,
                None if not isinstance(interaction.channel, discord.Thread) else "thread",
                str(interaction.user.id),
            ),
            user=str(interaction.user.id),
            message_id=str(interaction.id),
            text=question.strip(),
            user_name=interaction.user.display_name,
            is_dm=interaction.guild_id is None,
            meta={"interaction": ref, "application_id": str(interaction.application_id)},
        )
        accepted = await self._accept(msg, None)
        if not accepted and not await self._is_duplicate_claimed(msg):
            await interaction.edit_original_response(
                content=ASK_FAILED, allowed_mentions=discord.AllowedMentions.none()
            )
        return accepted

    async def _look_further(self, event: Event, message: discord.Message, bot_id: str) -> Event:
        """For a message not plainly addressed to the bot: does the channel listen without
        a mention, or does it reply to a bot message Discord did not include?"""
        if event.reply_to_id is not None and message.reference is not None:
            resolved = message.reference.resolved
            if resolved is None and await self._is_own_message(event, bot_id):
                return replace(event, replies_to_bot=True)
        if not event.is_dm and await self._listening(event):
            return replace(event, listening=True)
        return event

    async def _is_own_message(self, event: Event, bot_id: str) -> bool:
        """Whether the replied-to message is the bot's, asked over REST (Discord may
        leave ``referenced_message`` out of the event)."""
        assert self.rest is not None and event.reply_to_id is not None
        route = Route(
            "GET",
            "/channels/{channel_id}/messages/{message_id}",
            event.channel_id,
            f"/channels/{event.channel_id}/messages/{event.reply_to_id}",
        )
        try:
            data = await self.rest.request(
                route, context=f"channel={event.channel_id} message={event.message_id}"
            )
        except DeliveryError as e:
            logger.info(
                "discord cannot read the replied-to message channel=%s message=%s: %s",
                event.channel_id,
                event.message_id,
                e,
            )
            return False
        author = data.get("author") if isinstance(data, dict) else None
        return isinstance(author, dict) and str(author.get("id")) == bot_id

    async def _listening(self, event: Event) -> bool:
        """Whether the bot answers ``event``'s channel (or the thread's parent) unasked."""
        channels = [event.channel_id] + ([event.parent_id] if event.parent_id else [])
        if set(channels) & set(self.settings.discord_listen_channels):
            return True
        now = time.monotonic()
        for channel in channels:
            cached = self._listen_cache.get(channel)
            if cached is None or cached[0] <= now:
                try:
                    on = await self._choices.listening(
                        Platform.DISCORD, event.guild_id or "", channel
                    )
                except (RedisError, OSError) as e:
                    logger.warning("discord cannot read /listen channel=%s: %s", channel, e)
                    return False
                if len(self._listen_cache) >= LISTEN_CACHE_MAX:
                    self._listen_cache.clear()
                cached = self._listen_cache[channel] = (now + LISTEN_CACHE_S, on)
            if cached[1]:
                return True
        return False

    async def dm_refusal(self, user_id: str) -> str | None:
        """Why a DM from ``user_id`` is refused under the DM policy, or ``None``.

        ``"nobody"``, ``"members"`` (not a member of an allowed guild, or refused by
        the role lists there) or ``"unchecked"`` (the lookup failed; not remembered).
        """
        policy = self.settings.discord_dm_policy
        if policy == "everyone":
            return None
        if policy == "nobody":
            return "nobody"
        key = self._keys.discord_dm_member(user_id)
        try:
            known = await self.queue.get(key)
        except (RedisError, OSError) as e:
            logger.error("discord cannot reach Redis for the DM check user=%s: %s", user_id, e)
            return "unchecked"
        if known is not None:
            return None if known in (b"1", "1") else "members"
        try:
            member = await self._is_member(user_id)
        except DeliveryError as e:
            logger.warning("discord DM membership lookup failed user=%s: %s", user_id, e)
            return "unchecked"
        try:
            await self.queue.set(key, "1" if member else "0", ex=DM_MEMBER_CACHE_S)
        except (RedisError, OSError) as e:
            logger.warning("discord cannot remember the DM check user=%s: %s", user_id, e)
        return None if member else "members"

    def _member_guilds(self) -> list[str]:
        s = self.settings
        if s.discord_allow_guilds:
            guilds = list(s.discord_allow_guilds)
        elif self.guild_ids is not None:
            guilds = sorted(self.guild_ids())
        else:
            guilds = []
        return [g for g in guilds if g not in s.discord_deny_guilds]

    async def _is_member(self, user_id: str) -> bool:
        """A member of an allowed guild whom the role lists there let through.

        Raises:
            DeliveryError: Discord could not be asked (5xx, network, rate limits).
        """
        assert self.rest is not None
        s = self.settings
        guilds = self._member_guilds()
        if len(guilds) > DM_MAX_GUILD_LOOKUPS:
            logger.warning(
                "discord DM check user=%s: asking only %d of %d guilds; set "
                "SLUICE_DISCORD_ALLOW_GUILDS to the guilds whose members may DM the bot",
                user_id,
                DM_MAX_GUILD_LOOKUPS,
                len(guilds),
            )
        for guild_id in guilds[:DM_MAX_GUILD_LOOKUPS]:
            route = Route(
                "GET",
                "/guilds/{guild_id}/members/{user_id}",
                guild_id,
                f"/guilds/{guild_id}/members/{user_id}",
            )
            try:
                member = await self.rest.request(route, context=f"guild={guild_id} user={user_id}")
            except DiscordHTTPError as e:  # 404 Unknown Member (or Guild): not there
                if e.status != 404:
                    logger.warning(
                        "discord member lookup guild=%s user=%s: %s", guild_id, user_id, e
                    )
                continue
            roles = set(member.get("roles", [])) if isinstance(member, dict) else set()
            if roles & set(s.discord_deny_roles):
                continue
            if s.discord_allow_roles and not roles & set(s.discord_allow_roles):
                continue
            return True
        return False

    async def _dm_notice(self, channel_id: str, user_id: str, text: str) -> None:
        """Tell a refused DM user why, at most once per user per :data:`DM_NOTICE_WINDOW_S`."""
        assert self.rest is not None
        try:
            first = await self.queue.set(
                self._keys.discord_dm_notice(user_id), "1", nx=True, ex=DM_NOTICE_WINDOW_S
            )
        except (RedisError, OSError) as e:
            logger.error("discord cannot reach Redis for the DM notice user=%s: %s", user_id, e)
            return
        if not first:
            return
        route = Route(
            "POST",
            "/channels/{channel_id}/messages",
            channel_id,
            f"/channels/{channel_id}/messages",
        )
        try:
            await self.rest.request(
                route,
                json={"content": text, "allowed_mentions": {"parse": []}},
                context=f"channel={channel_id} DM notice",
            )
        except DeliveryError as e:
            logger.warning("discord DM notice failed channel=%s: %s", channel_id, e)

    async def _is_duplicate_claimed(self, msg: IncomingMessage) -> bool:
        try:
            return bool(await self.queue.exists(self._keys.dedupe("discord", msg.message_id)))
        except RedisError:
            return False

    async def _accept(self, msg: IncomingMessage, event: Event | None) -> bool:
        """Claim the message id, open a thread if configured, enqueue; release on failure."""
        marker = self._keys.dedupe("discord", msg.message_id)
        try:
            claimed = await self.queue.set(
                marker, arq_job_id(self.settings, msg), nx=True, ex=self.settings.dedupe_ttl_s
            )
        except (RedisError, OSError) as e:
            logger.error("discord cannot reach Redis for message=%s: %s", msg.message_id, e)
            return False
        if not claimed:
            logger.info("discord duplicate message=%s channel=%s", msg.message_id, msg.channel)
            return False
        if event is not None and self._wants_thread(event):
            msg = await self._open_thread(msg, event)
        try:
            await enqueue_reply(self.queue, self.settings, msg)
        except QueueError as e:
            logger.error(
                "discord enqueue failed message=%s channel=%s: %s", msg.message_id, msg.channel, e
            )
            try:
                await self.queue.delete(marker)
            except (RedisError, OSError) as e2:
                logger.error("discord cannot release claim on message=%s: %s", msg.message_id, e2)
            return False
        if event is not None and self.settings.discord_typing:
            await self._show_typing(msg.channel)
        return True

    async def _show_typing(self, channel_id: str) -> None:
        """Typing while the message waits in the queue (best effort: skipped when busy)."""
        assert self.rest is not None
        route = Route(
            "POST", "/channels/{channel_id}/typing", channel_id, f"/channels/{channel_id}/typing"
        )
        try:
            await self.rest.request(route, best_effort=True, context=f"channel={channel_id}")
        except (DeliveryError, RedisError) as e:
            logger.info("discord typing failed channel=%s: %s", channel_id, e)

    def _wants_thread(self, event: Event) -> bool:
        return (
            self.settings.discord_threads
            and not event.is_dm
            and event.parent_id is None
            and event.mentions_bot
        )

    async def _open_thread(self, msg: IncomingMessage, event: Event) -> IncomingMessage:
        """Start a thread on the message; the conversation then lives in the thread."""
        assert self.rest is not None
        name = (msg.text.splitlines() or ["Conversation"])[0][:90] or "Conversation"
        route = Route(
            "POST",
            "/channels/{channel_id}/messages/{message_id}/threads",
            event.channel_id,
            f"/channels/{event.channel_id}/messages/{event.message_id}/threads",
        )
        try:
            data = await self.rest.request(
                route,
                json={"name": name, "auto_archive_duration": 1440},
                context=f"channel={event.channel_id} message={event.message_id}",
            )
        except DiscordHTTPError as e:
            logger.warning(
                "discord cannot open a thread channel=%s (status %s); replying in the channel",
                event.channel_id,
                e.status,
            )
            return msg
        except DeliveryError as e:
            logger.warning("discord cannot open a thread channel=%s: %s", event.channel_id, e)
            return msg
        return msg.model_copy(update={"channel": str(data["id"]), "meta": {}})

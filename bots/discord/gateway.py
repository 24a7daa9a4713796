"""``sluice discord``: the gateway connection, on discord.py.

The client asks only for the intents it needs: guilds, guild messages and direct
messages. The message-content intent is privileged; without it Discord still sends
the content of DMs and of messages that mention the bot (a reply to the bot mentions
it unless the user turned the ping off). ``SLUICE_DISCORD_MESSAGE_CONTENT=true``
asks for it (enable it in the developer portal first), which is needed to read
plain messages in threads the bot is in.

Sharding (Discord requires it from 2,500 guilds): ``SLUICE_DISCORD_SHARDS=auto`` runs
every shard Discord recommends in this process (discord.py's ``AutoShardedClient``);
``FIRST-LAST/COUNT`` (e.g. ``0-3/16``) runs only those shards, so several processes
share the guilds (:func:`make_client`). Discord sends each guild's events to the shard
``(guild_id >> 22) % COUNT`` and DMs to shard 0.
"""

from __future__ import annotations

import logging
from typing import Any

import discord
import yarl
from discord import app_commands

from bots.discord.intake import DiscordIntake
from core.settings import Settings, parse_shards

logger = logging.getLogger(__name__)

# What the bot needs in a channel: read, answer, answer in threads, open threads.
PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    create_public_threads=True,
    read_message_history=True,
)
SCOPES = ("bot", "applications.commands")


def intents(settings: Settings) -> discord.Intents:
    """The gateway intents Sluice needs (message content only when asked for)."""
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_messages = True
    wanted.dm_messages = True
    wanted.message_content = settings.discord_message_content
    return wanted


def invite_url(application_id: str) -> str:
    """The OAuth2 URL that adds the bot to a server with the permissions it needs."""
    return discord.utils.oauth_url(int(application_id), permissions=PERMISSIONS, scopes=SCOPES)


def use_api_url(settings: Settings) -> None:
    """Point discord.py's REST client at ``DISCORD_API_URL`` (a REST proxy, or a fake)."""
    discord.http.Route.BASE = settings.discord_api_url.rstrip("/")


def ask_command(intake: DiscordIntake) -> app_commands.Command[Any, ..., None]:
    """The ``/ask`` application command, answered through the queue."""

    @app_commands.command(name="ask", description="Ask the bot a question.")
    @app_commands.describe(question="What do you want to know?")
    async def ask(interaction: discord.Interaction, question: str) -> None:
        await intake.on_ask(interaction, question)

    return ask


def _shape(name: str, description: str, options: list[tuple[str, str]]) -> tuple[object, ...]:
    return (name, description, tuple(sorted(options)))


async def sync_commands(tree: app_commands.CommandTree[discord.Client]) -> None:
    """Register the tree's commands, only when Discord's copy differs.

    Registering is limited (a few calls a minute, 200 new commands a day), so a
    restart that changes nothing must not re-register.
    """
    remote = {
        _shape(c.name, c.description, [(o.name, o.description) for o in c.options])
        for c in await tree.fetch_commands()
    }
    local = {
        _shape(
            c.name,
            getattr(c, "description", ""),
            [(p.name, p.description) for p in getattr(c, "parameters", [])],
        )
        for c in tree.get_commands()
    }
    if remote == local:
        logger.info("discord application commands are up to date (%d)", len(local))
        return
    synced = await tree.sync()
    logger.info("discord registered %d application command(s)", len(synced))


class SluiceClient(discord.Client):
    """A discord.py client that enqueues conversations for Sluice's workers."""

    def __init__(self, settings: Settings, **options: Any) -> None:
        use_api_url(settings)
        super().__init__(intents=intents(settings), max_messages=None, **options)
        self.settings = settings
        self.intake = DiscordIntake(settings, guild_ids=lambda: [str(g.id) for g in self.guilds])
        self.tree = app_commands.CommandTree(self)
        self.tree.add_command(ask_command(self.intake))

    async def setup_hook(self) -> None:
        """Connect to Redis, find the gateway, register ``/ask``."""
        await self.intake.start()
        # The gateway URL comes from the API (GET /gateway/bot), as Discord recommends;
        # with a REST proxy or a test double that is where the socket lives too.
        _, url, _ = await self.http.get_bot_gateway()
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)
        if self.settings.discord_sync_commands:
            await sync_commands(self.tree)

    async def on_ready(self) -> None:
        """Log who we are and where."""
        logger.info(
            "discord connected as %s (%s) in %d guild(s)",
            self.user,
            self.user.id if self.user else "?",
            len(self.guilds),
        )

    async def on_message(self, message: discord.Message) -> None:
        """Every MESSAGE_CREATE: check, dedupe, enqueue."""
        if self.user is not None:
            await self.intake.on_message(message, self.user)

    async def close(self) -> None:
        """Disconnect, then close Redis and the REST session."""
        await super().close()
        await self.intake.close()


class ShardedSluiceClient(SluiceClient, discord.AutoShardedClient):
    """:class:`SluiceClient` on several gateway shards (``SLUICE_DISCORD_SHARDS``)."""


def make_client(settings: Settings, **options: Any) -> SluiceClient:
    """The adapter's client: sharded as ``SLUICE_DISCORD_SHARDS`` says, else one connection."""
    if settings.discord_shards is None:
        return SluiceClient(settings, **options)
    shards = parse_shards(settings.discord_shards)
    if shards is not None:
        options["shard_ids"], options["shard_count"] = shards
        logger.info("discord shards %s of %d in this process", shards[0], shards[1])
    else:
        logger.info("discord shards: as many as Discord recommends, all in this process")
    return ShardedSluiceClient(settings, **options)

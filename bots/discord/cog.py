"""Plugin mode: add Sluice to an existing ``commands.Bot``.

::

    await bot.load_extension("bots.discord.cog")

The Cog listens to messages next to the bot's own handlers and adds ``/ask`` to its
command tree; it leaves every other command alone and ignores messages that are one
of the bot's own prefix commands. Settings come from the environment
(:func:`core.settings.get_settings`), or pass them with ``SluiceCog(bot, settings)``.
The host bot decides when to sync its application commands (``bot.tree.sync()``),
and needs the intents of :func:`bots.discord.gateway.intents`.
"""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bots.discord.intake import DiscordIntake
from core.settings import Settings, get_settings


class SluiceCog(commands.Cog, name="Sluice"):
    """Answers mentions, replies, DMs, thread messages and ``/ask`` through Sluice."""

    def __init__(self, bot: commands.Bot, settings: Settings | None = None) -> None:
        self.bot = bot
        self.intake = DiscordIntake(
            settings or get_settings(), guild_ids=lambda: [str(g.id) for g in bot.guilds]
        )

    async def cog_load(self) -> None:
        """Connect to Redis and open the REST client."""
        await self.intake.start()

    async def cog_unload(self) -> None:
        """Close what :meth:`cog_load` opened."""
        await self.intake.close()

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        """Enqueue messages for Sluice, except the host bot's own commands."""
        if self.bot.user is None:
            return
        ctx: commands.Context[commands.Bot] = await self.bot.get_context(message)
        if ctx.valid:
            return
        await self.intake.on_message(message, self.bot.user)

    @commands.Cog.listener()
    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """Clicks on Sluice's feedback buttons under its answers."""
        await self.intake.on_interaction(interaction)

    @app_commands.command(name="ask", description="Ask the bot a question.")
    @app_commands.describe(question="What do you want to know?")
    async def ask(self, interaction: discord.Interaction, question: str) -> None:
        """``/ask``: defer, then a worker edits the response."""
        await self.intake.on_ask(interaction, question)


async def setup(bot: commands.Bot) -> None:
    """discord.py extension entry point."""
    await bot.add_cog(SluiceCog(bot))

"""Sluice: LLM chat bots on Slack, Discord and a web chat that stay up on launch day.

This package is the public API. A bot is plain Python in your own module::

    from sluice import Bot, MessageContext

    bot = Bot(name="helper", system_prompt="You answer questions about our product.")

    @bot.command("ping", help="Check that the bot is alive.")
    async def ping(ctx: MessageContext) -> str:
        return "pong"

and ``SLUICE_APP=mybot:bot`` points workers and adapters at it (``docs/guide.md``).

Everything in ``__all__`` is covered by the project's compatibility promise; the
internal packages ``core``, ``bots`` and ``workers`` may change between releases.
Sluice's command line (``sluice dev``, ``sluice worker``, ...) lives in ``sluice.cli``.
"""

from __future__ import annotations

from core.errors import (
    BotDefinitionError,
    ConfigError,
    DeliveryError,
    DeliveryRetryableError,
    InputError,
    LLMError,
    QueueError,
    SluiceError,
)
from core.framework.bot import DEFAULT_BOT, Bot, load_bot
from core.framework.commands import CommandUsageError
from core.framework.context import MessageContext
from core.framework.routing import LANES, LaneRule
from core.framework.tools import Tool, ToolArgumentError
from core.messages import Feedback, IncomingMessage, Platform, Reply, Turn, Vote
from core.settings import Settings, get_settings

__all__ = [
    "DEFAULT_BOT",
    "LANES",
    "Bot",
    "BotDefinitionError",
    "CommandUsageError",
    "ConfigError",
    "DeliveryError",
    "DeliveryRetryableError",
    "Feedback",
    "IncomingMessage",
    "InputError",
    "LLMError",
    "LaneRule",
    "MessageContext",
    "Platform",
    "QueueError",
    "Reply",
    "Settings",
    "SluiceError",
    "Tool",
    "ToolArgumentError",
    "Turn",
    "Vote",
    "get_settings",
    "load_bot",
]

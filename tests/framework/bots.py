"""Bots the framework tests run in worker processes: ``SLUICE_APP=tests.framework.bots:NAME``."""

from __future__ import annotations

import asyncio
import sys

from core.framework.bot import Bot, MessageContext

tool_bot = Bot(name="tool-test", system_prompt="You use tools.")


@tool_bot.tool
async def explode(reason: str = "boom") -> str:
    """A tool that always fails.

    Args:
        reason: The error message.
    """
    raise RuntimeError(reason)


@tool_bot.tool
async def whoami(ctx: MessageContext) -> str:
    """Who is asking, from the message context."""
    return f"user={ctx.user} dm={ctx.is_dm} platform={ctx.platform}"


@tool_bot.tool(timeout_s=0.2)
async def slow() -> str:
    """A tool that takes too long."""
    await asyncio.sleep(5)
    return "late"


broken_hook_bot = Bot(name="broken-hook", system_prompt="Hooks break here.")


@broken_hook_bot.before
async def explode_before(ctx: MessageContext, text: str) -> str | None:
    """A before-hook with a bug."""
    raise KeyError("no such key")


broken_after_bot = Bot(name="broken-after")


@broken_after_bot.after
async def explode_after(ctx: MessageContext, reply: object) -> str | None:
    """An after-hook with a bug."""
    raise ValueError("after hook bug")


# A bot whose tools come from an MCP server over stdio (tests/framework/mcp_server.py).
mcp_bot = Bot(name="mcp-test", system_prompt="You use MCP tools.")
mcp_bot.mcp("calc", command=[sys.executable, "-m", "tests.framework.mcp_server"], timeout_s=1.0)

# A bot whose MCP server cannot start: workers must refuse to start and name it.
broken_mcp_bot = Bot(name="mcp-broken", system_prompt="Never starts.")
broken_mcp_bot.mcp(
    "ghost", command=[sys.executable, "-c", "import sys; sys.exit(3)"], connect_timeout_s=10
)

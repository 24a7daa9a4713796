"""A bot module with a mistake: two commands with one name (imported by a test only)."""

from __future__ import annotations

from core.framework.bot import Bot

bot = Bot(name="dup")


@bot.command("status", help="The status.")
async def status_a() -> str:
    return "a"


@bot.command("status", help="The status, again.")
async def status_b() -> str:
    return "b"

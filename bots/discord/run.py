"""Running the Discord adapter as a process (``sluice discord``)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import click

from bots.discord.gateway import invite_url, make_client
from core.errors import ConfigError
from core.infra.heartbeat import process_ops
from core.infra.signals import stop_on_signals
from core.settings import Settings

logger = logging.getLogger(__name__)


def _token(settings: Settings) -> str:
    if settings.discord_token is None:
        raise ConfigError(
            "DISCORD_TOKEN is not set: copy the bot token from the Discord developer portal "
            "(Applications > your app > Bot > Reset Token) into DISCORD_TOKEN."
        )
    return settings.discord_token.get_secret_value()


async def application_id(settings: Settings) -> str:
    """``SLUICE_DISCORD_APPLICATION_ID``, else asked from the API with the bot token."""
    if settings.discord_application_id:
        return settings.discord_application_id
    url = settings.discord_api_url.rstrip("/") + "/oauth2/applications/@me"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Authorization": f"Bot {_token(settings)}"}) as resp,
    ):
        if resp.status != 200:
            raise ConfigError(f"Discord refused the token ({resp.status}); check DISCORD_TOKEN.")
        data = await resp.json()
    return str(data["id"])


async def print_invite_url(settings: Settings) -> None:
    """Print the invite URL for the bot."""
    click.echo(invite_url(await application_id(settings)))


async def run_discord(settings: Settings) -> None:
    """Connect and serve until SIGINT/SIGTERM."""
    token = _token(settings)
    client = make_client(settings)
    stop = stop_on_signals()
    async with process_ops(settings, "adapter:discord"), client:
        runner = asyncio.create_task(client.start(token))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stopper in done:
            logger.info("discord adapter stopping")
            await client.close()
        else:
            stopper.cancel()
        await runner

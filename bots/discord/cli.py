"""The ``sluice discord`` command (registered in ``sluice/cli.py``)."""

from __future__ import annotations

import click


@click.command("discord")
@click.option(
    "--invite-url",
    is_flag=True,
    help="Print the OAuth2 URL that adds the bot to a server, then exit.",
)
def discord_command(invite_url: bool) -> None:
    """Discord adapter: connect to the gateway and enqueue conversations for the workers.

    Needs DISCORD_TOKEN and REDIS_URL. Answers mentions, replies to the bot, DMs,
    messages in the bot's threads and /ask; see docs/discord.md.
    """
    import asyncio
    import sys

    from bots.discord.run import print_invite_url, run_discord
    from core.errors import ConfigError
    from core.infra.logs import setup_logging
    from core.settings import get_settings

    settings = get_settings()
    try:
        if invite_url:
            asyncio.run(print_invite_url(settings))
            return
        setup_logging(settings, process="discord")
        from core.infra.redis import check_primary

        asyncio.run(check_primary(settings))  # wrong sentinels: one clear line, exit 2
        asyncio.run(run_discord(settings))
    except ConfigError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)

"""``sluice slack``: the Slack adapter (HTTP on ``--port``, or Socket Mode)."""

from __future__ import annotations

import asyncio
import sys

import click


@click.command("slack")
@click.option("--host", default="0.0.0.0", show_default=True, help="Bind address (HTTP mode).")
@click.option(
    "--port", type=int, default=None, help="Port (HTTP mode; default SLUICE_SLACK_PORT, 3000)."
)
@click.option(
    "--manifest",
    is_flag=True,
    help="Print the Slack app manifest (with the bot's commands) and exit.",
)
@click.option("--url", default=None, help="Public base URL written into --manifest.")
@click.option("--socket-mode", is_flag=True, help="With --manifest: a manifest for Socket Mode.")
def slack(host: str, port: int | None, manifest: bool, url: str | None, socket_mode: bool) -> None:
    """Slack adapter: Socket Mode when SLACK_APP_TOKEN is set, else HTTP on --port.

    HTTP mode serves POST /slack/events, GET /slack/install, GET /slack/oauth_redirect
    and GET /healthz. Workers (`sluice worker`) write the replies.
    """
    from bots.slack.app import serve
    from core.errors import ConfigError
    from core.logs import setup_logging
    from core.settings import get_settings

    settings = get_settings()
    if manifest:
        from bots.slack.manifest import render_manifest
        from core.bot import load_bot

        try:
            bot = load_bot(settings.app)
        except ConfigError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
        click.echo(
            render_manifest(
                bot, url=url, socket_mode=socket_mode or settings.slack_app_token is not None
            ),
            nl=False,
        )
        return
    setup_logging(settings, process="slack")
    try:
        from core.redis import check_primary

        asyncio.run(check_primary(settings))  # wrong sentinels: one clear line, exit 2
        asyncio.run(serve(settings, host, settings.slack_port if port is None else port))
    except ConfigError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        pass

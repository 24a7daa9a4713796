"""``sluice slack``: the Slack adapter (HTTP on ``--port``, or Socket Mode).

Subcommands for multi-workspace installs: ``sluice slack genkey`` prints a new
encryption key, ``sluice slack reencrypt`` rewrites stored tokens under the first key
of ``SLUICE_ENCRYPTION_KEY``.
"""

from __future__ import annotations

import asyncio
import sys

import click


@click.group("slack", invoke_without_command=True)
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
@click.pass_context
def slack(
    ctx: click.Context,
    host: str,
    port: int | None,
    manifest: bool,
    url: str | None,
    socket_mode: bool,
) -> None:
    """Slack adapter: Socket Mode when SLACK_APP_TOKEN is set, else HTTP on --port.

    HTTP mode serves POST /slack/events, GET /slack/install, GET /slack/oauth_redirect
    and GET /healthz. Workers (`sluice worker`) write the replies. With a subcommand,
    runs that instead (key management for installable apps).
    """
    if ctx.invoked_subcommand is not None:
        return
    from bots.slack.app import serve
    from core.errors import ConfigError
    from core.infra.logs import setup_logging
    from core.settings import get_settings

    settings = get_settings()
    if manifest:
        from bots.slack.manifest import render_manifest
        from core.framework.bot import load_bot

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
        from core.infra.redis import check_primary

        asyncio.run(check_primary(settings))  # wrong sentinels: one clear line, exit 2
        asyncio.run(serve(settings, host, settings.slack_port if port is None else port))
    except ConfigError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        pass


@slack.command("genkey")
def genkey() -> None:
    """Print a new key for SLUICE_ENCRYPTION_KEY (Fernet).

    To rotate, put the new key first: SLUICE_ENCRYPTION_KEY=new,old; then run
    `sluice slack reencrypt` and drop the old key.
    """
    from cryptography.fernet import Fernet

    click.echo(Fernet.generate_key().decode())


@slack.command("reencrypt")
def reencrypt_command() -> None:
    """Rewrite every stored installation under the first key of SLUICE_ENCRYPTION_KEY.

    Tokens under an older key (listed after the first) are re-encrypted; tokens stored
    in plain text are encrypted. Prints counts; exits 1 if a row has a token that no
    key decrypts (that row is left as it is). Safe to run again.
    """
    from bots.slack.installations import reencrypt
    from core.errors import ConfigError
    from core.infra.logs import setup_logging
    from core.settings import get_settings

    settings = get_settings()
    setup_logging(settings, process="slack")
    try:
        report = asyncio.run(reencrypt(settings))
    except ConfigError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    click.echo(
        f"{report.rows} installation(s): {report.reencrypted} re-encrypted under the first key "
        f"({report.from_plain_text} were plain text), {len(report.failed)} failed"
        + (f", {report.changed_meanwhile} changed meanwhile" if report.changed_meanwhile else "")
    )
    if report.failed:
        click.secho(
            "no key in SLUICE_ENCRYPTION_KEY decrypts: " + ", ".join(report.failed),
            fg="red",
            err=True,
        )
        sys.exit(1)

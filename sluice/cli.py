"""The ``sluice`` command. Each command imports what it needs when it runs."""

from __future__ import annotations

import asyncio
import importlib
import sys

import click
from pydantic import ValidationError

from core.errors import ConfigError
from core.settings import describe_settings_error, get_settings


def _fail(e: Exception) -> None:
    click.secho(f"error: {e}", fg="red", err=True)
    sys.exit(2)


# Commands defined in other modules, imported only when named (or listed by --help): a
# `sluice worker` does not load the Slack and Discord SDKs, a `sluice status` not the
# benchmarks. Name -> "module:attribute".
LAZY_COMMANDS = {
    "bench": "sluice.bench.cli:bench",
    "status": "sluice.opscli:status",
    "capacity": "sluice.opscli:capacity",
    "commands": "sluice.commands:commands_command",
    "cache": "sluice.cache_cli:cache",
    # History data management (sluice/history_cli.py).
    "history": "sluice.history_cli:history",
    "db": "sluice.history_cli:db",
    "usage": "sluice.history_cli:usage",
    "slack": "bots.slack.cli:slack",
    "discord": "bots.discord.cli:discord_command",
}


class LazyGroup(click.Group):
    """A group whose ``LAZY_COMMANDS`` are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The group's own commands and the lazy ones, sorted."""
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command, importing its module if it is a lazy one."""
        if cmd_name not in self.commands and cmd_name in LAZY_COMMANDS:
            module_name, attr = LAZY_COMMANDS[cmd_name].split(":")
            command = getattr(importlib.import_module(module_name), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{LAZY_COMMANDS[cmd_name]} is not a click command")
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Sluice: LLM chat bots on Slack and Discord that survive launch day."""
    # Bad settings (an odd id, SLUICE_MAX_WAIT_S=0, …) stop every command at once
    # with one clear line per setting, not a traceback. Read anew for each invocation
    # (one per process, but several in a test's CliRunner, each with its own env).
    get_settings.cache_clear()
    try:
        get_settings()
    except ValidationError as e:
        _fail(ConfigError(describe_settings_error(e)))


@main.command()
@click.option(
    "--port", type=int, default=None, help="Web chat port (default SLUICE_WEB_PORT, 8080)."
)
@click.option(
    "--host",
    default=None,
    help="Web chat bind address (default SLUICE_WEB_HOST, 127.0.0.1); off loopback it "
    "needs SLUICE_WEB_AUTH or SLUICE_WEB_TOKEN, and SLUICE_WEB_SECRET.",
)
@click.option("--no-browser-hint", is_flag=True, hidden=True)
def dev(port: int | None, host: str | None, no_browser_hint: bool) -> None:
    """Everything in one process: web chat, a worker, the simulator if no API key.

    Uses REDIS_URL, else a Redis on 127.0.0.1:6379, else an embedded Valkey;
    SQLite at ./sluice.db unless DATABASE_URL says otherwise.
    """
    from sluice.dev import run_dev

    try:
        asyncio.run(run_dev(get_settings(), port=port, host=host))
    except ConfigError as e:
        _fail(e)
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--burst", is_flag=True, help="Exit once the queue is empty.")
def worker(burst: bool) -> None:
    """An arq worker answering reply jobs. Run as many as you like, on any hosts."""
    from core.infra.logs import setup_logging
    from workers.run import run_worker

    settings = get_settings()
    setup_logging(settings, process="worker")
    try:
        asyncio.run(run_worker(settings, burst=burst))
    except ConfigError as e:
        # e.g. an older database schema: the message names `sluice db upgrade`.
        _fail(e)


@main.command()
@click.option(
    "--host",
    default=None,
    help="Bind address (default SLUICE_WEB_HOST, 127.0.0.1); off loopback it needs "
    "SLUICE_WEB_AUTH or SLUICE_WEB_TOKEN, and SLUICE_WEB_SECRET.",
)
@click.option("--port", type=int, default=None, help="Port (default SLUICE_WEB_PORT, 8080).")
def web(host: str | None, port: int | None) -> None:
    """The web chat adapter alone (workers run separately).

    A development tool unless configured otherwise: it answers only to
    SLUICE_WEB_ALLOWED_HOSTS and refuses to listen off loopback without a sign-in.
    """
    from sluice.dev import run_web

    try:
        asyncio.run(run_web(get_settings(), host=host, port=port))
    except ConfigError as e:
        _fail(e)
    except KeyboardInterrupt:
        pass


@main.command("llm-sim")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port (0: any free one).")
@click.option(
    "--first-token-ms",
    type=float,
    default=50,
    show_default=True,
    help="Latency to the first token.",
)
@click.option(
    "--token-ms", type=float, default=10, show_default=True, help="Latency between tokens."
)
@click.option("--tokens", type=int, default=20, show_default=True, help="Tokens per answer.")
@click.option("--rpm", type=int, default=None, help="Provider limit: requests per minute.")
@click.option("--tpm", type=int, default=None, help="Provider limit: tokens per minute.")
@click.option(
    "--error-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Fraction of requests answered with HTTP 500.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the error draw.")
def llm_sim(
    host: str,
    port: int,
    first_token_ms: float,
    token_ms: float,
    tokens: int,
    rpm: int | None,
    tpm: int | None,
    error_rate: float,
    seed: int,
) -> None:
    """An OpenAI-compatible Chat Completions simulator with real 429s."""
    from sluice.llmsim import SimConfig
    from sluice.llmsim import main as sim_main

    cfg = SimConfig(
        first_token_latency_s=first_token_ms / 1000,
        token_latency_s=token_ms / 1000,
        tokens=tokens,
        rpm=rpm,
        tpm=tpm,
        error_rate=error_rate,
        seed=seed,
    )
    sim_main(port, cfg, host=host)

"""``sluice commands``: the bot's commands, as adapters register them."""

from __future__ import annotations

import json

import click


@click.command("commands")
@click.option("--json", "as_json", is_flag=True, help="Print the specs as JSON.")
def commands_command(as_json: bool) -> None:
    """List the commands of the bot in SLUICE_APP (name, usage, help, arguments)."""
    from core.errors import ConfigError
    from core.framework.bot import load_bot
    from core.settings import get_settings

    try:
        bot = load_bot(get_settings().app)
    except ConfigError as e:
        raise click.ClickException(str(e)) from e
    specs = bot.command_specs()
    if as_json:
        click.echo(json.dumps([s.as_dict() for s in specs], indent=2))
        return
    for spec in specs:
        click.echo(f"{spec.usage}\n    {spec.description}")
        for p in spec.params:
            need = "required" if p.required else f"optional, default {p.default!r}"
            choices = f", one of {', '.join(map(str, p.choices))}" if p.choices else ""
            click.echo(f"    {p.name} ({p.type}, {need}{choices}): {p.description}")

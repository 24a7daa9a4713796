"""The Slack app manifest (``manifest.yml``) filled in for one deployment.

``sluice slack --manifest --url https://bot.example.com`` prints it with the public
URL and one slash command per command of the bot definition (``SLUICE_APP``), ready
to paste into https://api.slack.com/apps.
"""

from __future__ import annotations

from pathlib import Path

from core.framework.bot import Bot

TEMPLATE = Path(__file__).with_name("manifest.yml")
PLACEHOLDER_URL = "https://sluice.example.com"
_ASK_ENTRY_END = "      should_escape: false\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_manifest(bot: Bot, *, url: str | None = None, socket_mode: bool = False) -> str:
    """The manifest with ``url`` (HTTP mode) and the bot's commands as slash commands."""
    text = TEMPLATE.read_text("utf-8")
    base = (url or PLACEHOLDER_URL).rstrip("/")
    entries = []
    for spec in bot.command_specs("slack"):
        if spec.name == "ask":
            continue
        hint = spec.usage.split(" ", 1)[1] if " " in spec.usage else ""
        entries.append(
            f"    - command: /{spec.name}\n"
            f"      url: {PLACEHOLDER_URL}/slack/events\n"
            f"      description: {_quote(spec.description or spec.name)}\n"
            f"      usage_hint: {_quote(hint)}\n"
            f"      should_escape: false\n"
        )
    text = text.replace(_ASK_ENTRY_END, _ASK_ENTRY_END + "".join(entries), 1)
    if socket_mode:
        # Events and commands arrive over the websocket: no request URLs.
        text = text.replace("socket_mode_enabled: false", "socket_mode_enabled: true")
        text = "".join(
            line
            for line in text.splitlines(keepends=True)
            if not line.lstrip().startswith(("request_url:", "url:"))
        )
    return text.replace(PLACEHOLDER_URL, base)

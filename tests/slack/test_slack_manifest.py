"""The app manifest asks for what the adapter uses."""

from __future__ import annotations

import re
from pathlib import Path

import bots.slack
from bots.slack.app import BOT_SCOPES

MANIFEST = Path(bots.slack.__file__).parent / "manifest.yml"


def _list_under(text: str, key: str) -> list[str]:
    block = re.search(rf"\n(\s*){key}:\n((?:\1\s+- .*\n)+)", text)
    assert block, key
    return [line.split("- ", 1)[1].strip() for line in block.group(2).splitlines()]


def test_manifest_scopes_match_the_install_flow():
    assert sorted(_list_under(MANIFEST.read_text(), "bot")) == sorted(BOT_SCOPES)


def test_manifest_subscribes_to_every_event_sluice_listens_to():
    events = set(_list_under(MANIFEST.read_text(), "bot_events"))
    assert {
        "app_mention",
        "message.im",
        "message.channels",
        "assistant_thread_started",
        "app_uninstalled",
        "tokens_revoked",
    } <= events


def test_manifest_declares_ask_and_the_socket_mode_flag():
    text = MANIFEST.read_text()
    assert "command: /ask" in text
    assert re.search(r"socket_mode_enabled: (true|false)", text)


def test_rendered_manifest_has_the_url_and_the_bots_commands():
    from bots.slack.manifest import render_manifest
    from core.framework.bot import load_bot

    text = render_manifest(load_bot("examples.support_bot.bot:bot"), url="https://bot.example.org/")
    assert "sluice.example.com" not in text
    assert "request_url: https://bot.example.org/slack/events" in text
    assert "https://bot.example.org/slack/oauth_redirect" in text
    commands = re.findall(r"- command: (/\S+)", text)
    assert commands[0] == "/ask"
    assert {"/ticket", "/status"} <= set(commands)
    assert "socket_mode_enabled: false" in text


def test_socket_mode_manifest_has_no_request_urls():
    from bots.slack.manifest import render_manifest
    from core.framework.bot import load_bot

    text = render_manifest(load_bot(None), socket_mode=True)
    assert "socket_mode_enabled: true" in text
    assert "request_url" not in text
    assert "url: " not in text
    assert "command: /ask" in text


def test_manifest_enables_interactivity_for_the_feedback_buttons():
    from bots.slack.manifest import render_manifest
    from core.framework.bot import load_bot

    text = MANIFEST.read_text()
    assert re.search(r"interactivity:\n\s+is_enabled: true\n\s+request_url: \S+/slack/events", text)
    # Thread context reads conversations.replies: the *:history scopes cover it.
    for scope in ("channels:history", "groups:history", "im:history", "mpim:history"):
        assert f"- {scope}" in text
    socket = render_manifest(load_bot(None), socket_mode=True)
    assert "is_enabled: true" in socket and "request_url" not in socket

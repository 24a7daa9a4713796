"""The docs that must not drift from the code."""

from __future__ import annotations

import dataclasses

from core.framework.bot import Bot
from core.settings import Settings
from sluice.docgen import env_name, render
from tests.helpers import ROOT


def test_configuration_reference_is_current():
    committed = (ROOT / "docs" / "configuration.md").read_text("utf-8")
    assert committed == render(), (
        "docs/configuration.md is out of date: run `make docs` or "
        "`python -m sluice.docgen > docs/configuration.md` and commit it."
    )


def test_configuration_reference_lists_every_setting_by_its_variable():
    text = render()
    for name, field in Settings.model_fields.items():
        assert f"`{env_name(name, field)}`" in text, name


def test_guide_covers_every_decorator_and_bot_field():
    guide = (ROOT / "docs" / "guide.md").read_text("utf-8")
    for decorator in (
        "@bot.command",
        "@bot.tool",
        "@bot.before",
        "@bot.after",
        "@bot.prompt",
        "@bot.lane",
    ):
        assert decorator in guide, f"docs/guide.md does not show {decorator}"
    for f in dataclasses.fields(Bot):
        if f.init:
            assert f"`{f.name}`" in guide, f"docs/guide.md does not describe Bot field {f.name!r}"


def _python_block_after(doc: str, marker: str) -> str:
    """The first ```python block after ``marker`` in a doc."""
    start = doc.index(marker)
    block = doc.index("```python\n", start) + len("```python\n")
    return doc[block : doc.index("```", block)]


async def test_quickstart_bot_loads_and_answers_as_the_page_says(tmp_path):
    from core.framework.bot import MessageContext, load_bot

    doc = (ROOT / "docs" / "quickstart.md").read_text("utf-8")
    (tmp_path / "quickstart_bot.py").write_text(_python_block_after(doc, "Create `mybot.py`"))
    bot = load_bot("quickstart_bot:bot")
    ctx = MessageContext(platform="web", tenant="web", channel="c", user="u", message_id="m")
    for text in ("/oncall", "oncall"):
        ctx.text = text
        reply = await bot.intercept(ctx)
        assert reply is not None and reply.text == "Ada is on call until Friday."
    schema = bot.tools["service_status"].openai_schema()["function"]
    assert schema["parameters"]["required"] == ["service"]


def test_sluice_commands_lists_the_bot_commands(monkeypatch):
    import json

    from click.testing import CliRunner

    from core.settings import get_settings
    from sluice.cli import main

    monkeypatch.setenv("SLUICE_APP", "examples.support_bot.bot:bot")
    get_settings.cache_clear()
    try:
        text = CliRunner().invoke(main, ["commands"])
        as_json = CliRunner().invoke(main, ["commands", "--json"])
    finally:
        get_settings.cache_clear()
    assert text.exit_code == 0, text.output
    assert "/ticket <summary>\n    Open a support ticket." in text.output
    assert [c["name"] for c in json.loads(as_json.output)] == [
        "ticket",
        "status",
        "model",
        "listen",
        "help",
    ]


def test_readme_settings_table_is_current():
    from sluice.docgen import update_readme

    readme = (ROOT / "README.md").read_text("utf-8")
    assert readme == update_readme(readme), (
        "README.md's settings table is out of date: run `make docs` and commit it."
    )

"""The docs that must not drift from the code."""

from __future__ import annotations

import dataclasses

from core.bot import Bot
from core.settings import Settings
from sluice.docgen import env_name, render
from tests.helpers import ROOT


def test_configuration_reference_is_current():
    committed = (ROOT / "docs" / "configuration.md").read_text("utf-8")
    assert committed == render(), (
        "docs/configuration.md is out of date: run "
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

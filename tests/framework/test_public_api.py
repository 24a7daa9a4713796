"""The public API: what users import is ``sluice``, and it is documented."""

from __future__ import annotations

import inspect
import re

import pytest

import sluice
from tests.helpers import ROOT

USER_FACING = ["README.md", "docs/guide.md", "docs/quickstart.md", "docs/slack.md"]


@pytest.mark.parametrize("name", sluice.__all__)
def test_every_public_name_is_importable_and_documented(name):
    obj = getattr(sluice, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert inspect.getdoc(obj), f"sluice.{name} has no docstring"


def test_public_api_has_no_duplicates_and_is_sorted_for_readers():
    assert len(set(sluice.__all__)) == len(sluice.__all__)
    assert sluice.__all__ == sorted(sluice.__all__, key=lambda n: (not n.isupper(), n))


def test_examples_and_user_docs_import_the_public_api_only():
    offenders = []
    files = [*(ROOT / "examples").rglob("*.py"), *(ROOT / f for f in USER_FACING)]
    for path in files:
        for line in path.read_text("utf-8").splitlines():
            if re.match(r"\s*from (core|workers)(\.\w+)* import ", line):
                offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not offenders, "user-facing code imports internals:\n" + "\n".join(offenders)


def test_the_examples_bots_are_sluice_bots():
    from examples.faq_bot.bot import bot as faq
    from examples.support_bot.bot import bot as support

    assert isinstance(faq, sluice.Bot)
    assert isinstance(support, sluice.Bot)

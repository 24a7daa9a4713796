"""Markdown to Slack mrkdwn, and splitting long replies."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from bots.slack.format import safe_markdown, split_message, to_mrkdwn


def test_inline_markdown_becomes_mrkdwn():
    assert to_mrkdwn("**bold** and *it* and ~~gone~~") == "*bold* and _it_ and ~gone~"
    assert to_mrkdwn("__bold__") == "*bold*"
    assert (
        to_mrkdwn("[the docs](https://example.com/a?b=1&c=2)")
        == "<https://example.com/a?b=1&amp;c=2|the docs>"
    )


def test_headings_lists_quotes_and_rules():
    md = "# Title\n## **Sub**\n- one\n  - nested\n* two\n1. first\n> quoted <b>\n---"
    assert to_mrkdwn(md).split("\n") == [
        "*Title*",
        "*Sub*",
        "• one",
        "    • nested",
        "• two",
        "1. first",
        "> quoted &lt;b&gt;",
        "──────────",
    ]


def test_code_is_kept_verbatim_but_escaped():
    md = "Use `a**b**` here\n```python\nif a < b and c:\n    print('**x**')\n```"
    assert to_mrkdwn(md) == ("Use `a**b**` here\n```\nif a &lt; b and c:\n    print('**x**')\n```")


def test_unclosed_code_fence_is_closed():
    assert to_mrkdwn("```\ncode").endswith("```")


def test_model_output_cannot_ping_anyone():
    out = to_mrkdwn("<!channel> <!here> <!everyone> <@U123> <#C1> [x](<!here>)")
    assert not re.search(r"<[!@#]", out)
    assert "<!" not in safe_markdown("hi <!here> and <@U1>")
    assert "<@" not in safe_markdown("hi <!here> and <@U1>")


def test_javascript_links_are_not_made_clickable():
    assert "<javascript" not in to_mrkdwn("[x](javascript:alert(1))")


def test_short_text_is_one_part():
    assert split_message("hello", 100) == ["hello"]


def test_split_prefers_paragraph_boundaries():
    text = "\n\n".join(["a" * 40, "b" * 40, "c" * 40])
    assert split_message(text, 90) == ["a" * 40 + "\n\n" + "b" * 40, "c" * 40]


def test_split_code_block_is_closed_and_reopened():
    code = "\n".join(f"line {i}" for i in range(60))
    text = f"intro\n\n```\n{code}\n```\n\noutro"
    parts = split_message(text, 120)
    assert len(parts) > 2
    for part in parts:
        assert len(part) <= 120
        assert part.count("```") % 2 == 0
    inner = [ln for p in parts for ln in p.split("\n") if ln.startswith("line ")]
    assert inner == code.split("\n")


def test_split_keeps_code_written_on_the_opening_fence_line():
    # Found by the hostile-input property test: the text after "```" was dropped.
    parts = split_message("```" + "0" * 30, 32)
    assert all(len(p) <= 32 and p.count("```") == 2 for p in parts)
    assert "".join(p.replace("```", "").replace("\n", "") for p in parts) == "0" * 30


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(list("ab `\n*#-<>&")), max_size=2000),
    st.integers(min_value=40, max_value=400),
)
def test_split_parts_never_exceed_the_limit_and_keep_the_words(text, limit):
    parts = split_message(text, limit)
    assert all(len(p) <= limit for p in parts)
    words = [w for w in text.split() if "```" not in w]
    got = [w for w in " ".join(parts).split() if "```" not in w]
    assert "".join(got).replace("`", "") == "".join(words).replace("`", "")


def test_tables_become_code_blocks():
    md = "Prices:\n| item | € |\n|---|---|\n| a<b | 1 |\nafter"
    assert to_mrkdwn(md).split("\n") == [
        "Prices:",
        "```",
        "| item | € |",
        "|---|---|",
        "| a&lt;b | 1 |",
        "```",
        "after",
    ]

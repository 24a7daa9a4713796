"""Fuzz: the Slack and Discord splitters and the Slack format converters.

Properties: no exception; no part over the limit; nothing lost or reordered; every
part renders on its own (code fences balanced); converters never produce a live
mention, and the only ``<`` they leave is one that opens a link.
"""

from __future__ import annotations

import html
import re

from hypothesis import given
from hypothesis import strategies as st

from bots.discord.split import FENCE as DISCORD_FENCE
from bots.discord.split import split_parts as discord_split
from bots.slack.format import ZWSP, safe_markdown, to_mrkdwn
from bots.slack.format import split_message as slack_split
from tests.fuzz.strategies import HOSTILE_TEXT, LIVE_SLACK, LONG_HOSTILE_TEXT, fuzz

# The only raw "<" Slack mrkdwn from to_mrkdwn may hold: a link it made itself.
_LINK = re.compile(r"<(?:https?://|mailto:)[^<>|\s]*\|[^<>]*>")
# An entity escape() wrote: a cut must never fall inside one.
_ENTITY = re.compile(r"&(?:amp|lt|gt);")


def _no_live_markup(mrkdwn: str) -> None:
    assert not LIVE_SLACK.search(mrkdwn), mrkdwn
    assert "<" not in _LINK.sub("", mrkdwn), mrkdwn


@fuzz(400)
@given(text=LONG_HOSTILE_TEXT)
def test_to_mrkdwn_never_leaves_live_markup(text: str) -> None:
    _no_live_markup(to_mrkdwn(text))


@fuzz(400)
@given(text=LONG_HOSTILE_TEXT)
def test_safe_markdown_never_leaves_live_markup_and_hides_nothing(text: str) -> None:
    out = safe_markdown(text)
    assert not LIVE_SLACK.search(out)
    assert out.replace(ZWSP, "") == text.replace(ZWSP, "")


def _expected(mrkdwn: str, limit: int) -> str:
    """``mrkdwn`` with each link longer than a part as "label (url)" (split_message's rule)."""
    return re.sub(
        r"<((?:https?://|mailto:)[^<>\s|]*)\|([^<>\n]*)>",
        lambda m: f"{m[2]} ({m[1]})" if len(m[0]) > limit else m[0],
        mrkdwn,
    )


def _visible_chars(mrkdwn: str) -> str:
    """What a split may not lose or reorder: everything but whitespace and fences."""
    return re.sub(r"\s|`", "", mrkdwn)


@fuzz(300)
# Settings allow 100 characters at least (SLUICE_SLACK_MESSAGE_LIMIT).
@given(text=LONG_HOSTILE_TEXT, limit=st.integers(min_value=100, max_value=4000))
def test_slack_split_of_converted_text_fits_keeps_order_and_stays_inert(
    text: str, limit: int
) -> None:
    mrkdwn = to_mrkdwn(text)
    parts = slack_split(mrkdwn, limit)
    assert parts
    assert all(len(p) <= limit for p in parts)
    assert _visible_chars("".join(parts)) == _visible_chars(_expected(mrkdwn, limit))
    for part in parts:
        _no_live_markup(part)
        # Each part renders alone: a code block cut in two is closed and reopened.
        fences = [line for line in part.split("\n") if line.lstrip().startswith("```")]
        whole = [line for line in mrkdwn.split("\n") if line.lstrip().startswith("```")]
        assert len(fences) % 2 == 0 or len(whole) % 2 == 1, part


@fuzz(300)
@given(text=LONG_HOSTILE_TEXT, limit=st.integers(min_value=32, max_value=600))
def test_slack_split_never_cuts_inside_an_entity(text: str, limit: int) -> None:
    mrkdwn = to_mrkdwn(text)
    parts = slack_split(mrkdwn, limit)
    # Each part decodes to text on its own: no "&l" | "t;" halves.
    expected = _expected(mrkdwn, limit)
    assert sum(len(_ENTITY.findall(p)) for p in parts) == len(_ENTITY.findall(expected))
    assert html.unescape("".join(parts)).count("<") == html.unescape(expected).count("<")


@fuzz(300)
@given(text=LONG_HOSTILE_TEXT, limit=st.integers(min_value=100, max_value=2000))
def test_discord_split_fits_joins_back_exactly_and_balances_fences(text: str, limit: int) -> None:
    parts = discord_split(text, limit)
    assert all(len(p.text) <= limit for p in parts)
    assert "".join(p.original for p in parts) == text
    for p in parts:
        # Added fences only ever close or reopen a block the input opened.
        assert p.reopened in ("",) or p.reopened.startswith(DISCORD_FENCE)
        assert p.closed in ("", DISCORD_FENCE, "\n" + DISCORD_FENCE)


@fuzz(200)
@given(text=HOSTILE_TEXT)
def test_splitters_accept_text_that_fits_unchanged(text: str) -> None:
    if len(text) <= 2000:
        assert "".join(p.text for p in discord_split(text)) == text
    if len(text) <= 3900:
        assert slack_split(text) == [text]


# --- regressions the campaign found ------------------------------------------------


def test_a_run_of_escaped_characters_is_never_cut_inside_an_entity() -> None:
    # Found: "&" * 1500 at limit 32 cut "&amp;" into "&am" | "p;" (shown as text).
    for limit in (32, 33, 34, 100, 3900):
        mrkdwn = to_mrkdwn("&" * 1500 + "<" * 50 + ">" * 50)
        parts = slack_split(mrkdwn, limit)
        assert all(len(p) <= limit for p in parts)
        assert all(_ENTITY.sub("", p).count("&") == 0 for p in parts), parts
        assert html.unescape("".join(parts)) == "&" * 1500 + "<" * 50 + ">" * 50


def test_a_link_is_never_cut_in_two_when_it_fits_in_a_part() -> None:
    # Found: "[docs](https://example.com/a?b=1&c=2)" repeated without spaces was cut
    # through the link, leaving "<https://example.com/a?b=1&am" in one part.
    mrkdwn = to_mrkdwn("[the docs](https://example.com/a?b=1&c=2)" * 40)
    for limit in range(100, 140):
        for part in slack_split(mrkdwn, limit):
            assert len(part) <= limit
            assert "<" not in _LINK.sub("", part), part


def test_a_link_longer_than_a_part_becomes_label_and_url() -> None:
    # Found: a link whose label was 5,000 characters was cut through its markup.
    mrkdwn = to_mrkdwn("see [" + "x" * 500 + "](https://example.com/a?b=1&c=2) now")
    parts = slack_split(mrkdwn, 100)
    assert all(len(p) <= 100 and "<" not in p for p in parts), parts
    joined = _visible_chars("".join(parts))
    assert joined == _visible_chars("see " + "x" * 500 + " (https://example.com/a?b=1&amp;c=2) now")


def test_a_cut_never_leaves_a_fence_at_the_start_of_a_part_line() -> None:
    # Found: a long line "… ```<!date…>" was cut at the space before the backticks;
    # the rest became a line starting with ``` and the part showed as code.
    text = "@everyone" * 4 + "<!date^1392734382^{date}|x> ```<!date^1392734382^{date}|x>"
    mrkdwn = to_mrkdwn(text)
    for limit in range(100, len(mrkdwn)):
        parts = slack_split(mrkdwn, limit)
        assert _visible_chars("".join(parts)) == _visible_chars(mrkdwn)
        for part in parts:
            assert not any(line.lstrip().startswith("```") for line in part.split("\n")), part

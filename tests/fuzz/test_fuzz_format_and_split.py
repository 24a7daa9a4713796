"""Fuzz: the Slack and Discord splitters and Slack's mention escaping.

Properties: no exception; no part over the limit; nothing lost or reordered; every
part renders on its own (code fences balanced); the Markdown sent to Slack never
holds a live mention, also once character references are decoded, and escaping a
stream's pieces (cut where ``stream_cut`` allows) equals escaping the whole.
"""

from __future__ import annotations

import html
import re

from hypothesis import given
from hypothesis import strategies as st

from bots.discord.split import FENCE as DISCORD_FENCE
from bots.discord.split import split_parts as discord_split
from bots.slack.format import ZWSP, reply_parts, safe_markdown, stream_cut
from bots.slack.format import split_message as slack_split
from tests.fuzz.strategies import HOSTILE_TEXT, LIVE_SLACK, LONG_HOSTILE_TEXT, fuzz

# Bracketless broadcasts, live in Markdown too.
_BROADCAST = re.compile(r"@(?:here|channel|everyone)(?!\w)", re.IGNORECASE)


def _no_live_markup(markdown: str) -> None:
    for shown in (markdown, html.unescape(markdown)):
        assert not LIVE_SLACK.search(shown), markdown
        assert not _BROADCAST.search(shown), markdown


@fuzz(400)
@given(text=LONG_HOSTILE_TEXT)
def test_safe_markdown_never_leaves_live_markup_and_hides_nothing(text: str) -> None:
    out = safe_markdown(text)
    _no_live_markup(out)
    assert out.replace(ZWSP, "") == text.replace(ZWSP, "")


@fuzz(400)
@given(text=LONG_HOSTILE_TEXT, cuts=st.lists(st.integers(min_value=0, max_value=5000)))
def test_streamed_pieces_escape_like_the_whole_text(text: str, cuts: list[int]) -> None:
    """The responder sends ``text[:stream_cut(so_far)]`` as the stream grows."""
    sent = ""
    for cut in sorted(c for c in cuts if c <= len(text)):
        now = text[: stream_cut(text[:cut])]
        if len(now) > len(sent):
            sent_escaped = safe_markdown(sent) + safe_markdown(now[len(sent) :])
            assert sent_escaped == safe_markdown(now)
            sent = now
    assert safe_markdown(sent) + safe_markdown(text[len(sent) :]) == safe_markdown(text)


# A fence line with a language ("```python"): a split repeats the language on every
# part it reopens the block in, so it is not counted as text.
_FENCE_LANGUAGE = re.compile(r"^(\s*```)[A-Za-z][\w+#.-]{0,19}[ \t]*$", re.MULTILINE)


def _visible_chars(markdown: str) -> str:
    """What a split may not lose or reorder: everything but whitespace, fences (with
    their language) and the ZWSPs of the escaping."""
    return re.sub(r"\s|`|\u200b", "", _FENCE_LANGUAGE.sub(r"\1", markdown))


def _unlinked(text: str, limit: int) -> str:
    """``text`` with each link longer than a part as "label (url)" (split_message's rule)."""
    return re.sub(
        r"!?\[([^\]\n]*)\]\(([^)\s]*)\)",
        lambda m: f"{m[1]} ({m[2]})" if len(m[0]) > limit else m[0],
        text,
    )


@fuzz(300)
# Settings allow 100 characters at least (SLUICE_SLACK_MESSAGE_LIMIT).
@given(text=LONG_HOSTILE_TEXT, limit=st.integers(min_value=100, max_value=4000))
def test_slack_reply_parts_fit_keep_order_and_stay_inert(text: str, limit: int) -> None:
    parts = reply_parts(text, limit)
    assert parts
    assert all(len(p) <= limit for p in parts)
    joined = _visible_chars("\n".join(parts))  # each part is a message of its own
    assert joined == _visible_chars(_unlinked(text, limit)) or joined == _visible_chars(text)
    whole = [line for line in text.split("\n") if line.lstrip().startswith("```")]
    for part in parts:
        _no_live_markup(part)
        # Each part renders alone: a code block cut in two is closed and reopened.
        fences = [line for line in part.split("\n") if line.lstrip().startswith("```")]
        assert len(fences) % 2 == 0 or len(whole) % 2 == 1, part


@fuzz(300)
@given(text=LONG_HOSTILE_TEXT, limit=st.integers(min_value=32, max_value=600))
def test_slack_split_never_cuts_inside_a_character_reference(text: str, limit: int) -> None:
    escaped = safe_markdown(text)
    parts = slack_split(escaped, limit)
    refs = re.compile(r"&[#\w]{1,32};")
    expected = _unlinked(escaped, limit)
    if len(expected) == len(escaped):
        assert sum(len(refs.findall(p)) for p in parts) == len(refs.findall(expected))


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
    # Found: "&amp;" * 300 at limit 32 was cut into "&am" | "p;" (shown as text).
    for limit in (32, 33, 34, 100, 3900):
        parts = slack_split("&amp;" * 300 + "&lt;" * 50, limit)
        assert all(len(p) <= limit for p in parts)
        assert html.unescape("".join(parts)) == "&" * 300 + "<" * 50


def test_a_link_longer_than_a_part_becomes_label_and_url() -> None:
    # Found: a link whose label was 5,000 characters was cut through its markup.
    parts = slack_split("see [" + "x" * 500 + "](https://example.com/a?b=1&c=2) now", 100)
    assert all(len(p) <= 100 for p in parts), parts
    joined = _visible_chars("\n".join(parts))  # each part is a message of its own
    assert joined == _visible_chars("see " + "x" * 500 + " (https://example.com/a?b=1&c=2) now")


def test_a_cut_never_leaves_a_fence_at_the_start_of_a_part_line() -> None:
    # Found: a long line "… ```<!date…>" was cut at the space before the backticks;
    # the rest became a line starting with ``` and the part showed as code.
    text = safe_markdown(
        "@everyone" * 4 + "<!date^1392734382^{date}|x> ```<!date^1392734382^{date}|x>"
    )
    for limit in range(100, len(text)):
        parts = slack_split(text, limit)
        assert _visible_chars("".join(parts)) == _visible_chars(text)
        for part in parts:
            assert not any(line.lstrip().startswith("```") for line in part.split("\n")), part

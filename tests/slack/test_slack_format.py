"""Model Markdown made mention-safe for Slack's ``markdown_text``, and long replies split."""

from __future__ import annotations

import html
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from bots.slack.format import ZWSP, reply_parts, safe_markdown, split_message, stream_cut

LIVE = re.compile(r"<[!@#]|@(?:here|channel|everyone)(?!\w)", re.IGNORECASE)


def test_markdown_is_sent_as_written():
    md = "# Title\n**bold** and *it* ~~gone~~ [docs](https://example.com/a?b=1&c=2)\n| a | b |"
    assert safe_markdown(md) == md


def test_model_output_cannot_ping_anyone():
    text = "<!channel> <!here> <!everyone> <@U123> <#C1> [x](<!here>) @here @Channel @everyone"
    out = safe_markdown(text)
    assert not LIVE.search(out), out
    assert out.replace(ZWSP, "") == text


def test_mentions_written_with_character_references_stay_inert():
    for text in ("&lt;!here&gt;", "&#60;@U1&#62;", "&#x3C;!channel>", "&lt&#33;here", "@&#104;ere"):
        out = safe_markdown(text)
        assert not LIVE.search(html.unescape(out)), (text, out)


def test_code_and_addresses_keep_their_characters():
    code = "```python\n@dataclass\nclass A:\n    ok = a < b and c<d  # mail me@company.com\n```"
    assert safe_markdown(code) == code
    assert safe_markdown("@heres @channels @everyoneelse") == "@heres @channels @everyoneelse"


def test_stream_cut_holds_back_only_what_may_become_a_mention():
    assert stream_cut("a < b") == 5
    assert stream_cut("if a <") == 5
    assert stream_cut("tell <@") == 5
    assert stream_cut("ping @ever") == 5
    assert stream_cut("ping @here") == 5  # "@heres" would not be one: wait for the next char
    assert stream_cut("ping @hx") == 8
    assert stream_cut("x &#6") == 2


def test_short_text_is_one_part():
    assert split_message("hello", 100) == ["hello"]


def test_split_prefers_paragraph_boundaries():
    text = "\n\n".join(["a" * 40, "b" * 40, "c" * 40])
    assert split_message(text, 90) == ["a" * 40 + "\n\n" + "b" * 40, "c" * 40]


def test_split_code_block_is_closed_and_reopened_with_its_language():
    code = "\n".join(f"line {i}" for i in range(60))
    text = f"intro\n\n```python\n{code}\n```\n\noutro"
    parts = split_message(text, 120)
    assert len(parts) > 2
    for part in parts:
        assert len(part) <= 120
        assert part.count("```") % 2 == 0
        if "line " in part:
            assert part.startswith("```python\n")
    inner = [ln for p in parts for ln in p.split("\n") if ln.startswith("line ")]
    assert inner == code.split("\n")


def test_split_keeps_code_written_on_the_opening_fence_line():
    parts = split_message("```" + "0" * 30, 32)
    assert all(len(p) <= 32 and p.count("```") == 2 for p in parts)
    assert "".join(p.replace("```", "").replace("\n", "") for p in parts) == "0" * 30


def test_a_markdown_link_is_never_cut_in_two_when_it_fits_in_a_part():
    text = "[the docs](https://example.com/a?b=1&c=2)" * 40
    for limit in range(100, 140):
        for part in split_message(text, limit):
            assert len(part) <= limit
            assert part.count("[") == part.count("](") == part.count(")"), part


def test_a_cut_never_separates_an_escaped_mention():
    text = ("x" * 7 + " <!here>") * 50
    for limit in range(40, 60):
        for part in reply_parts(text, limit):
            assert len(part) <= limit
            assert not LIVE.search(part), part
            assert not part.endswith("<"), part


def test_a_cut_right_after_a_broadcast_word_leaves_no_live_mention_at_a_parts_end():
    """ "@HERE0" is no mention; cut after "@HERE" it would be one (found by hypothesis)."""
    text = "00000<#000000000000000000<#000000000000000000000000000000@HERE0"
    parts = reply_parts(text, 64)
    assert len(parts) == 2 and all(len(p) <= 64 for p in parts)
    assert not any(LIVE.search(p) for p in parts), parts
    assert "".join(parts).replace(ZWSP, "") == text


def test_reply_parts_fit_the_markdown_text_limit_with_the_escaping():
    text = "<!here> " * 3000  # 24,000 characters, more once escaped
    parts = reply_parts(text)
    assert len(parts) == 3
    assert all(len(p) <= 12000 for p in parts)
    assert " ".join(parts).replace(ZWSP, "").split() == text.split()


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(list("ab `\n*#-<>&!@[]()")), max_size=2000),
    st.integers(min_value=40, max_value=400),
)
def test_split_parts_never_exceed_the_limit_and_keep_the_words(text, limit):
    parts = reply_parts(text, limit)
    assert all(len(p) <= limit for p in parts)
    assert not any(LIVE.search(p) for p in parts)
    words = [w for w in text.split() if "```" not in w]
    got = [w for w in " ".join(parts).replace(ZWSP, "").split() if "```" not in w]
    assert "".join(got).replace("`", "") == "".join(words).replace("`", "")


def test_a_code_block_closed_by_a_long_fence_line_is_split_within_the_limit():
    """The line that closes a block kept whole as the last part's closer left no room
    for text when it was long: the split never ended (found by hypothesis)."""
    for closer in ("```" + "x" * 1500, "```python and then some words"):
        text = "```\n" + "print(1)\n" * 40 + closer
        for limit in (40, 100, 300):
            parts = reply_parts(text, limit)
            assert parts and all(len(p) <= limit for p in parts)
            kept = "".join(parts).replace("`", "").split()
            assert "".join(kept) == "".join(text.replace("`", "").split())

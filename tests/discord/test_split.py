"""Splitting long replies into Discord messages (pure function, property-tested)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bots.discord.split import DISCORD_MAX_CHARS, FENCE, split_message, split_parts


def _fences_balanced(part: str) -> bool:
    """Every code block opened in a part is closed in the same part."""
    open_ = False
    for line in part.splitlines():
        stripped = line.strip()
        if not stripped.startswith(FENCE):
            continue
        if open_:
            open_ = False
        elif FENCE not in stripped[3:]:
            open_ = True
    return not open_


_line = st.text(
    alphabet=st.characters(
        codec="utf-8",
        exclude_categories=("Cs",),
        # str.splitlines() line breaks other than "\n" are not lines to Discord either.
        exclude_characters="\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029",
    ),
    max_size=300,
)
_code = st.builds(
    lambda lang, lines: f"{FENCE}{lang}\n" + "".join(f"{ln}\n" for ln in lines) + f"{FENCE}\n",
    st.sampled_from(["", "python", "js", "rust"]),
    st.lists(st.text(alphabet="abc xyz=();{}", max_size=120), max_size=60),
)
_block = st.one_of(_code, st.lists(_line, min_size=1, max_size=8).map("\n".join))
_text = st.lists(_block, max_size=25).map(lambda bs: "\n\n".join(bs))


@settings(max_examples=300, deadline=None)
@given(text=_text, limit=st.sampled_from([100, 250, 2000]))
def test_split_parts_fit_and_join_back_to_the_text(text: str, limit: int) -> None:
    parts = split_parts(text, limit)
    assert all(len(p.text) <= limit for p in parts)
    assert "".join(p.original for p in parts) == text
    assert all(p.text for p in parts)


@settings(max_examples=300, deadline=None)
@given(text=_text)
def test_split_keeps_every_part_with_balanced_code_fences(text: str) -> None:
    # Only inputs whose own fences are balanced can be expected to give balanced parts.
    if not _fences_balanced(text):
        return
    for part in split_message(text, 250):
        assert _fences_balanced(part), part


def test_short_text_is_one_part_and_empty_text_none() -> None:
    assert split_message("hello") == ["hello"]
    assert split_message("") == []
    assert split_message("x" * DISCORD_MAX_CHARS) == ["x" * DISCORD_MAX_CHARS]


def test_split_prefers_paragraph_boundaries() -> None:
    a, b = "a" * 1200, "b" * 1200
    assert split_message(f"{a}\n\n{b}") == [f"{a}\n\n", b]


def test_split_reopens_a_cut_code_block_with_its_language() -> None:
    code = "```python\n" + "".join(f"value_{i} = {i}\n" for i in range(400)) + "```\n"
    parts = split_message("Here you go:\n\n" + code + "\nDone.")
    assert len(parts) > 1
    assert parts[0].startswith("Here you go:")
    for part in parts:
        assert len(part) <= DISCORD_MAX_CHARS
        assert _fences_balanced(part)
    assert all(p.startswith("```python\n") for p in parts[1:])
    assert parts[-1].endswith("Done.")


def test_a_line_longer_than_a_message_is_cut_hard() -> None:
    parts = split_message("y" * 4500)
    assert [len(p) for p in parts] == [2000, 2000, 500]

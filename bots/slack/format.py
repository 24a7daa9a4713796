"""The model's Markdown, made safe for Slack's ``markdown_text`` and split within its limit.

Replies go to Slack as Markdown (``markdown_text`` of ``chat.postMessage``,
``chat.update`` and the native stream): Slack renders it itself, so nothing is
converted by hand. What Sluice still does:

- **Mentions stay inert.** :func:`safe_markdown` puts a zero-width space (``ZWSP``)
  inside every ``<!channel>``, ``<!here>``, ``<!everyone>``, ``<!subteam^…>``,
  ``<@U…>``, ``<#C…>``, ``<!date…>`` (also written with ``&lt;`` or a numeric
  character reference for ``<``) and every ``@here``, ``@channel``, ``@everyone``,
  so the model cannot ping anyone. Only those spots change: code keeps its ``<`` and
  ``@`` (``a < b``, ``@decorator``) and can be copied as written.
- **Streaming cannot join a mention across two deltas.** Whether a ``<`` needs the
  space depends on the next character, which the next delta brings. A streamed delta
  is therefore sent only up to :func:`stream_cut`: a tail that could still become a
  mention (``<``, ``&lt``, ``@ever``) waits for the next delta (or the end). For a
  cut there, escaping the pieces equals escaping the whole:
  ``safe_markdown(a[:k]) + safe_markdown(a[k:] + b) == safe_markdown(a + b)`` with
  ``k = stream_cut(a)``.
- **Long replies are split** (:func:`split_message`) at Slack's limit (12,000
  characters for ``markdown_text``): at paragraphs, then lines, then spaces; a code
  block cut in two is closed and reopened with its language; a cut never falls
  inside a Markdown link, a character reference or an escaped mention.
"""

from __future__ import annotations

import html
import re

FENCE = "```"
# Slack's limit for markdown_text (chat.postMessage, chat.update, the stream).
DEFAULT_LIMIT = 12000
ZWSP = "\u200b"

# "<" as the model may write it: the character, &lt; (any case), or a numeric
# character reference (CommonMark allows 1-7 decimal or 1-6 hex digits); the ";" is
# optional, as HTML parsers read "&lt" and "&#60" too.
_LT = r"(?:<|&lt;?|&#0{0,5}60;?|&#x0{0,4}3c;?)"
# "@" likewise.
_AT = r"(?:@|&commat;?|&#0{0,5}64;?|&#x0{0,4}40;?)"
# What makes "<" live: "!", "@" or "#" right after it, or "&" (a reference to one).
_LIVE_LT = re.compile(rf"({_LT})(?=[!@#&])", re.IGNORECASE)
# An "@" that may start a broadcast: followed by h, c, e or a character reference.
_AT_CANDIDATE = re.compile(rf"({_AT})(?=[hce&])", re.IGNORECASE)
_BROADCAST_WORD = re.compile(r"(?:here|channel|everyone)(?!\w)", re.IGNORECASE)
_WORDS = ("here", "channel", "everyone")
# Enough characters after an "@" to hold a broadcast word and the character after
# it, each letter written as a character reference if need be.
_LOOKAHEAD = 120
_LONGEST_WORD_PLUS_ONE = len("everyone") + 1
# No tail _PENDING_LT or _PENDING_AT holds is longer than this
# ("@" as "&#x00040;" and _LOOKAHEAD more).
_PENDING_MAX = _LOOKAHEAD + 16
# A tail that the next characters could still turn into something safe_markdown
# changes: a "<", a (maybe unfinished) reference, or an "@" and what follows it.
_PENDING_LT = re.compile(r"(?:<|&[#\w]{0,32};?)\Z")
_PENDING_AT = re.compile(rf"{_AT}([\w&#;]{{0,{_LOOKAHEAD}}})\Z", re.IGNORECASE)
_UNFINISHED_REF = re.compile(r"&[#\w]*\Z")


def _broadcast_at(m: re.Match[str]) -> str:
    after = m.string[m.end() : m.end() + _LOOKAHEAD]
    if "&" in after[:_LONGEST_WORD_PLUS_ONE]:  # a letter may be a character reference
        after = html.unescape(after)
    return m.group(1) + ZWSP if _BROADCAST_WORD.match(after) else m.group(1)


def safe_markdown(text: str) -> str:
    """``text`` with a zero-width space inside every mention Slack would make live.

    ``<`` (or ``&lt;``, ``&#60;``, ``&#x3c;``) followed by ``!``, ``@``, ``#`` or ``&``
    gets a ``ZWSP`` after it, and so does the ``@`` of ``@here``, ``@channel`` and
    ``@everyone`` (also when written with character references). Nothing else
    changes: removing the ``ZWSP`` s gives ``text`` back.
    """
    text = _LIVE_LT.sub(lambda m: m.group(1) + ZWSP, text)
    return _AT_CANDIDATE.sub(_broadcast_at, text)


def _may_become_broadcast(after_at: str) -> bool:
    """What follows an "@" so far could still become here, channel or everyone (and
    the character that ends the word)."""
    shown = html.unescape(_UNFINISHED_REF.sub("", after_at)).lower()
    return any(w.startswith(shown) for w in _WORDS)


def stream_cut(text: str) -> int:
    """How much of ``text`` can be escaped and sent now, with more text to follow.

    The end of ``text`` is held back when the characters that follow could make it
    (part of) a mention: a ``<`` (or a reference that may be one), or an ``@``
    followed by a beginning of ``here``, ``channel`` or ``everyone``; and so is a
    ``<`` right before what is held (whether it is live depends on it).
    """
    end = len(text)
    while True:
        start = max(0, end - _PENDING_MAX)
        # A "<" (or a reference that may be one) first: an "@" before it must not hide
        # it ("@&lt;" then "!" makes "<!" live whatever the "@" becomes).
        m = _PENDING_LT.search(text, start, end)
        if m is None:
            m = _PENDING_AT.search(text, start, end)
            if m is None or not _may_become_broadcast(m.group(1)):
                return end
        end = m.start()


# --- splitting -------------------------------------------------------------------


def _units(text: str) -> list[str]:
    """Paragraphs, with each fenced code block kept as one unit."""
    units: list[str] = []
    current: list[str] = []
    in_code = False
    for line in text.split("\n"):
        is_fence = line.lstrip().startswith(FENCE)
        if is_fence and not in_code and current:
            units.append("\n".join(current))
            current = []
        if not in_code and not is_fence and not line.strip():
            if current:
                units.append("\n".join(current))
                current = []
            continue
        current.append(line)
        if is_fence and not (
            line.strip() != FENCE and line.strip().endswith(FENCE) and len(line.strip()) > 6
        ):
            in_code = not in_code
            if not in_code:
                units.append("\n".join(current))
                current = []
    if current:
        if in_code:
            current.append(FENCE)
        units.append("\n".join(current))
    return units


# A Markdown link or image: [label](url).
_LINK = re.compile(r"!?\[([^\]\n]*)\]\(([^)\s]*)\)")
# What a cut must not fall inside: a character reference (its halves would show as
# text), an escaped mention (a cut between "<" and its ZWSP would be harmless, but
# keeps "<" with what follows) or a link.
_ATOM = re.compile(rf"&[#\w]{{1,32}};|{_LT}{ZWSP}|{_AT}{ZWSP}|" + _LINK.pattern, re.IGNORECASE)


def _outside_atoms(line: str, cut: int) -> int:
    """``cut`` moved back to the start of the atom it would fall inside
    (unless that is the start of the line: then there is nothing before to cut)."""
    for m in _ATOM.finditer(line):
        if m.start() >= cut:
            break
        if m.start() < cut < m.end():
            return m.start() if m.start() > 0 else cut
    return cut


def _cut_point(line: str, limit: int) -> int:
    """Where to cut a line longer than ``limit``: the last space in its second half,
    else at the limit; never inside an atom, and never just before a ``````` (the
    rest becomes a line of its own, which would open a code block)."""
    space = line.rfind(" ", limit // 2, limit)
    cut = _outside_atoms(line, limit if space <= 0 else space)
    alt = cut
    while line[alt:].lstrip(" ").startswith(FENCE) and alt > limit // 2:
        alt -= 1
    if alt != cut and not line[alt:].lstrip(" ").startswith(FENCE):
        cut = _outside_atoms(line, alt)
    return cut


def _unlink_long(line: str, limit: int) -> str:
    """A link longer than a whole part as ``label (url)``: it cannot stay one piece."""
    return _LINK.sub(
        lambda m: f"{m.group(1)} ({m.group(2)})" if len(m.group(0)) > limit else m.group(0),
        line,
    )


def _hard_split(line: str, limit: int) -> list[str]:
    pieces: list[str] = []
    if len(line) > limit:
        line = _unlink_long(line, limit)
    while len(line) > limit:
        # Always at least one character: a cut at 0 would never end.
        cut = max(1, _cut_point(line, limit))
        pieces.append(line[:cut])
        line = line[cut:].lstrip(" ") if cut < limit else line[cut:]
    pieces.append(line)
    return pieces


def _pack(items: list[str], sep: str, limit: int) -> list[str]:
    parts: list[str] = []
    current = ""
    for item in items:
        candidate = item if not current else current + sep + item
        if len(candidate) <= limit:
            current = candidate
            continue
        if current:
            parts.append(current)
        current = item
    if current:
        parts.append(current)
    return parts


# A code block's language ("python", "c++", "objective-c"): repeated when it is reopened.
_LANGUAGE = re.compile(r"[A-Za-z][\w+#.-]{0,19}")


# The fewest characters of a cut code block's text per part before its language is
# dropped to make room.
_MIN_CODE_BUDGET = 16


def _split_unit(unit: str, limit: int) -> list[str]:
    lines = unit.split("\n")
    is_code = lines[0].lstrip().startswith(FENCE) and len(lines) > 1
    if not is_code:
        pieces = [p for line in lines for p in _hard_split(line, limit)]
        return _pack(pieces, "\n", limit)
    # The line that closed the block (:func:`_units`), kept as written ("```" or, say,
    # "```python") at the end of the last part; the other parts close with "```".
    closer = lines[-1].strip() if lines[-1].lstrip().startswith(FENCE) else FENCE
    body = lines[1:-1] if lines[-1].lstrip().startswith(FENCE) else lines[1:]
    info = lines[0].strip()[len(FENCE) :]
    # "```python" is reopened as "```python" (Slack highlights it); an info string
    # too long to repeat in every part becomes the block's first line.
    opener = FENCE
    if _LANGUAGE.fullmatch(info.strip()):
        opener = FENCE + info.strip()
    elif info:
        body = [info, *body]
    if closer != FENCE and not _LANGUAGE.fullmatch(closer[len(FENCE) :].strip()):
        # More than a language after the closing fence: too long to keep as the last
        # part's closer (it could leave no room for text). Its text ends the block.
        body = [*body, closer[len(FENCE) :]]
        closer = FENCE
    budget = limit - len(opener) - max(len(FENCE), len(closer)) - 2
    if budget < _MIN_CODE_BUDGET:
        # A short limit and a long language: the language goes, the text must fit.
        if opener != FENCE:
            body = [opener[len(FENCE) :], *body]
        if closer != FENCE:
            body = [*body, closer[len(FENCE) :]]
        opener = closer = FENCE
        budget = limit - 2 * len(FENCE) - 2
    pieces = [p for line in body for p in _hard_split(line, budget)]
    chunks = _pack(pieces, "\n", budget)
    return [
        f"{opener}\n{chunk}\n{closer if i == len(chunks) - 1 else FENCE}"
        for i, chunk in enumerate(chunks)
    ]


def split_message(text: str, limit: int = DEFAULT_LIMIT) -> list[str]:
    """Split ``text`` (Markdown) into parts of at most ``limit`` characters.

    Cuts at paragraph boundaries first, then at line ends, then at spaces; a code
    block that must be cut is closed at the end of one part and reopened (with its
    language) at the start of the next, so every part renders on its own. A cut never
    falls inside a character reference (``&amp;``), an escaped mention or a
    ``[label](url)`` link; a link longer than a whole part becomes ``label (url)``.
    """
    if limit < 32:
        raise ValueError("limit must be at least 32 characters")
    if len(text) <= limit:
        return [text]
    pieces: list[str] = []
    for unit in _units(text):
        pieces.extend([unit] if len(unit) <= limit else _split_unit(unit, limit))
    return _pack(pieces, "\n\n", limit) or [""]


def reply_parts(text: str, limit: int = DEFAULT_LIMIT) -> list[str]:
    """The model's ``text`` as the ``markdown_text`` of Slack messages: mention-safe
    (:func:`safe_markdown`), then split (:func:`split_message`) within ``limit``.

    Each part is made mention-safe again on its own: a cut right after the "@here" of
    "@here0" (no mention in the whole text) would leave a live one at the end of a
    part. That adds at most one character, so the split keeps one free.
    """
    if limit < 33:
        raise ValueError("limit must be at least 33 characters")
    return [safe_markdown(part) for part in split_message(safe_markdown(text), limit - 1)]

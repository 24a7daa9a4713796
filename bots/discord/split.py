"""Split a reply into Discord messages of at most 2000 characters.

Breaks fall between paragraphs where possible, then between lines; a single line is
cut only when it is longer than a message. Fenced code blocks stay readable: when a
block has to be cut, the part ends with a closing fence and the next part reopens
it with the same language tag, so every part renders as valid Markdown.

The functions are pure: removing the added fences (:class:`Part` records them) and
joining the parts gives back the input exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

DISCORD_MAX_CHARS = 2000
FENCE = "```"
# A fence's opening line longer than this is treated as text (no one tags code with
# a 40-character language name, and the reopening fence must fit in every part).
_MAX_FENCE_LINE = 32
_MIN_LIMIT = 100


@dataclass(frozen=True)
class Part:
    """One message of a split reply, with the fences the split added to it."""

    text: str
    reopened: str = ""  # fence added at the start (```lang + newline)
    closed: str = ""  # fence added at the end (``` or newline + ```)

    @property
    def original(self) -> str:
        """The slice of the input this part carries, without the added fences."""
        return self.text[len(self.reopened) : len(self.text) - len(self.closed)]


@dataclass(frozen=True)
class _Segment:
    text: str
    fence: str | None = None  # the opening fence line (with newline) of a code block


def _fence_open(line: str) -> str | None:
    """The opening fence line if ``line`` opens a code block (outside a block)."""
    stripped = line.strip()
    if not stripped.startswith(FENCE) or len(line) > _MAX_FENCE_LINE:
        return None
    if FENCE in stripped[3:]:
        return None  # ```inline``` on one line opens nothing
    return line if line.endswith("\n") else line + "\n"


def _segments(text: str) -> list[_Segment]:
    """Paragraphs (with their trailing blank lines) and whole code blocks, in order."""
    segments: list[_Segment] = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        fence = _fence_open(lines[i])
        start = i
        if fence is not None:
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith(FENCE):
                i += 1
            i = min(i + 1, len(lines))  # include the closing fence line
        else:
            while i < len(lines) and lines[i].strip() and _fence_open(lines[i]) is None:
                i += 1
            if i == start:
                i += 1  # a blank line on its own (leading blank lines)
        while i < len(lines) and not lines[i].strip():
            i += 1  # blank lines stay with the segment before them
        segments.append(_Segment("".join(lines[start:i]), fence))
    return segments


def _cut_line(line: str, budget: int) -> list[str]:
    """Cut one over-long line, preferring the last space in the second half."""
    pieces: list[str] = []
    while len(line) > budget:
        cut = line.rfind(" ", budget // 2, budget)
        cut = budget if cut <= 0 else cut + 1
        pieces.append(line[:cut])
        line = line[cut:]
    if line:
        pieces.append(line)
    return pieces


def _pack_lines(lines: list[str], budget: int) -> list[str]:
    """Greedy packing of lines into chunks of at most ``budget`` characters."""
    chunks: list[str] = []
    current = ""
    for line in lines:
        if len(line) > budget and budget - len(current) >= budget // 4:
            # An over-long line first fills what is left of the current chunk.
            head = _cut_line(line, budget - len(current))[0]
            current += head
            line = line[len(head) :]
        for piece in _cut_line(line, budget) if len(line) > budget else [line]:
            if current and len(current) + len(piece) > budget:
                chunks.append(current)
                current = ""
            current += piece
    if current:
        chunks.append(current)
    return chunks


def _closing(chunk: str) -> str:
    return FENCE if chunk.endswith("\n") else "\n" + FENCE


def _split_code(seg: _Segment, limit: int) -> list[Part]:
    """Cut one code block that is longer than a message into fenced parts."""
    assert seg.fence is not None
    reopen = FENCE + seg.fence.strip()[3:].strip() + "\n"
    body = seg.text[len(seg.fence) :] if seg.text.startswith(seg.fence) else seg.text
    first = seg.text[: len(seg.text) - len(body)]
    # Room for the (re)opening fence, a newline and the closing fence in every part.
    budget = limit - max(len(first), len(reopen)) - len(FENCE) - 1
    chunks = _pack_lines(body.splitlines(keepends=True), budget)
    parts: list[Part] = []
    for n, chunk in enumerate(chunks):
        head = first if n == 0 else reopen
        tail = "" if n == len(chunks) - 1 else _closing(chunk)
        parts.append(Part(head + chunk + tail, "" if n == 0 else reopen, tail))
    return parts or [Part(first)]


def split_message(text: str, limit: int = DISCORD_MAX_CHARS) -> list[str]:
    """Split ``text`` into Discord messages; see :func:`split_parts`."""
    return [p.text for p in split_parts(text, limit)]


def split_parts(text: str, limit: int = DISCORD_MAX_CHARS) -> list[Part]:
    """Split ``text`` into parts of at most ``limit`` characters each.

    Parts break at paragraph boundaries, else at line boundaries, else inside a
    line that is itself longer than ``limit``. A code block that has to be cut is
    closed at the end of a part and reopened (same language tag) at the start of
    the next. Text that fits is returned as one part; empty text gives ``[]``.
    """
    if limit < _MIN_LIMIT:
        raise ValueError(f"limit must be at least {_MIN_LIMIT} characters")
    if len(text) <= limit:
        return [Part(text)] if text else []
    parts: list[Part] = []
    current = Part("")
    for seg in _segments(text):
        if not current.closed and len(current.text) + len(seg.text) <= limit:
            current = Part(current.text + seg.text, current.reopened)
            continue
        if seg.fence is None and len(seg.text) > limit and not current.reopened:
            # A long paragraph: fill up the current part line by line, then go on.
            lines = seg.text.splitlines(keepends=True)
            *plain, last = _pack_lines([current.text, *lines] if current.text else lines, limit)
            parts.extend(Part(t) for t in plain)
            current = Part(last)
            continue
        if current.text:
            parts.append(current)
        if len(seg.text) <= limit:
            current = Part(seg.text)
        elif seg.fence is not None:
            *done, current = _split_code(seg, limit)
            parts.extend(done)
        else:
            *plain, last = _pack_lines(seg.text.splitlines(keepends=True), limit)
            parts.extend(Part(t) for t in plain)
            current = Part(last)
    if current.text:
        parts.append(current)
    return parts

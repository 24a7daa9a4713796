"""Model Markdown to Slack ``mrkdwn``, and long replies split within Slack's limits.

The model writes CommonMark-ish Markdown; Slack renders its own ``mrkdwn``
(``*bold*``, ``_italic_``, ``~strike~``, ``<url|text>``). ``&``, ``<`` and ``>`` are
escaped everywhere, so nothing the model writes can become a live ``<!channel>``,
``<!here>``, ``<!everyone>``, user ping or link it did not write as a Markdown link.
"""

from __future__ import annotations

import re

FENCE = "```"
# Slack cuts text at 40,000 characters but shows long messages poorly; 3,900 leaves
# room under the 4,000 characters that chat.update and blocks accept.
DEFAULT_LIMIT = 3900

_LINK = re.compile(r"!?\[([^\]\n]+)\]\(((?:https?://|mailto:)[^)\s]+)\)")
_BOLD = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_ITALIC_STAR = re.compile(r"(?<![*\w])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![*\w])")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^(\s*)[-*+]\s+")
_RULE = re.compile(r"^\s{0,3}([-*_])(\s*\1){2,}\s*$")
_INLINE_CODE = re.compile(r"`[^`\n]+`")
# Inserted after every "<" of streamed Markdown (see safe_markdown).
ZWSP = "\u200b"


def escape(text: str) -> str:
    """Escape the three characters Slack treats as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def safe_markdown(text: str) -> str:
    """Markdown for Slack's ``markdown_text`` (native streaming) with no live mentions.

    A zero-width space goes after *every* ``<``, so ``<!here>``, ``<!channel>``,
    ``<@U123>``, ``<#C1>`` and ``<!subteam^S1>`` stay text. It must be every ``<``,
    not only one followed by ``!``, ``@`` or ``#``: the answer is streamed in
    deltas, and a delta that ends with ``<`` cannot see the ``!channel>`` that the
    next one starts with. Escaping each character alone makes the result
    independent of where the text is cut: ``safe_markdown(a) + safe_markdown(b) ==
    safe_markdown(a + b)`` for any ``a`` and ``b``.
    """
    return text.replace("<", "<" + ZWSP)


def _inline(line: str) -> str:
    """Convert the inline Markdown of one line (outside code) to mrkdwn."""
    codes: list[str] = []

    def keep_code(m: re.Match[str]) -> str:
        codes.append(escape(m.group(0)))
        return f"\x00{len(codes) - 1}\x00"

    line = _INLINE_CODE.sub(keep_code, line)
    links: list[str] = []

    def keep_link(m: re.Match[str]) -> str:
        label = escape(m.group(1)).replace("|", "¦")
        url = escape(m.group(2)).replace("|", "%7C")
        links.append(f"<{url}|{label}>")
        return f"\x02{len(links) - 1}\x02"

    line = _LINK.sub(keep_link, line)
    line = escape(line)
    line = _BOLD.sub(lambda m: f"\x01{m.group(2)}\x01", line)
    line = _ITALIC_STAR.sub(r"_\1_", line)
    line = _STRIKE.sub(r"~\1~", line)
    line = line.replace("\x01", "*")
    line = re.sub("\x02(\\d+)\x02", lambda m: links[int(m.group(1))], line)
    return re.sub("\x00(\\d+)\x00", lambda m: codes[int(m.group(1))], line)


def _line(line: str) -> str:
    heading = _HEADING.match(line)
    if heading:
        inner = heading.group(1).replace("**", "").replace("__", "")
        return f"*{_inline(inner)}*" if inner else ""
    if _RULE.match(line):
        return "──────────"
    quote = ""
    stripped = line.lstrip()
    if stripped.startswith(">"):
        # Slack's quote marker must stay a literal ">" at the start of the line.
        quote, line = "> ", stripped.lstrip(">").lstrip()
    bullet = _BULLET.match(line)
    if bullet:
        depth = len(bullet.group(1).expandtabs(4)) // 2
        line = "    " * depth + "• " + line[bullet.end() :]
    return quote + _inline(line)


def _is_table_row(line: str) -> bool:
    stripped = line.strip()
    return stripped.startswith("|") and stripped.count("|") >= 2


def to_mrkdwn(markdown: str) -> str:
    """Convert Markdown to Slack mrkdwn.

    Fenced code blocks are kept (the language is dropped); Markdown tables, which
    Slack cannot render, become code blocks so that their columns stay aligned.
    """
    out: list[str] = []
    in_code = in_table = False
    for line in markdown.replace("\r\n", "\n").split("\n"):
        if not in_code and _is_table_row(line) != in_table:
            in_table = not in_table
            out.append(FENCE)
        if in_table:
            out.append(escape(line))
            continue
        if line.lstrip().startswith(FENCE):
            if not in_code:
                in_code = True
                out.append(FENCE)
                rest = line.lstrip()[3:]
                # "```python" opens a block; "```code```" on one line is inline.
                if rest.rstrip().endswith(FENCE) and len(rest.strip()) > 3:
                    out[-1] = FENCE + escape(rest.rstrip()[:-3]) + FENCE
                    in_code = False
            else:
                in_code = False
                out.append(FENCE)
            continue
        out.append(escape(line) if in_code else _line(line))
    if in_code or in_table:
        out.append(FENCE)
    return "\n".join(out)


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


# A link to_mrkdwn made: <url|label>.
_LINK_MRKDWN = re.compile(r"<((?:https?://|mailto:)[^<>\s|]*)\|([^<>\n]*)>")
# What a cut must not fall inside: an escaped character (a part ending in "&l" and
# the next starting with "t;" would show both halves as text) or a link.
_ATOM = re.compile(r"&(?:amp|lt|gt);|" + _LINK_MRKDWN.pattern)


def _outside_atoms(line: str, cut: int) -> int:
    """``cut`` moved back to the start of the entity or link it would fall inside
    (unless that is the start of the line: then there is nothing before to cut)."""
    for m in _ATOM.finditer(line):
        if m.start() >= cut:
            break
        if m.start() < cut < m.end():
            return m.start() if m.start() > 0 else cut
    return cut


def _cut_point(line: str, limit: int) -> int:
    """Where to cut a line longer than ``limit``: the last space in its second half,
    else at the limit; never inside an entity or link, and never just before a
    ``````` (the rest becomes a line of its own, which would open a code block)."""
    space = line.rfind(" ", limit // 2, limit)
    cut = _outside_atoms(line, limit if space <= 0 else space)
    alt = cut
    while line[alt:].lstrip(" ").startswith(FENCE) and alt > limit // 2:
        alt -= 1
    if alt != cut and not line[alt:].lstrip(" ").startswith(FENCE):
        cut = _outside_atoms(line, alt)
    return cut


def _unlink_long(line: str, limit: int) -> str:
    """A link longer than a whole part as ``label (url)``: it cannot stay one piece,
    and a cut through ``<url|label>`` would show its markup."""
    return _LINK_MRKDWN.sub(
        lambda m: f"{m.group(2)} ({m.group(1)})" if len(m.group(0)) > limit else m.group(0),
        line,
    )


def _hard_split(line: str, limit: int) -> list[str]:
    pieces: list[str] = []
    if len(line) > limit:
        line = _unlink_long(line, limit)
    while len(line) > limit:
        cut = _cut_point(line, limit)
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


def _split_unit(unit: str, limit: int) -> list[str]:
    lines = unit.split("\n")
    is_code = lines[0].lstrip().startswith(FENCE) and len(lines) > 1
    if not is_code:
        pieces = [p for line in lines for p in _hard_split(line, limit)]
        return _pack(pieces, "\n", limit)
    opener = FENCE
    body = lines[1:-1] if lines[-1].strip() == FENCE else lines[1:]
    first = lines[0].strip()[len(FENCE) :]
    if first:
        # Slack shows text after the opening fence as code (to_mrkdwn already dropped
        # Markdown's language tags): keep it, or a cut would lose it.
        body = [first, *body]
    budget = limit - len(opener) - len(FENCE) - 2
    pieces = [p for line in body for p in _hard_split(line, budget)]
    return [f"{opener}\n{chunk}\n{FENCE}" for chunk in _pack(pieces, "\n", budget)]


def split_message(text: str, limit: int = DEFAULT_LIMIT) -> list[str]:
    """Split ``text`` into parts of at most ``limit`` characters.

    Cuts at paragraph boundaries first, then at line ends, then at spaces; a code
    block that must be cut is closed at the end of one part and reopened at the
    start of the next, so every part renders on its own. A cut never falls inside
    an escaped character (``&amp;``, ``&lt;``, ``&gt;``) nor inside a ``<url|label>``
    link; a link longer than a whole part becomes ``label (url)``.
    """
    if limit < 32:
        raise ValueError("limit must be at least 32 characters")
    if len(text) <= limit:
        return [text]
    pieces: list[str] = []
    for unit in _units(text):
        pieces.extend([unit] if len(unit) <= limit else _split_unit(unit, limit))
    return _pack(pieces, "\n\n", limit) or [""]

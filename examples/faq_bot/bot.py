"""A FAQ bot: the model looks answers up in ``faq.json`` through a tool.

Run it::

    SLUICE_APP=examples.faq_bot.bot:bot sluice dev

and ask "How do I connect Sluice to Slack?". With the built-in simulator instead of
a real model, ask ``How do I install it? [[tool:faq_lookup {"question": "install"}]]``
to make the simulator call the tool.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sluice import Bot, MessageContext

FAQ_PATH = Path(__file__).with_name("faq.json")
FAQ: list[dict[str, str]] = json.loads(FAQ_PATH.read_text("utf-8"))
_WORD = re.compile(r"[a-z0-9]+")
_STOP = {"a", "an", "the", "do", "i", "how", "is", "to", "what", "which", "where", "it", "my"}

bot = Bot(
    name="faq",
    system_prompt=(
        "You answer questions about Sluice. Always call the faq_lookup tool first and "
        "answer only from what it returns; if it finds nothing, say you don't know and "
        "suggest the `faq` command."
    ),
    temperature=0.2,
)


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


@bot.tool
async def faq_lookup(question: str, limit: int = 1) -> str:
    """Find the FAQ entries that best match a question.

    Args:
        question: The user's question, or a few keywords from it.
        limit: How many entries to return (1-3).
    """
    wanted = _words(question)
    scored = sorted(
        ((len(wanted & _words(e["question"] + " " + e["id"])), e) for e in FAQ),
        key=lambda pair: -pair[0],
    )
    hits = [e for score, e in scored[: max(1, min(limit, 3))] if score > 0]
    if not hits:
        return "No FAQ entry matches."
    return "\n".join(f"Q: {e['question']} A: {e['answer']}" for e in hits)


@bot.command("faq", help="List the questions the FAQ answers.")
async def faq_topics(ctx: MessageContext) -> str:
    """The FAQ's questions, one per line."""
    lines = [f"• {e['question']}" for e in FAQ]
    return "I can answer these:\n" + "\n".join(lines)

"""Shared Hypothesis strategies and settings of the fuzz campaign (``tests/fuzz``).

Each property runs ``SLUICE_FUZZ_EXAMPLES`` examples (default: a few seconds' worth
per property, set in each test); a longer campaign raises it, e.g.
``SLUICE_FUZZ_EXAMPLES=20000 pytest tests/fuzz``.
"""

from __future__ import annotations

import os
import re
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


def fuzz(default_examples: int, **extra: Any) -> Any:
    """Hypothesis settings: ``default_examples`` unless ``SLUICE_FUZZ_EXAMPLES`` says more."""
    examples = int(os.environ.get("SLUICE_FUZZ_EXAMPLES") or default_examples)
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
        **extra,
    )


# Slack's live markup: <!channel>, <!here>, <!everyone>, <!subteam^…>, <@U…>, <#C…>.
LIVE_SLACK = re.compile(r"<[!@#]")

PINGS = [
    "@everyone",
    "@here",
    "<!channel>",
    "<!here>",
    "<!everyone>",
    "<!subteam^S123|@team>",
    "<!date^1392734382^{date}|x>",
    "<@U123>",
    "<@W1|bob>",
    "<#C1>",
    "<#C1|general>",
    "<@400000000000000001>",
    "<@!400000000000000001>",
    "<@&400000000000000003>",
    "&lt;!channel&gt;",
    "&amp;",
]
MARKUP = [
    "```",
    "```python\n",
    "\n```\n",
    "`",
    "**",
    "__",
    "*",
    "_",
    "~~",
    "# ",
    "\n## ",
    "\n- ",
    "\n  * ",
    "\n> ",
    ">",
    "<",
    "&",
    "|",
    "\n| a | b |\n|---|---|\n| 1 | 2 |\n",
    "[docs](https://example.com/a?b=1&c=2)",
    "[x](javascript:alert(1))",
    "![img](https://example.com/i.png)",
    "<https://example.com>",
    "---",
]
ODD = [
    "\u200b",
    "\u200f",
    "\u202e",
    "\u2066",
    "\ufeff",
    "\x00",
    "\x1b[31m",
    "\r\n",
    "\r",
    "\t",
    "\u2028",
    "\u0085",
    "مرحبا",
    "👩\u200d👩\u200d👧",
    "e\u0301",
    "𝔘𝔫𝔦",
]
# Long runs: a word longer than any message, many short lines, a long line of words.
LONG = st.sampled_from(["x" * 5000, "word " * 900, "a\n" * 700, "&" * 1500, "<!here>" * 400])

PIECE = st.one_of(
    st.sampled_from(PINGS),
    st.sampled_from(MARKUP),
    st.sampled_from(ODD),
    st.text(max_size=30),
    st.sampled_from([" ", "\n", "\n\n", "hello", "world"]),
)
HOSTILE_TEXT = st.lists(PIECE, max_size=60).map("".join)
LONG_HOSTILE_TEXT = st.lists(st.one_of(PIECE, LONG), max_size=40).map("".join)

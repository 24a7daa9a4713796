"""The bot ``sluice bench`` runs Sluice with (``SLUICE_APP=sluice.bench.bot:make_bot``).

The default bot plus lane rules, so that every lane is used: billing questions go to
``high``, every other message of the heavy users (``BENCH_BULK_USERS``, comma-separated
web sessions, set by the bench) to ``bulk``. The schedule labels each planned message
with the same lane (:attr:`sluice.bench.scenarios.Planned.lane`), which is how the
naive design's rows are grouped.
"""

from __future__ import annotations

import os

from core.bot import Bot
from core.routing import LaneRule

BULK_USERS_ENV = "BENCH_BULK_USERS"


def make_bot() -> Bot:
    """The bench bot; the heavy users' sessions come from ``BENCH_BULK_USERS``."""
    bulk = [u for u in os.environ.get(BULK_USERS_ENV, "").split(",") if u]
    rules = [LaneRule("high", words=["billing"])]
    if bulk:
        rules.append(LaneRule("bulk", users=bulk))
    return Bot(lanes=rules)

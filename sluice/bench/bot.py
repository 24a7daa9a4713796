"""The bot ``sluice bench`` runs Sluice with (``SLUICE_APP=sluice.bench.bot:make_bot``).

The default bot plus lane rules, so that every lane is used: billing questions go to
``high``, every other message of the heavy users (``BENCH_BULK_USERS``, comma-separated
web user ids ``web:<name>``, set by the bench; :func:`bench_user` names them) to
``bulk``. The schedule labels each planned message with the same lane
(:attr:`sluice.bench.scenarios.Planned.lane`), which is how the naive design's rows
are grouped.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from core.framework.bot import Bot
from core.framework.routing import LaneRule

if TYPE_CHECKING:
    from aiohttp import web

BULK_USERS_ENV = "BENCH_BULK_USERS"


def make_bot() -> Bot:
    """The bench bot; the heavy users' sessions come from ``BENCH_BULK_USERS``."""
    bulk = [u for u in os.environ.get(BULK_USERS_ENV, "").split(",") if u]
    rules = [LaneRule("high", words=["billing"])]
    if bulk:
        rules.append(LaneRule("bulk", users=bulk))
    return Bot(lanes=rules)


BENCH_USER_HEADER = "X-Bench-User"


def bench_user(request: web.Request) -> str | None:
    """The bench's sign-in hook (``SLUICE_WEB_AUTH=sluice.bench.bot:bench_user``): the
    simulated user named by the ``X-Bench-User`` header, so the heavy users' ids
    (``web:<name>``) are known before their sessions exist. Only for the bench's own
    web adapter on loopback: anyone can send that header."""
    name = request.headers.get(BENCH_USER_HEADER, "").strip()
    return name or None

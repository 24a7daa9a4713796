"""Priority lanes: ``high``, ``default``, ``bulk``, and how they are served.

The lane is chosen once, when the adapter enqueues the message
(:func:`core.traffic.queue.enqueue_reply` calls :func:`choose_lane`), by the bot's lane rules
and ``@bot.lane`` functions (:mod:`core.framework.routing`; DMs, slash commands, words such as
"billing", admin users, tenants of a tier)::

    Bot(
        name="helper",
        lanes=[
            LaneRule("high", words=["billing", "outage"]),
            LaneRule("high", dm=True),
            LaneRule("high", users=ADMINS),
            LaneRule("high", commands=True),
            LaneRule("bulk", tenants=FREE_TIER_TENANTS),
        ],
    )

Priority is a *score*, not a strict order: a message's score is its arrival time
minus its lane's head start (:func:`priority_ms`). The arq queue and the LLM budget
line both serve the lowest score first, so under saturation a high-lane message
overtakes every default or bulk message that arrived less than the head start
before it, while a bulk message never waits more than about
``SLUICE_LANE_HIGH_BOOST_S`` behind newer high-lane ones (no starvation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.framework.routing import LANES
from core.messages import IncomingMessage

__all__ = ["LANES", "boost_ms", "choose_lane", "lane_queue_name", "priority_ms"]

if TYPE_CHECKING:
    from core.framework.bot import Bot
    from core.settings import Settings


def choose_lane(bot: Bot, msg: IncomingMessage) -> str:
    """The lane for ``msg``: the bot's choice (one of :data:`LANES`), else the adapter's.

    An adapter's lane outside :data:`LANES` is kept as it is and served like ``bulk``
    (no head start)."""
    return bot.lane_for(msg)


def boost_ms(settings: Settings, lane: str) -> int:
    """A lane's head start in milliseconds."""
    if lane == "high":
        return int(settings.lane_high_boost_s * 1000)
    if lane == "default":
        return int(settings.lane_default_boost_s * 1000)
    return 0


def priority_ms(settings: Settings, lane: str, arrived_ms: int) -> int:
    """The score a message is served by (lower first): arrival minus its lane's head start."""
    return arrived_ms - boost_ms(settings, lane)


def lane_queue_name(settings: Settings, lane: str) -> str:
    """The queue of one lane when ``SLUICE_LANE_QUEUES=per-lane``."""
    return f"{settings.queue_name}:{lane}"

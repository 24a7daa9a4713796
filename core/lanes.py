"""Priority lanes: ``high``, ``default``, ``bulk``.

A lane is chosen once, when the adapter enqueues the message
(:func:`core.queue.enqueue_reply` calls :func:`choose_lane`), from the bot's
``lane_rules``; the first rule that matches wins, else the message keeps the lane
the adapter gave it (``default``)::

    Bot(
        name="helper",
        lane_rules=[
            LaneRule("high", words=("billing", "outage")),
            LaneRule("high", dm=True),
            LaneRule("high", admin=True),
            LaneRule("bulk", tiers=("free",)),
        ],
        tenant_tiers={"T123": "free"},
    )

Priority is a *score*, not a strict order: a message's score is its arrival time
minus its lane's head start (:func:`priority_ms`). The arq queue and the LLM budget
line both serve the lowest score first, so under saturation a high-lane message
overtakes every default or bulk message that arrived less than the head start
before it, while a bulk message never waits more than about
``SLUICE_LANE_HIGH_BOOST_S`` behind newer high-lane ones (no starvation).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.messages import IncomingMessage

if TYPE_CHECKING:
    from core.bot import Bot
    from core.settings import Settings

LANES = ("high", "default", "bulk")


@dataclass(frozen=True)
class LaneRule:
    """One lane rule; every condition that is set must hold for it to match.

    Attributes:
        lane: The lane the message goes to when the rule matches.
        dm: Match direct messages (``True``) or channel messages (``False``).
        slash: Match slash commands (``meta["command"]`` set by the adapter, or text
            starting with ``/``).
        words: Match when the text contains any of these words (case-insensitive,
            whole words).
        admin: Match admin users (``SLUICE_ADMIN_USERS``).
        users: Match these user ids.
        tenants: Match these tenant ids.
        tiers: Match tenants whose tier (``Bot.tenant_tiers``) is one of these.
        platforms: Match these platforms (``slack``, ``discord``, ``web``).
        when: Any other test, a function of the message.
    """

    lane: str
    dm: bool | None = None
    slash: bool | None = None
    words: tuple[str, ...] = ()
    admin: bool | None = None
    users: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    tiers: tuple[str, ...] = ()
    platforms: tuple[str, ...] = ()
    when: Callable[[IncomingMessage], bool] | None = None

    def __post_init__(self) -> None:
        if self.lane not in LANES:
            raise ValueError(f"LaneRule lane {self.lane!r} is not one of {', '.join(LANES)}")

    def matches(self, msg: IncomingMessage, *, admin: bool, tier: str | None) -> bool:
        """Whether every condition set on this rule holds for ``msg``."""
        if self.dm is not None and msg.is_dm != self.dm:
            return False
        if self.slash is not None and is_slash(msg) != self.slash:
            return False
        if self.words and not _has_word(msg.text, self.words):
            return False
        if self.admin is not None and admin != self.admin:
            return False
        if self.users and msg.user not in self.users:
            return False
        if self.tenants and msg.tenant not in self.tenants:
            return False
        if self.tiers and tier not in self.tiers:
            return False
        if self.platforms and msg.platform not in self.platforms:
            return False
        return self.when is None or self.when(msg)


def is_slash(msg: IncomingMessage) -> bool:
    """A slash command: flagged by the adapter, or text that starts with ``/``."""
    return bool(msg.meta.get("command")) or msg.text.lstrip().startswith("/")


def _has_word(text: str, words: tuple[str, ...]) -> bool:
    lowered = text.lower()
    return any(re.search(rf"\b{re.escape(w.lower())}\b", lowered) for w in words)


def choose_lane(bot: Bot, settings: Settings, msg: IncomingMessage) -> str:
    """The lane for ``msg``: the first matching rule's, else the adapter's choice."""
    admin = msg.user in settings.admin_users
    tier = bot.tenant_tiers.get(msg.tenant)
    for rule in bot.lane_rules:
        if rule.matches(msg, admin=admin, tier=tier):
            return rule.lane
    return msg.lane if msg.lane in LANES else "default"


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

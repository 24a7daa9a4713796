"""Lane rules: which priority lane a message is answered in.

Adapters choose the lane when they enqueue (``bot.lane_for(msg)``); workers answer
the ``high`` lane first under load, and ``bulk`` last (without starving it)::

    bot = Bot(
        lanes=[
            LaneRule("high", dm=True),
            LaneRule("high", words=["billing", "outage"]),
            LaneRule("bulk", channels=["C0RANDOM"]),
        ],
    )

A rule matches when *every* condition it sets holds; the first matching rule wins;
functions registered with ``@bot.lane`` are asked before the rules. Without a match
the adapter's own choice (``"default"``) stays.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from core.errors import BotDefinitionError
from core.messages import IncomingMessage

LANES = ("high", "default", "bulk")


def check_lane(lane: str, where: str) -> str:
    """``lane`` if it is a known lane.

    Raises:
        BotDefinitionError: an unknown lane name.
    """
    if lane not in LANES:
        raise BotDefinitionError(f"{where}: unknown lane {lane!r}; use one of {', '.join(LANES)}.")
    return lane


@dataclass(frozen=True)
class LaneRule:
    """Send messages that match every given condition to ``lane``.

    Attributes:
        lane: ``"high"``, ``"default"`` or ``"bulk"``.
        dm: Direct messages only (``True``) or channel messages only (``False``).
        platforms: Any of these platforms (``"slack"``, ``"discord"``, ``"web"``).
        tenants: Any of these workspaces / guilds.
        channels: Any of these channels.
        users: Any of these users (e.g. admins).
        words: The text contains any of these words (whole words, any case).
        commands: The message runs a command (``/name`` or an adapter's command) or not.
    """

    lane: str
    dm: bool | None = None
    platforms: Sequence[str] = ()
    tenants: Sequence[str] = ()
    channels: Sequence[str] = ()
    users: Sequence[str] = ()
    words: Sequence[str] = ()
    commands: bool | None = None
    _words_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_lane(self.lane, f"LaneRule({self.lane!r})")
        for name in ("platforms", "tenants", "channels", "users", "words"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise BotDefinitionError(
                    f"LaneRule({self.lane!r}): {name} must be a list, e.g. {name}=[{value!r}]."
                )
            object.__setattr__(self, name, tuple(value))
        if self.words:
            alternatives = "|".join(re.escape(w) for w in self.words)
            pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
            object.__setattr__(self, "_words_re", pattern)

    def matches(self, msg: IncomingMessage) -> bool:
        """Whether every condition this rule sets holds for ``msg``."""
        if self.dm is not None and msg.is_dm != self.dm:
            return False
        if self.platforms and msg.platform not in self.platforms:
            return False
        if self.tenants and msg.tenant not in self.tenants:
            return False
        if self.channels and msg.channel not in self.channels:
            return False
        if self.users and msg.user not in self.users:
            return False
        if self._words_re is not None and not self._words_re.search(msg.text):
            return False
        if self.commands is not None:
            is_command = bool(msg.meta.get("command")) or msg.text.lstrip().startswith("/")
            if is_command != self.commands:
                return False
        return True

"""The bot definition: what a user of Sluice writes.

A bot is plain Python in the user's own module::

    from core.bot import Bot

    bot = Bot(name="helper", system_prompt="You answer questions about our product.")

and ``SLUICE_APP=mybot:bot`` points workers and adapters at it. Without
``SLUICE_APP`` the built-in :data:`DEFAULT_BOT` answers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from core.errors import BotDefinitionError
from core.lanes import LaneRule

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, concise assistant in a team chat. Answer clearly; use Markdown "
    "sparingly; say so when you do not know."
)


@dataclass
class Bot:
    """A chat bot: persona, model and parameters.

    Attributes:
        name: Shown in logs and used to scope the response cache.
        system_prompt: The persona sent first in every conversation.
        model: Model id; ``None`` means the ``SLUICE_MODEL`` setting.
        temperature: Sampling temperature; ``None`` leaves the provider's default.
        max_tokens: Longest answer in tokens; ``None`` means ``SLUICE_LLM_MAX_TOKENS``.
        context_turns: Earlier turns sent with each message; ``None`` means the setting.
        params: Extra Chat Completions parameters passed through as they are.
        lane_rules: Traffic control: rules choosing a message's lane (``high``,
            ``default``, ``bulk``), first match wins; see :mod:`core.lanes`.
        tenant_tiers: Tenant id -> tier name, matched by ``LaneRule(tiers=...)``.
        cache_answers: ``False`` turns the response cache off for this bot.
        no_cache_channels: Channels whose answers are never cached or served from cache.
        limits: Overrides of the limit settings by name (``user_requests_per_window``,
            ``user_tokens_per_day``, ``tenant_requests_per_window``,
            ``tenant_tokens_per_day``, ``user_window_s``); ``None`` as a value lifts it.
        merge_burst_s: When > 0, messages one user sends within this many seconds of
            each other in a conversation are answered as one turn.
    """

    name: str = "assistant"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    context_turns: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # --- Traffic control ---
    lane_rules: list[LaneRule] = field(default_factory=list)
    tenant_tiers: dict[str, str] = field(default_factory=dict)
    cache_answers: bool = True
    no_cache_channels: frozenset[str] = frozenset()
    limits: dict[str, int | None] = field(default_factory=dict)
    merge_burst_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise BotDefinitionError("Bot(name=...) must not be empty: give your bot a name.")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise BotDefinitionError(
                f"Bot {self.name!r}: temperature={self.temperature} is outside 0..2."
            )


DEFAULT_BOT = Bot()


def load_bot(path: str | None) -> Bot:
    """Load the bot named by an import path ``module:attribute``.

    The attribute may be a :class:`Bot` or a function without arguments returning
    one. ``None`` or an empty path gives :data:`DEFAULT_BOT`.

    Raises:
        BotDefinitionError: the path is malformed, the module or attribute is
            missing, or it is not a bot; the message names the fix.
    """
    if not path:
        return DEFAULT_BOT
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise BotDefinitionError(
            f"SLUICE_APP={path!r} is not an import path: write it as 'module:attribute', "
            "for example SLUICE_APP=mybot:bot."
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise BotDefinitionError(
            f"SLUICE_APP={path!r}: cannot import module {module_name!r} ({e}). Run Sluice "
            "from the folder that holds it, or install it, so that Python can import it."
        ) from e
    try:
        obj = getattr(module, attr)
    except AttributeError as e:
        raise BotDefinitionError(
            f"SLUICE_APP={path!r}: module {module_name!r} has no attribute {attr!r}. "
            "Define it there, e.g. `bot = Bot(...)`."
        ) from e
    if callable(obj) and not isinstance(obj, Bot):
        obj = obj()
    if not isinstance(obj, Bot):
        raise BotDefinitionError(
            f"SLUICE_APP={path!r} names a {type(obj).__name__}, not a core.bot.Bot: "
            "point it at a Bot instance or a function returning one."
        )
    return obj

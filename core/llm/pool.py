"""Many providers as one: a weighted pool with a budget per provider, failover and a
fallback model.

``SLUICE_PROVIDERS`` (or ``SLUICE_PROVIDERS_FILE``) lists OpenAI-compatible endpoints,
each with its models, limits and weight (:class:`core.settings.ProviderConfig`). Each
provider gets its own :class:`core.llm.budget.LLMBudget` (bucket, line, breaker and
counters under ``{prefix}:llm:pool:<name>:``), and a model with limits of its own
(``model_limits``) gets one more (``<name>:<model>``), so every worker shares each
provider's limits exactly as it shares the single budget without a pool.

A job's call (:meth:`ProviderPool.complete`):

1. **Choose**: among the providers serving the model and not yet failed for this job,
   the ones whose expected wait (:meth:`LLMBudget.expected_wait_s`) is least, within
   :data:`ROOM_SLACK_S`; among those, one at random by weight. A provider whose breaker
   is open is skipped.
2. **Call** it through :func:`core.llm.client.complete_with_retries` with no retry of its
   own: the job waits in that provider's line, and the budget hears how the call ended.
3. **Fail over** on a 429, a 5xx, a timeout, a broken connection or stream, or an open
   breaker: the next provider serving the model, then the fallback model
   (``Bot.fallback_model`` or ``SLUICE_FALLBACK_MODEL``) on its providers. The fallback
   model is also used when every provider of the model would make the job wait longer
   than ``SLUICE_LLM_BUDGET_WAIT_S``. A provider that refuses the request (4xx) is left
   too: another may accept it (a key or a model name it does not have).
4. When every provider failed, the round starts again after a backoff, up to
   ``SLUICE_LLM_RETRIES`` more rounds; then the job gets the short apology (or the
   "unavailable" reply when every breaker is open).

**Streams that fail over show no duplicated or garbled text.** Before the first token,
a failover is invisible. After text was shown, the answer restarts on the next provider
*without streaming*: the text already shown stays as it is until the whole new answer
replaces it in the final reply (every responder's ``finish`` replaces what was
streamed). The user never sees two answers spliced together; only a pause.

Without ``SLUICE_PROVIDERS`` there is no pool unless ``SLUICE_FALLBACK_MODEL`` is set:
then a pool of one implicit provider (``default``: ``OPENAI_API_KEY``,
``OPENAI_BASE_URL``, the budget settings and the very budget keys used without a pool)
tries the fallback model on the same endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from core.errors import LLMError, LLMRateLimitedError, LLMRequestError, LLMUnavailableError
from core.infra import metrics
from core.infra.redis import Keys
from core.llm.budget import BudgetGate, LLMBudget, quota_use_in_backlog
from core.llm.client import ChatMessage, Completion, OnText, OpenAIProvider, complete_with_retries
from core.settings import ProviderConfig, Settings

logger = logging.getLogger(__name__)

#: Providers whose expected waits differ by less than this count as equally free, and
#: the job picks among them by weight.
ROOM_SLACK_S = 0.05
DEFAULT_PROVIDER = "default"


class _ScopedKeys(Keys):
    """The budget's keys of one provider (and model): ``{prefix}:llm:pool:<scope>:<name>``.
    The priorities a job inherits from its conversation (``llm_lent``) stay shared."""

    def __init__(self, base: Keys, scope: str) -> None:
        super().__init__(base.prefix)
        self._scope = scope

    def llm(self, name: str) -> str:
        """Shared LLM budget state of this provider: bucket, waiters, breaker, counters."""
        return f"{self.prefix}:llm:pool:{self._scope}:{name}"


@dataclass(frozen=True)
class PoolBudget:
    """One budget of the pool: a provider's, or one model's at a provider."""

    provider: str
    model: str | None
    rpm: int | None
    tpm: int | None
    budget: LLMBudget

    @property
    def label(self) -> str:
        """``name`` or ``name:model``, as ``sluice status`` shows it."""
        return self.provider if self.model is None else f"{self.provider}:{self.model}"


@dataclass
class PoolMember:
    """One provider of the pool: its client, its models, its weight and its budgets."""

    name: str
    models: tuple[str, ...]
    weight: float
    base_url: str | None
    api_key: str | None
    shared: PoolBudget
    per_model: dict[str, PoolBudget]

    def budget_for(self, model: str) -> PoolBudget:
        """The budget a call of ``model`` counts against."""
        return self.per_model.get(model, self.shared)

    @property
    def budgets(self) -> list[PoolBudget]:
        """Every budget of this provider."""
        return [self.shared, *self.per_model.values()]


def _budget(
    redis: Redis,
    keys: Keys,
    settings: Settings,
    scope: str | None,
    rpm: int | None,
    tpm: int | None,
) -> LLMBudget:
    scoped = keys if scope is None else _ScopedKeys(keys, scope)
    return LLMBudget(redis, scoped, settings.model_copy(update={"llm_rpm": rpm, "llm_tpm": tpm}))


def _members(
    redis: Redis, keys: Keys, settings: Settings, default_base_url: str | None = None
) -> list[PoolMember]:
    configs: list[ProviderConfig] = list(settings.providers)
    implicit = not configs
    if implicit:
        models = [settings.model]
        if settings.fallback_model and settings.fallback_model != settings.model:
            models.append(settings.fallback_model)
        configs = [
            ProviderConfig(
                name=DEFAULT_PROVIDER,
                base_url=settings.openai_base_url or "https://api.openai.com/v1",
                api_key=settings.openai_api_key,
                models=models,
                rpm=settings.llm_rpm,
                tpm=settings.llm_tpm,
            )
        ]
    out = []
    for c in configs:
        # The implicit provider keeps the budget keys of a worker without a pool.
        scope = None if implicit else c.name
        shared = PoolBudget(
            c.name, None, c.rpm, c.tpm, _budget(redis, keys, settings, scope, c.rpm, c.tpm)
        )
        per_model = {
            model: PoolBudget(
                c.name,
                model,
                lim.rpm,
                lim.tpm,
                _budget(redis, keys, settings, f"{c.name}:{model}", lim.rpm, lim.tpm),
            )
            for model, lim in c.model_limits.items()
        }
        key = c.api_key.get_secret_value() if c.api_key else None
        out.append(
            PoolMember(
                c.name,
                tuple(c.models),
                c.weight,
                # The implicit provider's client is the one a worker without a pool has.
                default_base_url if implicit else c.base_url,
                None if implicit else key,
                shared,
                per_model,
            )
        )
    return out


class ProviderPool:
    """The providers of ``SLUICE_PROVIDERS`` as one: choose, call, fail over.

    One per worker process (``ctx["llm"]``), created in ``on_startup`` and closed in
    ``on_shutdown``. ``rng`` chooses among equally free providers by weight (tests pass a
    seeded one).
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        *,
        rng: random.Random | None = None,
        default_base_url: str | None = None,
    ) -> None:
        self._settings = settings
        self._rng = rng or random.Random()
        self.members = _members(redis, keys, settings, default_base_url)
        self.clients = {
            m.name: OpenAIProvider(settings, base_url=m.base_url, api_key=m.api_key)
            for m in self.members
        }

    @classmethod
    def from_settings(
        cls, redis: Redis, keys: Keys, settings: Settings, default_base_url: str | None = None
    ) -> ProviderPool | None:
        """The pool the settings ask for, or ``None`` (one provider, no fallback model).
        ``default_base_url`` overrides ``OPENAI_BASE_URL`` for the implicit provider
        (``sluice dev``'s simulator)."""
        if not settings.providers and not settings.fallback_model:
            return None
        return cls(redis, keys, settings, default_base_url=default_base_url)

    async def close(self) -> None:
        """Close every provider's HTTP connections."""
        for client in self.clients.values():
            await client.close()

    def serving(self, model: str) -> list[PoolMember]:
        """The providers that answer ``model``, in configured order."""
        return [m for m in self.members if model in m.models]

    async def choose(
        self, model: str, skip: set[str] | frozenset[str] = frozenset()
    ) -> tuple[PoolMember, float] | None:
        """The provider to call for ``model`` and its expected wait in seconds: least wait
        first, by weight among equally free ones; ``None`` when none is left (every one
        serving the model is in ``skip`` or has its breaker open)."""
        candidates = [m for m in self.serving(model) if m.name not in skip]
        if not candidates:
            return None
        waits = await asyncio.gather(
            *(m.budget_for(model).budget.expected_wait_s() for m in candidates)
        )
        usable = [(m, w) for m, w in zip(candidates, waits, strict=True) if math.isfinite(w)]
        if not usable:
            return None
        least = min(w for _, w in usable)
        near = [(m, w) for m, w in usable if w <= least + ROOM_SLACK_S]
        pick = self._rng.uniform(0, sum(m.weight for m, _ in near))
        for member, wait in near:
            pick -= member.weight
            if pick <= 0:
                return member, wait
        return near[-1]

    async def breaker_open_for(self, model: str) -> float | None:
        """Seconds until the first breaker of ``model``'s providers closes, when all are
        open; ``None`` when one is closed."""
        opens = [await m.budget_for(model).budget.breaker_open_for() for m in self.serving(model)]
        if not opens or min(opens) <= 0:
            return None
        return min(opens)

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        fallback_model: str | None,
        member_id: str,
        priority_ms: int,
        est_tokens: int,
        on_queued: Callable[[float], Awaitable[None]] | None = None,
        on_text: OnText | None = None,
        **params: Any,
    ) -> Completion:
        """The answer from the first provider that gives one (see the module docstring).

        Raises:
            LLMUnavailableError: every provider of the model and the fallback model failed
                in every round; ``retry_in_s`` is set when every breaker is open, and
                ``partial_text`` holds what was shown when nothing replaced it.
            LLMRequestError: every provider refused the request itself.
        """
        models = [model]
        if fallback_model and fallback_model != model:
            models.append(fallback_model)
        shown = ""

        async def tracking(text: str) -> None:
            nonlocal shown
            shown = text
            if on_text is not None:
                await on_text(text)

        last: LLMError | None = None
        for round_ in range(self._settings.llm_retries + 1):
            if round_:
                delay = min(20.0, 0.5 * 2 ** (round_ - 1)) * (0.5 + self._rng.random())
                logger.warning(
                    "every provider failed job=%s (%s); round %d in %.2fs",
                    member_id,
                    last,
                    round_ + 1,
                    delay,
                )
                await asyncio.sleep(delay)
            tried = False
            for i, name in enumerate(models):
                more_models = i + 1 < len(models)
                failed: set[str] = set()
                while (choice := await self.choose(name, failed)) is not None:
                    tried = True
                    member, wait_s = choice
                    if more_models and wait_s > self._settings.llm_budget_wait_s:
                        logger.info(
                            "no room for model=%s job=%s (least wait %.0fs); fallback model=%s",
                            name,
                            member_id,
                            wait_s,
                            models[i + 1],
                        )
                        break
                    gate = BudgetGate(
                        member.budget_for(name).budget,
                        member_id,
                        priority_ms,
                        est_tokens,
                        on_queued,
                    )
                    try:
                        out = await complete_with_retries(
                            self.clients[member.name],
                            messages,
                            model=name,
                            retries=0,
                            # After text was shown, the new answer is not streamed: it
                            # replaces the shown text whole, in the final reply.
                            on_text=None if shown else tracking,
                            gate=gate,
                            **params,
                        )
                    except LLMError as e:
                        last = e
                        failed.add(member.name)
                        self._failed_over(member, name, member_id, e)
                        continue
                    metrics.LLM_PROVIDER_CALLS.labels(member.name, "ok").inc()
                    if shown:
                        logger.info(
                            "job=%s answered by provider=%s after a broken stream; the answer "
                            "replaces the text shown",
                            member_id,
                            member.name,
                        )
                    return out
            if not tried:
                break  # every breaker is open: the short "unavailable" reply, at once
        if isinstance(last, LLMRequestError) and not shown:
            raise last
        retry_in = await self.breaker_open_for(model)
        why = f"failed: {last}" if last is not None else "has its breaker open"
        raise LLMUnavailableError(
            f"every provider of {model!r} {why}", retry_in, partial_text=shown
        )

    @staticmethod
    def _failed_over(member: PoolMember, model: str, member_id: str, error: LLMError) -> None:
        # complete_with_retries wraps what the provider answered; an error without a
        # cause came from the budget (breaker open, or no room in time): no call was made.
        cause = error.__cause__ if isinstance(error, LLMUnavailableError) else error
        if cause is not None:
            outcome = "rate_limited" if isinstance(cause, LLMRateLimitedError) else "error"
            metrics.LLM_PROVIDER_CALLS.labels(member.name, outcome).inc()
        metrics.LLM_PROVIDER_FAILOVERS.labels(member.name).inc()
        logger.warning(
            "provider=%s model=%s failed job=%s: %s; trying the next",
            member.name,
            model,
            member_id,
            error,
        )


@dataclass(frozen=True)
class BudgetLine:
    """Where one budget keeps its state in Redis, for readers outside a worker's pool
    (the door's estimate, parking): its keys, its configured requests per minute, and
    whether it is a provider's own budget (``False``: one model's at a provider)."""

    label: str
    rpm: int | None
    keys: Keys
    shared: bool = True


def budget_lines(keys: Keys, settings: Settings) -> list[BudgetLine]:
    """Every LLM budget a reply job may wait in: each provider's and each model's with
    limits of its own with ``SLUICE_PROVIDERS``; else the one budget (an implicit pool,
    made only for a fallback model, keeps its keys). Keeps no connection."""
    if not settings.providers:
        return [BudgetLine(DEFAULT_PROVIDER, settings.llm_rpm, keys)]
    out = []
    for c in settings.providers:
        out.append(BudgetLine(c.name, c.rpm, _ScopedKeys(keys, c.name)))
        for model, lim in c.model_limits.items():
            scope = f"{c.name}:{model}"
            out.append(BudgetLine(scope, lim.rpm, _ScopedKeys(keys, scope), shared=False))
    return out


async def pool_budgets(redis: Redis, keys: Keys, settings: Settings) -> list[PoolBudget]:
    """Every budget of the configured pool (none without ``SLUICE_PROVIDERS``), for
    ``sluice status`` and metrics; no HTTP client is kept."""
    if not settings.providers:
        return []
    return [b for m in _members(redis, keys, settings) for b in m.budgets]


async def pool_snapshot(redis: Redis, settings: Settings) -> list[dict[str, Any]]:
    """Per budget of the pool: its limits, counters, breaker and quota use while jobs
    waited (for ``sluice status`` and ``sluice bench``). Never a key."""
    out = []
    for b in await pool_budgets(redis, Keys(settings.key_prefix), settings):
        stats = await b.budget.stats()
        out.append(
            {
                "provider": b.provider,
                "model": b.model,
                "rpm": b.rpm,
                "tpm": b.tpm,
                "stats": stats,
                "breaker_open_for_s": await b.budget.breaker_open_for(),
                "quota_use_in_backlog": quota_use_in_backlog(stats, b.rpm) if b.rpm else None,
            }
        )
    return out

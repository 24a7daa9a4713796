"""Traffic control as the reply job uses it: order, limits, cache, budget, breaker.

One :class:`Traffic` per worker process (``ctx["traffic"]``), over the worker's Redis.
The reply job calls, in this order:

1. :meth:`Traffic.in_turn` - wait for the conversation's turn (:mod:`core.traffic.ordering`);
   a busy conversation re-defers the job (arq ``Retry``), never drops it.
2. :meth:`Traffic.check_limits` - per-user/tenant limits (:mod:`core.traffic.ratelimit`);
   a notice instead of an LLM call when over.
3. :meth:`Traffic.complete` - the response cache with single-flight
   (:mod:`core.traffic.cache`), then the shared budget and breaker (:mod:`core.llm.budget`)
   around :func:`core.llm.client.complete_with_retries`, the one retry layer; with
   ``SLUICE_PROVIDERS``, the provider pool's budgets and failover (:mod:`core.llm.pool`).
4. :meth:`Traffic.error_reply` - the short reply for an LLM failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from arq.worker import Retry
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.errors import LLMError, LLMUnavailableError
from core.framework.bot import Bot
from core.infra import metrics
from core.infra.redis import Keys
from core.llm.budget import (
    BudgetGate,
    LLMBudget,
    estimate_tokens,
    quota_use_in_backlog,
    unavailable_text,
)
from core.llm.client import ChatMessage, Completion, LLMProvider, complete_with_retries
from core.llm.pool import ProviderPool, budget_lines, pool_snapshot
from core.messages import IncomingMessage, Reply
from core.responder import Responder
from core.settings import Settings
from core.traffic.cache import ResponseCache, cache_digest, cache_enabled
from core.traffic.door import ADMITTED
from core.traffic.ordering import (
    ConversationBusy,
    Slot,
    absorb_burst,
    acquire_conversation,
    count_run,
    park,
    was_merged,
)
from core.traffic.queue import queue_slot_now, reply_queues
from core.traffic.ratelimit import REMINDER, RateLimiter, limits_for, notice_text
from core.traffic.schedule import budget_score

logger = logging.getLogger(__name__)

# A job that steps aside for a busy conversation is re-deferred, which arq counts as a
# try; real re-runs (after a worker died) are counted by Sluice itself instead.
BUSY_MAX_TRIES = 100_000
REDIS_RETRY_S = 2.0

GAVE_UP = "Sorry, I couldn't answer that: it failed several times. Please try again in a minute."


@dataclass(frozen=True)
class TurnState:
    """What :meth:`Traffic.in_turn` found: what to answer, and whether to."""

    msg: IncomingMessage
    may_run: bool = True
    merged: bool = False


async def lane_counts(redis: Redis, keys: Keys) -> dict[str, dict[str, int]]:
    """Per lane: messages enqueued, started (first run) and waiting (the difference),
    counted since the prefix was first used; for ``sluice status`` and the bench."""
    raw: dict[Any, Any] = await redis.hgetall(keys.lanes())  # type: ignore[misc]
    out: dict[str, dict[str, int]] = {}
    for k, v in raw.items():
        what, _, lane = (k.decode() if isinstance(k, bytes) else str(k)).partition(":")
        out.setdefault(lane, {"enqueued": 0, "started": 0})[what] = int(v)
    for counts in out.values():
        counts["waiting"] = max(0, counts["enqueued"] - counts["started"])
    return out


async def snapshot(redis: Redis, settings: Settings) -> dict[str, Any]:
    """Traffic control at a glance, for ``sluice status`` and ``sluice bench``: the LLM
    budget counters (see :mod:`core.llm.budget`), the breaker, the cache hit ratio and the
    per-lane counts."""
    keys = Keys(settings.key_prefix)
    budget = LLMBudget(redis, keys, settings)
    stats = await budget.stats()
    hits, misses = stats.get("cache_hits", 0), stats.get("cache_misses", 0)
    rpm = settings.llm_rpm or 0
    return {
        "llm": stats,
        "breaker_open_for_s": await budget.breaker_open_for(),
        "cache_hit_ratio": hits / (hits + misses) if hits + misses else None,
        "quota_use_in_backlog": quota_use_in_backlog(stats, rpm) if rpm else None,
        "lanes": await lane_counts(redis, keys),
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


async def budget_probe(settings: Settings, redis: Redis) -> list[tuple[str, str]]:
    """``sluice status`` rows for the shared LLM budget and the breaker."""
    if settings.providers:
        return [("provider pool", f"{len(settings.providers)} providers: see Providers")]
    snap = await snapshot(redis, settings)
    llm = snap["llm"]
    limit = f"{settings.llm_rpm or 'unlimited'} rpm, {settings.llm_tpm or 'unlimited'} tpm"
    breaker = snap["breaker_open_for_s"]
    return [
        ("limit", limit),
        ("calls / tokens", f"{llm.get('calls', 0)} / {llm.get('tokens', 0)}"),
        ("provider 429s", str(llm.get("rate_limited", 0))),
        ("quota use while jobs waited", _pct(snap["quota_use_in_backlog"])),
        ("breaker", f"open for {breaker:.0f}s" if breaker else "closed"),
    ]


async def providers_probe(settings: Settings, redis: Redis) -> list[tuple[str, str]]:
    """``sluice status`` rows for the provider pool (``SLUICE_PROVIDERS``): per provider
    (and model with limits of its own) its limits, use, 429s, failures and breaker.
    Never a key."""
    rows = []
    for p in await pool_snapshot(redis, settings):
        st = p["stats"]
        name = p["provider"] if p["model"] is None else f"{p['provider']} ({p['model']})"
        limit = f"{p['rpm'] or 'unlimited'} rpm, {p['tpm'] or 'unlimited'} tpm"
        breaker = p["breaker_open_for_s"]
        rows.append(
            (
                name,
                f"{limit}; calls {st.get('calls', 0)}, tokens {st.get('tokens', 0)}, "
                f"waiting {st.get('waiting', 0)}, 429s {st.get('rate_limited', 0)}, "
                f"failures {st.get('failures', 0)}, quota use while jobs waited "
                f"{_pct(p['quota_use_in_backlog'])}, breaker "
                + (f"open for {breaker:.0f}s" if breaker else "closed"),
            )
        )
    return rows or [("", "one provider (SLUICE_PROVIDERS is not set)")]


async def cache_probe(settings: Settings, redis: Redis) -> list[tuple[str, str]]:
    """``sluice status`` rows for the response cache."""
    snap = await snapshot(redis, settings)
    llm = snap["llm"]
    return [
        ("hits / misses", f"{llm.get('cache_hits', 0)} / {llm.get('cache_misses', 0)}"),
        ("hit ratio", _pct(snap["cache_hit_ratio"])),
    ]


class Traffic:
    """Order, limits, cache and LLM budget for one worker process."""

    def __init__(
        self, redis: Redis, settings: Settings, bot: Bot, pool: ProviderPool | None = None
    ) -> None:
        self.redis = redis
        #: The provider pool (``SLUICE_PROVIDERS``); ``None``: the one provider passed
        #: to :meth:`complete`.
        self.pool = pool
        self.settings = settings
        self.bot = bot
        self.keys = Keys(settings.key_prefix)
        self.limiter = RateLimiter(redis, self.keys)
        self.budget = LLMBudget(redis, self.keys, settings)
        self.cache = ResponseCache(redis, self.keys, settings)

    @contextlib.asynccontextmanager
    async def in_turn(self, msg: IncomingMessage, job_id: str) -> AsyncIterator[TurnState]:
        """Hold the conversation while answering ``msg``.

        Yields a :class:`TurnState`: the message to answer (with a burst of quick
        follow-ups merged in when the bot asks for it), whether the job may still
        run, and whether the message was already answered as part of a burst.

        Raises:
            arq.worker.Retry: the conversation is busy; the job runs again shortly.
        """
        try:
            lock = await acquire_conversation(self.redis, self.keys, self.settings, msg, job_id)
        except ConversationBusy as e:
            logger.info(
                "conversation busy message=%s job=%s waiting for %s",
                msg.message_id,
                job_id,
                e.blocker,
            )
            parked = await self._park(msg, job_id)
            # Parked: the score park() set stays (no defer of arq's own).
            raise Retry(defer=None if parked else self.settings.order_defer_s) from e
        except (RedisError, OSError) as e:
            # Without Redis there is no order to keep: try again once it is back.
            logger.warning("cannot take the turn of message=%s: %s", msg.message_id, e)
            raise Retry(defer=REDIS_RETRY_S) from e
        try:
            merged = await was_merged(self.redis, self.keys, job_id)
            runs = await count_run(self.redis, self.keys, job_id)
            if runs == 1:
                await self.redis.hincrby(  # type: ignore[misc]
                    self.keys.lanes(), f"started:{msg.lane}", 1
                )
            if merged:
                yield TurnState(msg=msg, merged=True)
                return
            if self.bot.merge_burst_s > 0:
                msg = await absorb_burst(self.redis, self.keys, msg, self.bot.merge_burst_s)
            yield TurnState(msg=msg, may_run=runs <= self.settings.job_max_tries)
        finally:
            await lock.release()

    async def _park(self, msg: IncomingMessage, job_id: str) -> bool:
        """Park ``msg``'s job until its conversation frees (:func:`core.traffic.ordering.park`);
        ``False`` if that could not be done (the job is then simply deferred)."""
        s = self.settings
        now_ms = int(time.time() * 1000)
        queue, score_ms = queue_slot_now(s, msg, now_ms)
        try:
            await park(
                self.redis,
                self.keys,
                msg,
                mine=Slot(queue, f"{s.key_prefix}:{job_id}", score_ms),
                budget_score_ms=budget_score(s, msg, now_ms),
                arq_id_prefix=f"{s.key_prefix}:",
                queues=reply_queues(s),
                park_s=s.order_defer_s,
                budget_lines=[b.keys.llm("waiters") for b in budget_lines(self.keys, s)],
            )
        except (RedisError, OSError) as e:
            logger.warning("cannot park message=%s: %s", msg.message_id, e)
            return False
        return True

    async def check_limits(self, msg: IncomingMessage) -> Reply | None:
        """``None`` when ``msg`` may go on, else the notice (or reminder) to send.

        A message admitted at the door (:data:`core.traffic.door.ADMITTED`) was counted there:
        only the tokens per day are checked again (spent since), nothing is counted."""
        limits = limits_for(self.settings, self.bot, msg)
        if msg.meta.get(ADMITTED):
            limits = dataclasses.replace(limits, user_requests=None, tenant_requests=None)
        verdict = await self.limiter.check(msg, limits)
        if verdict.allowed:
            return None
        logger.info(
            "over limit message=%s scope=%s retry_in=%.0fs first=%s",
            msg.message_id,
            verdict.scope,
            verdict.retry_after_s,
            verdict.first_notice,
        )
        metrics.RATE_LIMIT_NOTICES.labels(verdict.scope or "user").inc()
        text = notice_text(verdict) if verdict.first_notice else REMINDER
        return Reply(text=text, kind="notice")

    async def complete(
        self,
        msg: IncomingMessage,
        job_id: str,
        responder: Responder,
        provider: LLMProvider,
        messages: list[ChatMessage],
        *,
        model: str,
        on_text: Callable[[str], Awaitable[None]] | None,
        **params: Any,
    ) -> tuple[Completion, bool]:
        """The answer to ``messages`` and whether it came from the cache.

        Raises:
            LLMError: as :func:`core.llm.client.complete_with_retries`; ``LLMUnavailableError``
                with ``retry_in_s`` set means the breaker is open.
        """
        max_tokens = int(params.get("max_tokens") or self.settings.llm_max_tokens)

        async def on_queued(wait_s: float) -> None:
            await responder.queued(wait_s)

        gate = BudgetGate(
            self.budget,
            member=job_id,
            priority_ms=budget_score(self.settings, msg, int(time.time() * 1000)),
            est_tokens=estimate_tokens(messages, max_tokens),
            on_queued=on_queued,
        )

        async def call() -> Completion:
            if self.pool is not None:
                completion = await self.pool.complete(
                    messages,
                    model=model,
                    fallback_model=self.bot.fallback_model or self.settings.fallback_model,
                    member_id=gate.member,
                    priority_ms=gate.priority_ms,
                    est_tokens=gate.est_tokens,
                    on_queued=on_queued,
                    on_text=on_text,
                    **params,
                )
            else:
                completion = await complete_with_retries(
                    provider,
                    messages,
                    model=model,
                    retries=self.settings.llm_retries,
                    on_text=on_text,
                    gate=gate,
                    **params,
                )
            await self.limiter.record_tokens(msg, completion.tokens_in + completion.tokens_out)
            return completion

        if not cache_enabled(self.settings, self.bot, msg):
            return await call(), False
        completion, cached = await self.cache.single_flight(
            self._cache_key(msg, model, params, messages), job_id, call
        )
        await self.budget.count("cache_hits" if cached else "cache_misses")
        (metrics.CACHE_HITS if cached else metrics.CACHE_MISSES).inc()
        return completion, cached

    def _cache_key(
        self, msg: IncomingMessage, model: str, params: dict[str, Any], messages: list[ChatMessage]
    ) -> str:
        digest = cache_digest(msg.tenant, self.bot.name, model, params, messages)
        return self.cache.key(msg.tenant, digest)

    async def cached(
        self, msg: IncomingMessage, messages: list[ChatMessage], *, model: str, **params: Any
    ) -> Completion | None:
        """The cached answer to exactly this request (as :meth:`complete` would find it),
        without waiting for a leader or calling the model; counted as a hit when found."""
        if not cache_enabled(self.settings, self.bot, msg):
            return None
        hit = await self.cache.get(self._cache_key(msg, model, params, messages))
        if hit is not None:
            await self.budget.count("cache_hits")
            metrics.CACHE_HITS.inc()
        return hit

    async def error_reply(self, error: LLMError, apology: str) -> Reply:
        """The short reply for a failed LLM call: "unavailable" while the breaker is open."""
        retry_in = error.retry_in_s if isinstance(error, LLMUnavailableError) else None
        if retry_in is None:
            open_for = await self.budget.breaker_open_for()
            retry_in = open_for or None
        if retry_in:
            return Reply(text=unavailable_text(retry_in), kind="error")
        return Reply(text=apology, kind="error")

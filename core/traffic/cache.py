"""Response cache: exact match on the whole context, per tenant, single-flight.

The key is a SHA-256 of a normalised JSON document: tenant, bot name, model, the
call's parameters, and every message sent to the model (system prompt, earlier
turns, the new text; text normalised to NFC with runs of whitespace collapsed). It
lives under ``{prefix}:cache:{tenant}:`` (so a tenant's purge drops it, and no key
can be shared across tenants) for ``SLUICE_CACHE_TTL_S``.

Single-flight: the first job to miss takes a short, renewed lock next to the key
and calls the model; identical requests arriving meanwhile wait for its result
instead of calling too. If the leader fails, a waiter takes over.

A bot opts out with ``Bot(cache_answers=False)``, a channel with
``Bot(no_cache_channels=frozenset({...}))``; ``SLUICE_CACHE_TTL_S=0`` turns it off.
``sluice cache clear [--tenant T]`` drops cached answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis

from core.framework.bot import Bot
from core.infra.lock import OwnerLock
from core.infra.redis import Keys, glob_escape
from core.llm.client import ChatMessage, Completion
from core.messages import IncomingMessage
from core.settings import Settings

logger = logging.getLogger(__name__)

LOCK_TTL_MS = 10_000
_WS = re.compile(r"\s+")


def _norm_text(text: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        return _norm_text(value)
    if isinstance(value, dict):
        return {str(k): _norm(v) for k, v in sorted(value.items()) if v is not None}
    if isinstance(value, list | tuple):
        return [_norm(v) for v in value]
    return value


def cache_digest(
    tenant: str, bot: str, model: str, params: dict[str, Any], messages: Sequence[ChatMessage]
) -> str:
    """The normalised digest of one model request."""
    doc = {
        "tenant": tenant,
        "bot": bot,
        "model": model,
        "params": _norm(params),
        "messages": _norm(list(messages)),
    }
    raw = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def cache_enabled(settings: Settings, bot: Bot, msg: IncomingMessage) -> bool:
    """Whether answers for ``msg`` may be served from and stored in the cache."""
    return (
        settings.cache_ttl_s > 0 and bot.cache_answers and msg.channel not in bot.no_cache_channels
    )


def cacheable(completion: Completion) -> bool:
    """Only complete, plain-text answers are kept (no tool calls, not cut at max_tokens)."""
    return (
        completion.finish_reason == "stop" and not completion.tool_calls and bool(completion.text)
    )


class ResponseCache:
    """Get, store and single-flight cached answers in Redis."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl_s = settings.cache_ttl_s
        self._max_wait_s = settings.llm_budget_wait_s + settings.llm_timeout_s * 2

    def key(self, tenant: str, digest: str) -> str:
        """The Redis key of one cached answer."""
        return self._keys.cache(tenant, digest)

    async def get(self, key: str) -> Completion | None:
        """The cached answer under ``key``, if any."""
        raw = await self._redis.get(key)
        if raw is None:
            return None
        data = json.loads(raw)
        return Completion(
            text=data["text"],
            model=data["model"],
            tokens_in=0,
            tokens_out=0,
            finish_reason="stop",
        )

    async def put(self, key: str, completion: Completion) -> None:
        """Store an answer for ``SLUICE_CACHE_TTL_S``."""
        doc = {"text": completion.text, "model": completion.model, "ts": time.time()}
        await self._redis.set(key, json.dumps(doc), ex=self._ttl_s)

    async def single_flight(
        self, key: str, owner: str, compute: Callable[[], Awaitable[Completion]]
    ) -> tuple[Completion, bool]:
        """The cached answer, or ``compute()``'s, computed once for concurrent callers.

        Returns ``(completion, from_cache)``. Errors of ``compute`` propagate to the
        caller that ran it; the waiters then try again themselves.
        """
        lock = OwnerLock(self._redis, f"{key}:lock", owner, LOCK_TTL_MS, what="cache")
        deadline = time.monotonic() + self._max_wait_s
        delay = 0.02
        while True:
            hit = await self.get(key)
            if hit is not None:
                return hit, True
            if await lock.acquire():
                try:
                    # The previous leader may have stored the answer and unlocked between
                    # our miss above and taking the lock: look once more before calling.
                    hit = await self.get(key)
                    if hit is not None:
                        return hit, True
                    completion = await compute()
                    if cacheable(completion):
                        await self.put(key, completion)
                    return completion, False
                finally:
                    await lock.release()
            if time.monotonic() > deadline:
                # The leader is far too slow; answer on our own rather than wait on.
                return await compute(), False
            await asyncio.sleep(delay)
            delay = min(0.2, delay * 1.5)


async def clear_cache(redis: Redis, keys: Keys, tenant: str | None = None) -> int:
    """Delete cached answers (of one tenant, or all); returns how many were deleted."""
    pattern = keys.cache_pattern(tenant) if tenant else glob_escape(f"{keys.prefix}:cache:") + "*"
    deleted = 0
    batch: list[Any] = []
    async for k in redis.scan_iter(match=pattern, count=500):
        batch.append(k)
        if len(batch) >= 500:
            deleted += int(await redis.delete(*batch))
            batch = []
    if batch:
        deleted += int(await redis.delete(*batch))
    return deleted

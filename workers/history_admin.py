"""Data management: export and purge one user's or one tenant's messages everywhere.

"Everywhere" is SQL, the unflushed backlog and the hot windows in Redis, and (for
purge) the response cache. A user id is matched in every tenant unless a tenant is
given too. An answer belongs to the user it answered.

What a purge deletes:

- ``--tenant T``: every stored message of T (SQL), every backlog entry of T, every
  hot window of T's conversations, T's overflow marks, and every cache key under
  ``{prefix}:cache:T:*``.
- ``--user U``: U's messages and the answers to U (SQL, backlog), U's turns inside
  hot windows (other people's turns in a shared channel stay), and the whole cache
  of every tenant where U has messages: cache entries are keyed by a hash of the
  context, so the ones built from U's words cannot be told apart; other users of
  those tenants lose only cached answers, which are recomputed on demand.

Both also delete, for the matching messages of the last 7 days
(:data:`TRACES_SINCE_S`; longer than any of these keys live), what their reply jobs
left in Redis: the platform delivery state (ids and texts of posted parts), a reply
kept for another delivery attempt, and arq's job result (which holds the job's
arguments, i.e. the message).

Messages arriving while a purge runs are not covered (run it again, or block the
user first). The flush is held off during a purge so that it cannot write back rows
the purge has just removed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from arq.constants import result_key_prefix
from redis.asyncio import Redis
from redis.exceptions import WatchError
from sqlalchemy.ext.asyncio import AsyncEngine

from core.errors import HistoryError
from core.history import make_record, split_conversation_id, unpack_record, unpack_turn
from core.messages import reply_job_id
from core.redis import Keys, client, glob_escape
from core.settings import Settings
from core.store import (
    Record,
    delete_records,
    iter_records,
    record_key,
    tenants_of_user,
    user_message_keys,
)
from workers.flush import GROUP


def _matches(rec: Record, user: str | None, tenant: str | None) -> bool:
    return (user is None or rec["user"] == user) and (tenant is None or rec["tenant"] == tenant)


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _backlog_entries(
    redis: Redis, keys: Keys, chunk: int = 1000
) -> AsyncIterator[tuple[bytes, Record]]:
    start = "-"
    while True:
        batch: list[Any] = await redis.xrange(keys.history_backlog(), start, "+", count=chunk)
        for entry_id, fields in batch:
            blob = fields.get(b"r", fields.get("r"))
            if blob is not None:
                yield entry_id, unpack_record(blob)
        if len(batch) < chunk:
            return
        start = "(" + _str(batch[-1][0])


async def _hot_windows(
    redis: Redis, keys: Keys, tenant: str | None
) -> AsyncIterator[tuple[str, str]]:
    """``(key, conversation_id)`` of hot windows (of one tenant, when given)."""
    head = keys.history("")
    async for raw in redis.scan_iter(keys.history_pattern(), count=1000):
        key = _str(raw)
        conversation_id = key[len(head) :]
        try:
            _, conv_tenant, _, _ = split_conversation_id(conversation_id)
        except HistoryError:
            continue  # not a hot window (another key under the same pattern)
        if tenant is None or conv_tenant == tenant:
            yield key, conversation_id


async def export_records(
    redis: Redis,
    keys: Keys,
    engine: AsyncEngine,
    *,
    user: str | None = None,
    tenant: str | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Everything stored about a user or tenant, each with its ``source``.

    SQL first (oldest first), then what the backlog holds and SQL does not yet, then
    hot-window turns found in neither (turns kept only there at the backlog bound).
    """
    if user is None and tenant is None:
        raise ValueError("give a user, a tenant, or both")
    seen: set[tuple[str, str, str]] = set()
    async for rec in iter_records(engine, user=user, tenant=tenant):
        seen.add(record_key(rec))
        yield {"source": "sql", **rec}
    async for _, rec in _backlog_entries(redis, keys):
        if _matches(rec, user, tenant) and record_key(rec) not in seen:
            seen.add(record_key(rec))
            yield {"source": "backlog", **rec}
    async for key, conversation_id in _hot_windows(redis, keys, tenant):
        raw: list[Any] = await redis.lrange(key, 0, -1)  # type: ignore[misc]
        for item in raw:
            rec = make_record(unpack_turn(item), conversation_id)
            if _matches(rec, user, tenant) and record_key(rec) not in seen:
                seen.add(record_key(rec))
                yield {"source": "hot", **rec}


TRACES_SINCE_S = 7 * 86400
"""How far back a purge looks for reply-job traces in Redis (they live a day at most)."""


@dataclass
class PurgeResult:
    """What a purge deleted."""

    sql_rows: int = 0
    backlog_entries: int = 0
    hot_turns: int = 0
    hot_windows: int = 0
    cache_keys: int = 0
    job_traces: int = 0
    tenants: set[str] = field(default_factory=set)


async def _hold_flush_lock(redis: Redis, keys: Keys, timeout_s: float = 120.0) -> str:
    token = f"purge-{uuid.uuid4().hex}"
    deadline = time.monotonic() + timeout_s
    while not await redis.set(keys.history_flush_lock(), token, nx=True, px=300_000):
        if time.monotonic() > deadline:
            raise TimeoutError("a flush has held the lock for too long; try again")
        await asyncio.sleep(0.2)
    return token


async def purge(
    redis: Redis,
    keys: Keys,
    engine: AsyncEngine,
    *,
    user: str | None = None,
    tenant: str | None = None,
    traces_since_s: float = TRACES_SINCE_S,
) -> PurgeResult:
    """Delete a user's or tenant's messages from SQL, the backlog, hot windows and cache,
    and what their reply jobs of the last ``traces_since_s`` left in Redis (delivery
    state, a reply kept for another delivery attempt, arq's job result)."""
    if user is None and tenant is None:
        raise ValueError("give a user, a tenant, or both")
    result = PurgeResult()
    token = await _hold_flush_lock(redis, keys)
    try:
        messages: set[tuple[str, str, str]] = set()
        result.backlog_entries = await _purge_backlog(
            redis, keys, user, tenant, result.tenants, messages
        )

        if user is not None:
            result.tenants |= await tenants_of_user(engine, user)
        messages |= await user_message_keys(
            engine, user=user, tenant=tenant, since_ts=time.time() - traces_since_s
        )
        result.sql_rows = await delete_records(engine, user=user, tenant=tenant)
        result.job_traces = await _purge_job_traces(redis, keys, messages, tenant)

        async for key, conversation_id in _hot_windows(redis, keys, tenant):
            removed = await _purge_window(redis, key, conversation_id, user, tenant)
            if removed:
                result.hot_turns += removed
                result.tenants.add(split_conversation_id(conversation_id)[1])
        if tenant is not None:
            result.tenants.add(tenant)
            async for m in redis.sscan_iter(keys.history_overflow()):
                if split_conversation_id(_str(m))[1] == tenant:
                    await redis.srem(keys.history_overflow(), m)  # type: ignore[misc]
        for t in sorted(result.tenants):
            batch = [k async for k in redis.scan_iter(keys.cache_pattern(t), count=1000)]
            for i in range(0, len(batch), 1000):
                result.cache_keys += int(await redis.unlink(*batch[i : i + 1000]))
    finally:
        if _str(await redis.get(keys.history_flush_lock()) or b"") == token:
            await redis.delete(keys.history_flush_lock())
    return result


async def _purge_backlog(
    redis: Redis,
    keys: Keys,
    user: str | None,
    tenant: str | None,
    tenants: set[str],
    messages: set[tuple[str, str, str]],
) -> int:
    """Delete matching backlog entries (acknowledged too, if a flush had claimed them);
    adds their tenants to ``tenants`` and the users' own messages to ``messages``."""
    doomed: list[bytes] = []
    async for entry_id, rec in _backlog_entries(redis, keys):
        if _matches(rec, user, tenant):
            doomed.append(entry_id)
            tenants.add(rec["tenant"])
            if rec["role"] == "user":
                messages.add((rec["platform"], rec["tenant"], rec["message_id"]))
    for i in range(0, len(doomed), 1000):
        part = doomed[i : i + 1000]
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xack(keys.history_backlog(), GROUP, *part)
            pipe.xdel(keys.history_backlog(), *part)
            await pipe.execute()
    return len(doomed)


async def _purge_job_traces(
    redis: Redis, keys: Keys, messages: set[tuple[str, str, str]], tenant: str | None
) -> int:
    """Delete what the reply jobs of ``messages`` (and, for a tenant, of all its
    messages: the tenant is part of a job id) left in Redis; returns how many keys."""
    doomed: list[str] = []
    if tenant is not None:
        job_ids = reply_job_id("*", glob_escape(tenant), "*")
        for pattern in (
            keys.delivered(job_ids),
            keys.undelivered(job_ids),
            f"{result_key_prefix}{keys.prefix}:{job_ids}",
        ):
            doomed += [_str(k) async for k in redis.scan_iter(pattern, count=1000)]
    for platform, tenant, message_id in messages:
        job_id = reply_job_id(platform, tenant, message_id)
        doomed += [
            keys.delivered(job_id),
            keys.undelivered(job_id),
            f"{result_key_prefix}{keys.prefix}:{job_id}",
        ]
    deleted = 0
    for i in range(0, len(doomed), 1000):
        deleted += int(await redis.unlink(*doomed[i : i + 1000]))
    return deleted


async def _purge_window(
    redis: Redis, key: str, conversation_id: str, user: str | None, tenant: str | None
) -> int:
    """Remove matching turns from one hot window atomically; returns how many."""
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(key)
                raw: list[Any] = await pipe.lrange(key, 0, -1)  # type: ignore[misc]
                ttl = int(await pipe.ttl(key))
                keep = [
                    item
                    for item in raw
                    if not _matches(make_record(unpack_turn(item), conversation_id), user, tenant)
                ]
                if len(keep) == len(raw):
                    await pipe.unwatch()  # type: ignore[no-untyped-call]
                    return 0
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.delete(key)
                if keep:
                    pipe.rpush(key, *keep)
                    if ttl > 0:
                        pipe.expire(key, ttl)
                await pipe.execute()
                return len(raw) - len(keep)
            except WatchError:
                continue  # the window changed meanwhile: read it again


def open_clients(settings: Settings) -> tuple[Redis, Keys, AsyncEngine]:
    """A Redis client, the key names and an engine for the admin commands."""
    from core.errors import ConfigError
    from core.store import make_engine

    if not settings.redis_url and not settings.redis_sentinels:
        raise ConfigError("REDIS_URL is not set (history lives in Redis before SQL)")
    return client(settings), Keys(settings.key_prefix), make_engine(settings)

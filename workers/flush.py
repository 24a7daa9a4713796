"""The ``flush_history`` job: the Redis backlog to SQL, in batches, exactly once.

How nothing is lost and nothing is written twice, whatever dies when:

1. One flush at a time across all workers: a Redis lock (``SET NX PX``) renewed
   while flushing. A dead flusher's lock frees itself after
   ``history_flush_lock_ttl_s``.
2. Entries are *claimed* with ``XREADGROUP`` (consumer group ``flush``, one consumer
   name shared by every flusher, since only the lock holder reads): a claimed entry
   stays in the group's pending list until acknowledged. A new flusher first reads
   that pending list (``XREADGROUP ... 0``): the batch a dead flusher left half-done.
3. A batch is written in ONE transaction with ``INSERT ... ON CONFLICT DO NOTHING``
   on the message's identity, and only *after the commit* acknowledged and deleted
   from the stream (``XACK`` + ``XDEL``). Killed before the commit: the transaction
   rolls back and the entries are still pending. Killed after the commit, before the
   ack: the next flush inserts them again and the database ignores them. If a lock
   ever expired under a stalled flusher, the same argument covers two flushers.
4. A purge cannot be undone by a flush that stalled past its lock: the flush reads
   the purge epoch (``history_fence``) before it reads the backlog, and each insert
   transaction compares it before committing (``core.history.store.insert_values``). A purge
   increments it in the transaction that deletes the rows, so a flush that started
   before the purge rolls back (:class:`core.history.store.FlushFenced`), stops, and leaves
   its batch pending for the next flush (minus the entries the purge deleted).

When the database fails, the failure count and the time of the next attempt go to
the stats hash and later runs wait with exponential backoff (capped at
``history_flush_backoff_max_s``); the backlog meanwhile grows up to its bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from core.errors import ConfigError, HistoryError
from core.history.hot import FLUSH_GROUP, make_record, unpack_turn, unpack_values
from core.history.store import (
    FlushFenced,
    ensure_schema,
    fence_epoch,
    insert_batch,
    insert_values,
    is_postgres,
)
from core.infra import metrics
from core.infra.lock import OwnerLock
from core.infra.logs import redact
from core.infra.redis import Keys
from core.settings import Settings

logger = logging.getLogger(__name__)

GROUP = FLUSH_GROUP
CONSUMER = "flusher"
PAUSE_ENV = "SLUICE_TEST_FLUSH_PAUSE"
"""Test-only: ``<point>:<batch>`` makes a flush print ``PAUSED`` and hang there, so that a
test can SIGKILL it; points are ``after_read``, ``before_commit``, ``after_commit``,
``after_ack``."""


@dataclass
class FlushResult:
    """What one flush run did."""

    read: int = 0
    inserted: int = 0
    batches: int = 0
    recovered: int = 0
    skipped: str | None = None
    error: str | None = None
    fenced: bool = False
    seconds: float = 0.0

    def __str__(self) -> str:
        if self.skipped:
            return f"skipped ({self.skipped})"
        s = (
            f"read={self.read} inserted={self.inserted} batches={self.batches} "
            f"recovered={self.recovered} in {self.seconds:.2f}s"
        )
        if self.fenced:
            s += " fenced (a purge ran meanwhile; the batch is read again next time)"
        return f"{s} error={self.error}" if self.error else s


class Flusher:
    """Moves the backlog to SQL; one instance per worker process."""

    def __init__(self, redis: Redis, settings: Settings, engine: AsyncEngine) -> None:
        self.redis = redis
        self.settings = settings
        self.engine = engine
        self.keys = Keys(settings.key_prefix)
        self._schema_ok = False
        self._pause = _parse_pause(os.environ.get(PAUSE_ENV))

    def job_budget_s(self) -> float:
        """How long a flush job may run: its setting, within the job timeout."""
        return min(self.settings.history_flush_max_s, 0.8 * self.settings.job_timeout_s)

    async def run(self, *, max_s: float | None = None, ignore_backoff: bool = False) -> FlushResult:
        """One flush run: until the backlog is empty or ``max_s`` has passed."""
        started = time.monotonic()
        result = FlushResult()
        budget = max_s if max_s is not None else self.job_budget_s()
        if not ignore_backoff and await self._backing_off():
            result.skipped = "backing off after database errors"
            return result
        lock = OwnerLock(
            self.redis,
            self.keys.history_flush_lock(),
            uuid.uuid4().hex,
            int(self.settings.history_flush_lock_ttl_s * 1000),
            what="history flush",
        )
        if not await lock.acquire():
            result.skipped = "another flush is running"
            return result
        try:
            # A lost lock (expired, taken by another flush) stops the run after its batch.
            await self._flush(result, started, budget, lock.lost)
        except FlushFenced as e:
            # Not a database failure: no backoff. What this run had not committed is
            # still pending (what the purge deleted is gone) and is read again.
            result.fenced = True
            logger.warning("history flush stopped: %s; rolled back, nothing written", e)
        except (SQLAlchemyError, OSError, HistoryError) as e:
            result.error = f"{type(e).__name__}: {e}"[:500]
            await self._failed(result.error)
        except RedisError as e:
            # Nothing was acknowledged that is not committed; the next run carries on.
            result.error = f"Redis: {e}"[:500]
            logger.warning("history flush interrupted by Redis: %s", e)
        finally:
            try:
                await lock.release()
            except RedisError as e:
                logger.warning("could not release the flush lock (it expires by itself): %s", e)
            result.seconds = time.monotonic() - started
        return result

    async def _flush(
        self, result: FlushResult, started: float, budget: float, lost: asyncio.Event
    ) -> None:
        if not self._schema_ok:
            await ensure_schema(self.settings, self.engine)
            self._schema_ok = True
        # Read before anything is read from Redis: a purge after this point fences
        # out every insert of this run.
        fence = await fence_epoch(self.engine)
        await self._ensure_group()
        # Up to `concurrency` batches are written at once, each in its own transaction
        # and acknowledged after its own commit (Postgres; SQLite has a single writer).
        concurrency = 1 if not is_postgres(self.engine) else self.settings.history_flush_concurrency
        in_flight: set[asyncio.Task[int]] = set()
        after: str | None = "0"  # pending entries first (left by a dead flusher), then new
        try:
            while not lost.is_set() and time.monotonic() - started < budget:
                entries = await self._claim(after or ">")
                if not entries and after is not None:
                    after = None
                    continue
                if not entries:
                    break
                if after is not None:
                    after = _str(entries[-1][0])
                result.read += len(entries)
                result.batches += 1
                in_flight.add(asyncio.create_task(self._write(entries, result.batches, fence)))
                if len(in_flight) >= concurrency:
                    done, in_flight = await asyncio.wait(
                        in_flight, return_when=asyncio.FIRST_COMPLETED
                    )
                    result.inserted += sum(t.result() for t in done)
            if in_flight:
                done, in_flight = await asyncio.wait(in_flight)
                result.inserted += sum(t.result() for t in done)
        finally:
            for t in in_flight:
                t.cancel()
            if in_flight:
                await asyncio.wait(in_flight)
        if not lost.is_set() and time.monotonic() - started < budget:
            result.recovered = await self._recover_overflow(started, budget, fence)
        await self.redis.hset(  # type: ignore[misc]
            self.keys.history_stats(),
            mapping={
                "last_flush_ts": time.time(),
                "failures": 0,
                "last_error": "",
                "next_attempt_ts": 0,
                "last_flush_inserted": result.inserted,
            },
        )
        if result.read or result.recovered:
            logger.info("history flush: %s", result)

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(
                self.keys.history_backlog(), GROUP, id="0", mkstream=True
            )
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _claim(self, after: str) -> list[tuple[bytes, bytes | None]]:
        """Claim a batch: ``after='>'`` new entries, else pending ones after that id."""
        resp: Any = await self.redis.xreadgroup(
            GROUP,
            CONSUMER,
            {self.keys.history_backlog(): after},
            count=self.settings.history_flush_batch,
        )
        if not resp:
            return []
        entries: list[tuple[bytes, bytes | None]] = []
        for entry_id, fields in resp[0][1]:
            blob = None
            if fields:
                blob = fields.get(b"r", fields.get("r"))
            entries.append((entry_id, blob))
        return entries

    async def _write(
        self, entries: list[tuple[bytes, bytes | None]], batch_no: int, fence: int
    ) -> int:
        records: list[list[Any]] = []
        for entry_id, blob in entries:
            if blob is None:
                continue  # deleted from the stream while pending (a purge): just ack it
            try:
                records.append(unpack_values(blob))
            except (HistoryError, ValueError) as e:
                # Never dropped silently: parked for an operator, and said so.
                logger.error(
                    "unreadable backlog entry %r parked in %s: %s",
                    entry_id,
                    self.keys.history_backlog() + ":bad",
                    e,
                )
                await self.redis.rpush(self.keys.history_backlog() + ":bad", blob)  # type: ignore[misc]
        await self._pause_at("after_read", batch_no)
        t0 = time.monotonic()
        inserted = await insert_values(
            self.engine,
            records,
            before_commit=lambda: self._pause_at("before_commit", batch_no),
            fence=fence,
        )
        metrics.HISTORY_FLUSH_SECONDS.observe(time.monotonic() - t0)
        metrics.HISTORY_FLUSHED_ROWS.inc(inserted)
        await self._pause_at("after_commit", batch_no)
        ids = [e[0] for e in entries]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.history_backlog(), GROUP, *ids)
            pipe.xdel(self.keys.history_backlog(), *ids)
            await pipe.execute()
        await self._pause_at("after_ack", batch_no)
        return inserted

    async def _recover_overflow(self, started: float, budget: float, fence: int) -> int:
        """Store the hot windows of conversations whose turns missed the backlog."""
        key = self.keys.history_overflow()
        total = 0
        while time.monotonic() - started < budget:
            if await self.redis.xlen(self.keys.history_backlog()) > 0:
                break  # new backlog first; the overflow waits for the next run
            members: Any = await self.redis.srandmember(key, 100)  # type: ignore[misc]
            if not members:
                break
            for m in members:
                conversation_id = m.decode() if isinstance(m, bytes) else m
                raw: list[Any] = await self.redis.lrange(  # type: ignore[misc]
                    self.keys.history(conversation_id), 0, -1
                )
                records = [make_record(unpack_turn(r), conversation_id) for r in raw]
                total += await insert_batch(self.engine, records, fence=fence)
                await self.redis.srem(key, m)  # type: ignore[misc]
            if total:
                logger.warning(
                    "history flush: stored %d overflowed messages from hot windows", total
                )
        return total

    async def _backing_off(self) -> bool:
        raw: Any = await self.redis.hget(self.keys.history_stats(), "next_attempt_ts")  # type: ignore[misc]
        return bool(raw) and float(raw) > time.time()

    async def _failed(self, error: str) -> None:
        key = self.keys.history_stats()
        failures = int(await self.redis.hincrby(key, "failures", 1))  # type: ignore[misc]
        delay = min(self.settings.history_flush_backoff_max_s, 0.5 * 2 ** min(failures, 20))
        await self.redis.hset(  # type: ignore[misc]
            key,
            mapping={
                "last_error": redact(error),  # shown by `sluice status`; kept in Redis
                "last_error_ts": time.time(),
                "next_attempt_ts": time.time() + delay,
            },
        )
        logger.warning(
            "history flush failed (%d in a row; next try in %.1fs): %s", failures, delay, error
        )

    async def _pause_at(self, point: str, batch_no: int) -> None:
        if self._pause is not None and self._pause == (point, batch_no):
            print(f"PAUSED {point} {batch_no}", flush=True)
            # Freeze the whole process right here (every task, not just this batch's),
            # as a SIGKILL at this instant would; the test then kills it.
            os.kill(os.getpid(), signal.SIGSTOP)


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _parse_pause(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    point, _, batch = value.partition(":")
    return point, int(batch or "1")


async def flush_history(ctx: dict[str, Any]) -> str:
    """arq job: one flush run (cron every ``history_flush_interval_s``, or sooner)."""
    flusher: Flusher = ctx["flusher"]
    try:
        result = await flusher.run()
    except ConfigError as e:
        logger.error("history flush stopped: %s", e)
        return f"error: {e}"
    return str(result)


async def apply_retention(ctx: dict[str, Any]) -> str:
    """arq job: delete messages older than ``SLUICE_RETENTION_DAYS`` (0 keeps everything)."""
    from core.history.store import delete_older_than

    settings: Settings = ctx["settings"]
    if settings.retention_days <= 0:
        return "retention off"
    try:
        # Within the job timeout; what is left is deleted by the next hourly run.
        n = await delete_older_than(
            ctx["db"], settings.retention_days, max_s=0.8 * settings.job_timeout_s
        )
    except (SQLAlchemyError, OSError) as e:
        logger.warning("retention failed: %s", e)
        return f"error: {e}"
    if n:
        logger.info("retention: deleted %d messages older than %d days", n, settings.retention_days)
    return f"deleted {n}"


async def flush_all(settings: Settings, *, max_s: float = 600.0) -> FlushResult:
    """Flush until the backlog is empty (the CLI and the tests' subprocess use this)."""
    from core.history.store import make_engine
    from core.infra.redis import client

    redis: Redis = client(settings)
    engine = make_engine(settings)
    try:
        flusher = Flusher(redis, settings, engine)
        total = FlushResult()
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            r = await flusher.run(max_s=deadline - time.monotonic(), ignore_backoff=True)
            if r.skipped:
                await asyncio.sleep(0.1)
                continue
            total.read += r.read
            total.inserted += r.inserted
            total.batches += r.batches
            total.recovered += r.recovered
            total.fenced = total.fenced or r.fenced
            total.error = r.error
            if r.error or (r.read == 0 and r.recovered == 0):
                break
        return total
    finally:
        await redis.aclose()
        await engine.dispose()


def main() -> None:
    """``python -m workers.flush``: flush everything now, with settings from the env."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    result = asyncio.run(flush_all(Settings()))
    print(f"DONE {result}", flush=True)
    sys.exit(1 if result.error else 0)


if __name__ == "__main__":
    main()

"""Conversation history: the hot window in Redis, a write-behind backlog, SQL behind both.

Each conversation keeps its last ``history_max_turns`` turns in a Redis list, so a
worker builds the model's context with one ``LRANGE`` and never touches SQL on the
hot path. Every turn is also added to one Redis stream, the *backlog*, atomically
with the hot window (one Lua script: ``RPUSH``/``LTRIM``/``EXPIRE`` + ``XADD``); the
``flush_history`` job (``workers/flush.py``) moves the backlog to SQL in batches.

When Redis no longer holds a conversation (it expired, or Redis lost its data),
:meth:`HotHistory.recent` reads the tail from SQL and warms the hot window again.

Bodies of at least ``history_compress_min_bytes`` are zstd-compressed in Redis (both
in the hot window and the backlog); see docs/benchmarks.md for the measurement.

At the backlog bound (``history_backlog_max``) chat goes on: turns still go to the
hot window, but instead of a backlog entry the conversation id is added to an
*overflow* set; the flush later stores those conversations' hot windows (idempotent
by message id). This is logged at ERROR once a minute per process and counted in
:func:`backlog_status`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import zstandard
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from core.errors import HistoryError
from core.history.store import RECORD_FIELDS, Record, conversation_tail
from core.infra.redis import Keys
from core.messages import IncomingMessage, StoredFile, Turn

logger = logging.getLogger(__name__)

SQL_FALLBACK_TIMEOUT_S = 2.0
"""Longest wait for SQL context before answering without it (chat never waits on SQL)."""
SQL_FALLBACK_PAUSE_S = 30.0
"""After a failed SQL read, how long :meth:`HotHistory.recent` does not try SQL again."""
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_RAW = b"a"
_ZSTD = b"A"
_compressor = zstandard.ZstdCompressor(level=3)
_decompressor = zstandard.ZstdDecompressor()

# KEYS: hot window, backlog, overflow set, stats hash[, the job's purge mark].
# ARGV: max_turns, ttl_s, backlog_max, conversation_id, n_window, window entries...,
#       backlog entries...
# Returns {-1, 0} (nothing written) when a purge marked the job meanwhile.
_APPEND_LUA = """
if KEYS[5] and redis.call('EXISTS', KEYS[5]) == 1 then return {-1, 0} end
local n = tonumber(ARGV[5])
if n > 0 then
  redis.call('RPUSH', KEYS[1], unpack(ARGV, 6, 5 + n))
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
end
local len = redis.call('XLEN', KEYS[2])
local nb = #ARGV - 5 - n
if nb == 0 then return {len, 0} end
if len + nb > tonumber(ARGV[3]) then
  redis.call('SADD', KEYS[3], ARGV[4])
  redis.call('HINCRBY', KEYS[4], 'overflowed', nb)
  return {len, -nb}
end
for i = 6 + n, #ARGV do
  redis.call('XADD', KEYS[2], '*', 'r', ARGV[i])
end
return {len + nb, nb}
"""

# Warm a hot window from SQL only if nothing was appended meanwhile.
_WARM_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 3))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


# --- Encoding ---------------------------------------------------------------------------


_OLDEST_FIELDS = 16  # fields of the first backlog format (before `tool`)


def pack_record(rec: Record, compress_min_bytes: int) -> bytes:
    """A backlog entry: a msgpack array of the fields in :data:`RECORD_FIELDS` order
    (field names would cost ~130 bytes per entry), zstd-compressed when the body is
    long enough. The first byte says which."""
    raw: bytes = msgpack.packb([rec[f] for f in RECORD_FIELDS], use_bin_type=True)  # type: ignore[literal-required]
    if len(rec["text"].encode("utf-8", "surrogatepass")) >= compress_min_bytes:
        return _ZSTD + _compressor.compress(raw)
    return _RAW + raw


def unpack_values(blob: bytes) -> list[Any]:
    """The values (in :data:`RECORD_FIELDS` order) of a :func:`pack_record` entry."""
    if blob[:1] == _ZSTD:
        blob = _RAW + _decompressor.decompress(blob[1:])
    if blob[:1] != _RAW:
        raise HistoryError(f"unknown backlog entry format {blob[:1]!r}")
    try:
        values = msgpack.unpackb(blob[1:], raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise HistoryError(f"malformed backlog entry: {e}") from e
    if not isinstance(values, list) or not _OLDEST_FIELDS <= len(values) <= len(RECORD_FIELDS):
        raise HistoryError("malformed backlog entry")
    # Entries written by an older Sluice lack the newer trailing fields.
    return values + [None] * (len(RECORD_FIELDS) - len(values))


def unpack_record(blob: bytes) -> Record:
    """Parse what :func:`pack_record` wrote."""
    rec: Record = dict(zip(RECORD_FIELDS, unpack_values(blob), strict=True))  # type: ignore[assignment]
    return rec


def pack_turn(turn: Turn, compress_min_bytes: int) -> bytes:
    """A hot-window entry: JSON, or a zstd frame of it when the body is long enough."""
    data = turn.model_dump_json().encode()
    if len(turn.text.encode("utf-8", "surrogatepass")) >= compress_min_bytes:
        return _compressor.compress(data)
    return data


def unpack_turn(raw: bytes | str) -> Turn:
    """Parse a hot-window entry (plain JSON or zstd-compressed JSON)."""
    if isinstance(raw, bytes) and raw[:4] == ZSTD_MAGIC:
        raw = _decompressor.decompress(raw)
    return Turn.model_validate_json(raw)


def storable(turn: Turn) -> Turn:
    """The turn, or a copy whose lone surrogates became U+FFFD.

    Adapters refuse such text, but a model's answer could still carry one; UTF-8 (Redis
    payloads, SQL) cannot hold it, and losing one character beats losing the turn.
    """
    try:
        turn.text.encode("utf-8")
    except UnicodeEncodeError:
        logger.warning("message %s has invalid Unicode; stored with U+FFFD", turn.message_id)
        fixed = turn.text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        return turn.model_copy(update={"text": fixed})
    return turn


def split_conversation_id(conversation_id: str) -> tuple[str, str, str, str | None]:
    """``(platform, tenant, channel, thread)`` of an id made by ``IncomingMessage``.

    Platform, tenant and channel ids hold no ``:``; a thread id may (a Discord guild
    channel's per-user conversation is thread ``user:<id>``), so it is the rest.
    """
    parts = conversation_id.split(":", 3)
    if len(parts) != 4 or not all(parts):
        raise HistoryError(f"not a conversation id: {conversation_id!r}")
    platform, tenant, channel, thread = parts
    return platform, tenant, channel, (None if thread == "-" else thread)


def make_record(turn: Turn, conversation_id: str, origin: IncomingMessage | None = None) -> Record:
    """The SQL record of a turn; where it happened comes from ``origin`` or the id."""
    user: str | None
    if origin is not None:
        platform, tenant, channel, thread = (
            origin.platform,
            origin.tenant,
            origin.channel,
            origin.thread,
        )
        user = turn.user if turn.user is not None else origin.user
    else:
        platform, tenant, channel, thread = split_conversation_id(conversation_id)
        user = turn.user
    return Record(
        message_id=turn.message_id,
        platform=platform,
        tenant=tenant,
        channel=channel,
        thread=thread,
        conversation_id=conversation_id,
        user=user,
        role=turn.role,
        text=turn.text,
        ts=turn.ts,
        model=turn.model,
        tokens_in=turn.tokens_in,
        tokens_out=turn.tokens_out,
        latency_ms=turn.latency_ms,
        lane=turn.lane,
        cached=turn.cached,
        tool=_tool_json(turn),
        files=_files_json(turn),
    )


def _tool_json(turn: Turn) -> str | None:
    fields: dict[str, Any] = {}
    if turn.tool_calls:
        fields["tool_calls"] = turn.tool_calls
    if turn.tool_call_id is not None:
        fields["tool_call_id"] = turn.tool_call_id
    if turn.tool_name is not None:
        fields["tool_name"] = turn.tool_name
    return json.dumps(fields, ensure_ascii=False) if fields else None


def _files_json(turn: Turn) -> str | None:
    if not turn.files:
        return None
    return json.dumps([f.model_dump() for f in turn.files], ensure_ascii=False)


def _files(files: str | None) -> list[StoredFile] | None:
    if not files:
        return None
    try:
        return [StoredFile.model_validate(f) for f in json.loads(files)]
    except (ValueError, TypeError) as e:
        raise HistoryError("a stored files field is not a JSON list of files") from e


def _tool_fields(tool: str | None) -> dict[str, Any]:
    if not tool:
        return {}
    fields = json.loads(tool)
    if not isinstance(fields, dict):
        raise HistoryError("a stored tool field is not a JSON object")
    return fields


def record_to_turn(rec: Record) -> Turn:
    """The hot-window turn of a stored record."""
    return Turn(
        role=rec["role"],
        text=rec["text"],
        message_id=rec["message_id"],
        ts=rec["ts"],
        user=rec["user"],
        model=rec["model"],
        tokens_in=rec["tokens_in"],
        tokens_out=rec["tokens_out"],
        latency_ms=rec["latency_ms"],
        lane=rec["lane"],
        cached=rec["cached"],
        files=_files(rec.get("files")),
        **_tool_fields(rec.get("tool")),
    )


# The consumer group of the backlog stream that the flush job reads (``workers.flush``).
FLUSH_GROUP = "flush"


# --- The history ------------------------------------------------------------------------


class HotHistory:
    """Append to and read the recent turns of conversations; record every turn for SQL.

    Args:
        redis: A ``redis.asyncio`` client (bytes responses).
        keys: Key names.
        max_turns, ttl_s: Size and idle lifetime of each hot window.
        backlog_max: Bound of the backlog (see the module docstring for what happens there).
        compress_min_bytes: Bodies at least this long are zstd-compressed in Redis.
        engine: The SQL engine used when Redis no longer holds a conversation; ``None``
            turns the SQL fallback off.
        flush_threshold, on_threshold: ``on_threshold()`` is awaited (at most once a
            second) when an append leaves the backlog at least ``flush_threshold`` long;
            the worker uses it to start a flush early.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        max_turns: int,
        ttl_s: int,
        backlog_max: int = 1_000_000,
        compress_min_bytes: int = 256,
        engine: AsyncEngine | None = None,
        flush_threshold: int = 5000,
        on_threshold: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.max_turns = max_turns
        self.ttl_s = ttl_s
        self.backlog_max = backlog_max
        self.compress_min_bytes = compress_min_bytes
        self.engine = engine
        self.flush_threshold = flush_threshold
        self._on_threshold = on_threshold
        self._last_trigger = 0.0
        self._last_overflow_log = 0.0
        self._overflowed_since_log = 0
        self._sql_down_until = 0.0
        self._append = redis.register_script(_APPEND_LUA)
        self._warm = redis.register_script(_WARM_LUA)

    async def append(
        self,
        conversation_id: str,
        turns: Sequence[Turn],
        *,
        origin: IncomingMessage | None = None,
        backlog: Sequence[Turn] | None = None,
    ) -> None:
        """Add turns at the end of a conversation and record them for SQL, atomically.

        ``backlog`` is what goes to the backlog (default: ``turns``); the ``reply`` job
        passes only the answer because it recorded the user's message when it started.
        With ``origin``, nothing is written once a purge marked its reply job
        (:meth:`core.infra.redis.Keys.purged`): the check and the write are one script, so a
        purge either finds these turns or they are never written.
        """
        turns = [storable(t) for t in turns]
        to_record = turns if backlog is None else [storable(t) for t in backlog]
        if not turns and not to_record:
            return
        window = [pack_turn(t, self.compress_min_bytes) for t in turns]
        entries = [
            pack_record(make_record(t, conversation_id, origin), self.compress_min_bytes)
            for t in to_record
        ]
        await self._run(conversation_id, window, entries, None if origin is None else origin.job_id)

    async def record(self, origin: IncomingMessage, turns: Sequence[Turn]) -> None:
        """Add turns to the backlog only (not the hot window): a message just accepted
        (nothing, once a purge marked its reply job)."""
        entries = [
            pack_record(
                make_record(storable(t), origin.conversation_id, origin), self.compress_min_bytes
            )
            for t in turns
        ]
        if entries:
            await self._run(origin.conversation_id, [], entries, origin.job_id)

    async def _run(
        self, conversation_id: str, window: list[bytes], entries: list[bytes], job_id: str | None
    ) -> None:
        keys = self._keys
        script_keys = [
            keys.history(conversation_id),
            keys.history_backlog(),
            keys.history_overflow(),
            keys.history_stats(),
        ]
        if job_id is not None:
            script_keys.append(keys.purged(job_id))
        try:
            length, added = await self._append(
                keys=script_keys,
                args=[
                    self.max_turns,
                    self.ttl_s,
                    self.backlog_max,
                    conversation_id,
                    len(window),
                    *window,
                    *entries,
                ],
            )
        except RedisError as e:
            raise HistoryError(f"cannot append to history of {conversation_id}: {e}") from e
        if int(length) < 0:
            logger.info("job=%s was purged meanwhile: its turns are not stored", job_id)
            return
        if int(added) < 0:
            self._log_overflow(-int(added), int(length))
        if (
            self._on_threshold is not None
            and int(length) >= self.flush_threshold
            and time.monotonic() - self._last_trigger >= 1.0
        ):
            self._last_trigger = time.monotonic()
            try:
                await self._on_threshold()
            except RedisError as e:
                logger.warning("could not start an early flush: %s", e)

    def _log_overflow(self, n: int, length: int) -> None:
        self._overflowed_since_log += n
        now = time.monotonic()
        if now - self._last_overflow_log >= 60.0:
            logger.error(
                "history backlog is full (%d of %d entries; is the database down?): "
                "%d messages in the last minute were kept only in their hot window; "
                "the flush stores them from there once the backlog drains",
                length,
                self.backlog_max,
                self._overflowed_since_log,
            )
            self._last_overflow_log = now
            self._overflowed_since_log = 0
        self._sql_down_until = 0.0

    async def hot(self, conversation_id: str, n: int) -> list[Turn]:
        """The last ``n`` turns held in Redis (no SQL fallback), oldest first."""
        if n <= 0:
            return []
        try:
            key = self._keys.history(conversation_id)
            raw: list[Any] = await self._redis.lrange(key, -n, -1)  # type: ignore[misc]
        except RedisError as e:
            raise HistoryError(f"cannot read history of {conversation_id}: {e}") from e
        return [unpack_turn(r) for r in raw]

    async def recent(
        self, conversation_id: str, n: int, *, exclude: Collection[str] = ()
    ) -> list[Turn]:
        """The last ``n`` turns of a conversation, oldest first.

        From the hot window; when Redis holds nothing for the conversation, from SQL
        (and the hot window is filled again from there). Turns whose message id is in
        ``exclude`` are left out (and not written back): the ``reply`` job excludes the
        message it is answering, which a flush may already have stored.
        """
        turns = [t for t in await self.hot(conversation_id, n) if t.message_id not in exclude]
        if turns or n <= 0 or self.engine is None:
            return turns
        if time.monotonic() < self._sql_down_until:
            return []  # the database failed a moment ago: answer without waiting on it
        try:
            records = await asyncio.wait_for(
                conversation_tail(self.engine, conversation_id, max(n, self.max_turns)),
                SQL_FALLBACK_TIMEOUT_S,
            )
        except (SQLAlchemyError, OSError, TimeoutError) as e:
            self._sql_down_until = time.monotonic() + SQL_FALLBACK_PAUSE_S
            logger.warning(
                "no SQL history for %s (%s); not asking SQL again for %.0fs",
                conversation_id,
                e or type(e).__name__,
                SQL_FALLBACK_PAUSE_S,
            )
            return []
        if not records:
            return []
        turns = [record_to_turn(r) for r in records if r["message_id"] not in exclude]
        if not turns:
            return []
        try:
            await self._warm(
                keys=[self._keys.history(conversation_id)],
                args=[
                    self.max_turns,
                    self.ttl_s,
                    *[pack_turn(t, self.compress_min_bytes) for t in turns],
                ],
            )
        except RedisError as e:
            logger.warning("could not warm the hot window of %s: %s", conversation_id, e)
        return turns[-n:]


# --- Backlog metrics --------------------------------------------------------------------


@dataclass(frozen=True)
class BacklogStatus:
    """What ``sluice status`` and metrics show about the write-behind backlog."""

    length: int
    oldest_age_s: float
    pending: int
    overflow_conversations: int
    overflowed_total: int
    last_flush_ts: float | None
    last_error: str | None
    failures: int
    backlog_max: int

    @property
    def full(self) -> bool:
        """Whether the bound was reached (turns are going to the overflow set)."""
        return self.length >= self.backlog_max or self.overflow_conversations > 0


async def backlog_oldest_age_s(redis: Redis, keys: Keys) -> float:
    """Age in seconds of the oldest message not yet in SQL (0 when the backlog is empty)."""
    first: list[Any] = await redis.xrange(keys.history_backlog(), "-", "+", count=1)
    if not first:
        return 0.0
    entry_id = first[0][0]
    ms = int((entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")[0])
    return max(0.0, time.time() - ms / 1000)


async def backlog_status(redis: Redis, keys: Keys, backlog_max: int) -> BacklogStatus:
    """Everything about the backlog in one call (for ``sluice status`` and metrics)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(keys.history_backlog())
        pipe.scard(keys.history_overflow())
        pipe.hgetall(keys.history_stats())
        length, n_overflow, stats = await pipe.execute()
    pending = 0
    if length:
        try:
            info: Any = await redis.xpending(keys.history_backlog(), "flush")
            pending = int(info["pending"])
        except RedisError:
            pending = 0  # no consumer group yet: nothing was ever claimed
    st = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in stats.items()
    }
    return BacklogStatus(
        length=int(length),
        oldest_age_s=await backlog_oldest_age_s(redis, keys),
        pending=pending,
        overflow_conversations=int(n_overflow),
        overflowed_total=int(st.get("overflowed", 0)),
        last_flush_ts=float(st["last_flush_ts"]) if "last_flush_ts" in st else None,
        last_error=st.get("last_error") or None,
        failures=int(st.get("failures", 0)),
        backlog_max=backlog_max,
    )

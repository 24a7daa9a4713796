"""Data management: export and purge one user's or one tenant's messages everywhere.

"Everywhere" is SQL, the unflushed backlog and the hot windows in Redis, and (for
purge) the response cache, the reply jobs still queued or running, the web chat
outboxes and the parked unreadable backlog entries. A user id is matched in every
tenant unless a tenant is given too. An answer, and each tool-call turn made while
answering, belongs to the user it answered.

What a purge deletes:

- ``--tenant T``: every stored message of T (SQL), every backlog entry of T, every
  hot window of T's conversations, T's overflow marks, and every cache key under
  ``{prefix}:cache:T:*``.
- ``--user U``: U's messages, the answers to U and the tool-call turns made for U
  (SQL, backlog), those turns inside hot windows (other people's turns in a shared
  channel stay), and the whole cache of every tenant where U has messages: cache
  entries are keyed by a hash of the context, so the ones built from U's words
  cannot be told apart; other users of those tenants lose only cached answers, which
  are recomputed on demand.

Both also delete:

- The queued-notice refreshes still due of the user's or tenant's messages (each keeps
  its message beside it: :meth:`core.infra.redis.Keys.notice_refresh_payload`).
- Reply jobs (and their ``notify_queued`` notices) of the user or tenant still in an
  arq queue: the payload (``arq:job:<id>``, which holds the message) and the queue
  entry of a job waiting; the payload of a running one. Each gets a purge mark
  (:meth:`core.infra.redis.Keys.purged`, a day) first: the running job's history writes
  are dropped (checked atomically in :class:`core.history.hot.HotHistory`), and the
  worker ends it without keeping arq's result, its delivery state or a reply kept
  for a later delivery (:func:`finish_purged_job`). A removed waiting job leaves its
  conversation's line, and the next message there is woken as if it had finished.
- For the matching messages of the last 7 days (:data:`TRACES_SINCE_S`; longer than
  any of these keys live), what their reply jobs left in Redis: the platform delivery
  state (ids and texts of posted parts), a reply kept for another delivery attempt,
  and arq's results of the job and of its queued notice (which hold the job's
  arguments, i.e. the message).
- Web chat outboxes (``{prefix}:web:out:<session>``) of the sessions the user or
  tenant wrote in (all of them for tenant ``web``).
- Entries of the parked unreadable backlog (``{prefix}:histq:backlog:bad``) that can
  be attributed: those whose fields still parse are matched like any record, the
  others by the user or tenant id appearing in them as a msgpack string.

Tool-call turns stored before they carried a user (``user`` empty) are attributed by
their message id, which begins with the id of the user's message they answered
(``<message_id>:step<n>``, ``<message_id>:tool:<call id>``), in SQL, the backlog and
hot windows alike.

Messages arriving while a purge runs are not covered (run it again, or block the
user first). The flush is held off during a purge, and a flush that stalled past its
lock and wakes up after the purge is fenced out (:mod:`workers.flush`): it cannot
write back rows the purge has just removed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zstandard
from arq.constants import (
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import WatchError
from sqlalchemy.ext.asyncio import AsyncEngine

from core.errors import HistoryError
from core.history.feedback import delete_votes, votes_of
from core.history.hot import (
    FLUSH_GROUP,
    ZSTD_MAGIC,
    make_record,
    split_conversation_id,
    unpack_record,
    unpack_turn,
)
from core.history.store import (
    RECORD_FIELDS,
    Record,
    delete_records,
    iter_records,
    record_key,
    tenants_of_user,
    user_message_keys,
    web_sessions,
)
from core.infra.lock import OwnerLock
from core.infra.redis import Keys, client, glob_escape
from core.infra.serializer import deserialize
from core.messages import IncomingMessage, reply_job_id
from core.settings import Settings
from core.traffic.ordering import ConversationLock
from core.traffic.queue import SIDE_JOB_KINDS, side_job_parent

logger = logging.getLogger(__name__)

PURGE_MARK_TTL_S = 86400
"""How long a purged job's mark lives: longer than a job can run or wait for a retry."""


def _matches(rec: Record, user: str | None, tenant: str | None) -> bool:
    return (user is None or rec["user"] == user) and (tenant is None or rec["tenant"] == tenant)


def _tool_turn_of(rec: Record, parents: set[tuple[str, str, str]]) -> bool:
    """Whether ``rec`` is a tool-call turn stored without a user (before tool turns
    carried one) made while answering one of ``parents`` (``(platform, tenant,
    message id)``): its id is the parent's id, then ``:step<n>`` or ``:tool:<id>``."""
    if rec["user"] is not None or rec["tool"] is None:
        return False
    mid = rec["message_id"]
    for sep in (":step", ":tool:"):
        at = mid.find(sep)
        while at > 0:
            if (rec["platform"], rec["tenant"], mid[:at]) in parents:
                return True
            at = mid.find(sep, at + 1)
    return False


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
    hot-window turns found in neither (turns kept only there at the backlog bound),
    then the feedback votes the user cast (every vote in the tenant), each with
    ``"kind": "feedback"``.
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
        parents = set(seen)
        for item in raw:
            rec = make_record(unpack_turn(item), conversation_id)
            if _matches(rec, user, tenant) or _tool_turn_of(rec, parents):
                parents.add(record_key(rec))
                if record_key(rec) not in seen:
                    seen.add(record_key(rec))
                    yield {"source": "hot", **rec}
    # Feedback: the 👍/👎 votes the user cast (or every vote in the tenant).
    for vote in await votes_of(engine, user=user, tenant=tenant):
        yield {"source": "sql", **vote}


TRACES_SINCE_S = 7 * 86400
"""How far back a purge looks for reply-job traces in Redis (they live a day at most)."""


@dataclass
class PurgeResult:
    """What a purge deleted."""

    sql_rows: int = 0
    backlog_entries: int = 0
    bad_entries: int = 0
    hot_turns: int = 0
    hot_windows: int = 0
    cache_keys: int = 0
    job_traces: int = 0
    jobs_queued: int = 0
    jobs_running: int = 0
    web_outboxes: int = 0
    feedback_votes: int = 0
    thread_contexts: int = 0
    notice_refreshes: int = 0
    tenants: set[str] = field(default_factory=set)


async def _hold_flush_lock(redis: Redis, keys: Keys, timeout_s: float = 120.0) -> OwnerLock:
    """The history flush lock, held (and renewed) by this purge until released."""
    lock = OwnerLock(
        redis, keys.history_flush_lock(), f"purge-{uuid.uuid4().hex}", 300_000, what="purge"
    )
    deadline = time.monotonic() + timeout_s
    while not await lock.acquire():
        if time.monotonic() > deadline:
            raise TimeoutError("a flush has held the lock for too long; try again")
        await asyncio.sleep(0.2)
    return lock


async def purge(
    redis: Redis,
    keys: Keys,
    engine: AsyncEngine,
    *,
    user: str | None = None,
    tenant: str | None = None,
    queues: Sequence[str] | None = None,
    traces_since_s: float = TRACES_SINCE_S,
) -> PurgeResult:
    """Delete a user's or tenant's messages everywhere (see the module docstring).

    ``queues``: every arq queue a reply job or its side jobs can be in
    (``core.traffic.queue.reply_queues`` and ``notice_queue_name``; default: the one queue,
    ``{prefix}:queue``, and the reserved one, ``{prefix}:queue:door``).

    Raises:
        HistoryError: the database has no purge fence (``sluice db upgrade``).
        TimeoutError: a flush kept the flush lock for two minutes.
    """
    if user is None and tenant is None:
        raise ValueError("give a user, a tenant, or both")
    result = PurgeResult()
    lock = await _hold_flush_lock(redis, keys)
    try:
        messages: set[tuple[str, str, str]] = set()
        sessions: set[str] = set()
        # Jobs first: their purge marks stop running ones from writing history while
        # the rest of the purge looks for what they wrote before.
        await _purge_jobs(
            redis,
            keys,
            queues or [f"{keys.prefix}:queue", f"{keys.prefix}:queue:door"],
            user,
            tenant,
            result,
            messages,
            sessions,
        )
        result.notice_refreshes = await _purge_notice_refreshes(redis, keys, user, tenant)
        result.backlog_entries = await _purge_backlog(
            redis, keys, user, tenant, result.tenants, messages, sessions
        )
        result.bad_entries = await _purge_bad_backlog(redis, keys, user, tenant)

        if user is not None:
            result.tenants |= await tenants_of_user(engine, user)
        messages |= await user_message_keys(
            engine, user=user, tenant=tenant, since_ts=time.time() - traces_since_s
        )
        sessions |= await web_sessions(engine, user=user, tenant=tenant)
        # Also increments the purge epoch: a flush that stalled past its lock and
        # read the backlog before this point can no longer commit.
        result.sql_rows = await delete_records(engine, user=user, tenant=tenant)
        result.feedback_votes = await delete_votes(engine, user=user, tenant=tenant)
        result.job_traces = await _purge_job_traces(redis, keys, messages, tenant)

        async for key, conversation_id in _hot_windows(redis, keys, tenant):
            removed = await _purge_window(redis, key, conversation_id, user, tenant, messages)
            if removed:
                result.hot_turns += removed
                platform, conv_tenant, channel, _ = split_conversation_id(conversation_id)
                result.tenants.add(conv_tenant)
                if platform == "web":
                    sessions.add(channel)
        if tenant is not None:
            result.tenants.add(tenant)
            async for m in redis.sscan_iter(keys.history_overflow()):
                if split_conversation_id(_str(m))[1] == tenant:
                    await redis.srem(keys.history_overflow(), m)  # type: ignore[misc]
        result.web_outboxes = await _purge_web_outboxes(redis, keys, user, tenant, sessions)
        result.thread_contexts = await _purge_thread_contexts(redis, keys, user, tenant)
        for t in sorted(result.tenants):
            batch = [k async for k in redis.scan_iter(keys.cache_pattern(t), count=1000)]
            for i in range(0, len(batch), 1000):
                result.cache_keys += int(await redis.unlink(*batch[i : i + 1000]))
    finally:
        await lock.release()
    return result


async def _purge_thread_contexts(
    redis: Redis, keys: Keys, user: str | None, tenant: str | None
) -> int:
    """Drop cached thread context (:mod:`core.history.threads`) of the tenant, or that
    quotes the user (other people's messages go with it; the thread is read again)."""
    removed = 0
    async for raw_key in redis.scan_iter(keys.thread_context("*"), count=1000):
        key = _str(raw_key)
        conversation = key.removeprefix(keys.thread_context(""))
        for kind in ("lock:", "retry:"):
            conversation = conversation.removeprefix(kind)
        parts = conversation.split(":")
        if len(parts) < 4:
            continue
        if tenant is not None and parts[1] != tenant:
            continue
        if user is not None:
            body = _str(await redis.get(key) or b"")
            if f"[user {user}]" not in body and f"[bot {user}]" not in body:
                continue
        removed += int(await redis.unlink(key))
    return removed


async def _purge_notice_refreshes(
    redis: Redis, keys: Keys, user: str | None, tenant: str | None
) -> int:
    """Stop the queued-notice refreshes of the user's or tenant's messages: the
    workers' refresher (``workers.refresher``) keeps each message beside its entry."""
    doomed: list[str] = []
    async for job_id, raw in redis.hscan_iter(keys.notice_refresh_payload(), count=1000):
        try:
            msg = json.loads(raw)
        except ValueError as e:
            logger.warning("purge: an unreadable notice refresh was left alone: %s", e)
            continue
        if not isinstance(msg, dict):
            continue
        if (user is not None and msg.get("user") != user) or (
            tenant is not None and msg.get("tenant") != tenant
        ):
            continue
        doomed.append(_str(job_id))
    for i in range(0, len(doomed), 500):
        part = doomed[i : i + 500]
        async with redis.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.notice_refresh(), *part)
            pipe.hdel(keys.notice_refresh_payload(), *part)
            pipe.hdel(keys.notice_refresh_count(), *part)
            await pipe.execute()
    return len(doomed)


def _job_message(blob: bytes) -> tuple[str, dict[str, Any]] | None:
    """``(function, message)`` of an arq job payload (``None``: not a message's job)."""
    try:
        job = deserialize(blob)
    except (ValueError, msgpack.UnpackException) as e:
        logger.warning("purge: an unreadable arq job payload was left alone: %s", e)
        return None
    args = job.get("a") if isinstance(job, dict) else None
    if not args or not isinstance(args[0], dict):
        return None
    msg = args[0]
    if not all(isinstance(msg.get(f), str) for f in ("platform", "tenant", "message_id")):
        return None
    return str(job.get("f")), msg


async def _purge_jobs(
    redis: Redis,
    keys: Keys,
    queues: Sequence[str],
    user: str | None,
    tenant: str | None,
    result: PurgeResult,
    messages: set[tuple[str, str, str]],
    sessions: set[str],
) -> None:
    """Mark, then delete, the queued and running jobs of the user's or tenant's
    messages (their payloads hold the message); see the module docstring."""
    head = f"{keys.prefix}:"
    for queue in queues:
        ids = [
            _str(m)
            async for m, _ in redis.zscan_iter(queue, count=1000)
            if _str(m).startswith(head)
        ]
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            blobs: list[Any] = await redis.mget([job_key_prefix + j for j in part])
            for arq_id, blob in zip(part, blobs, strict=True):
                found = _job_message(blob) if blob is not None else None
                if found is None:
                    continue  # ended meanwhile, or not a message's job (a flush)
                _, msg = found
                if (user is not None and msg.get("user") != user) or (
                    tenant is not None and msg["tenant"] != tenant
                ):
                    continue
                job_id = reply_job_id(msg["platform"], msg["tenant"], msg["message_id"])
                messages.add((msg["platform"], msg["tenant"], msg["message_id"]))
                if side_job_parent(arq_id[len(head) :]) is not None:
                    # A notice, refusal or door check: its payload holds the message.
                    # Its reply job's mark (if that one runs) is not replaced; a side
                    # job that runs gets a mark only if there is none.
                    if not await _drop_job(redis, keys, queue, arq_id, msg, job_id):
                        side_mark = json.dumps({"tenant": msg["tenant"], "session": None})
                        await redis.set(
                            keys.purged(job_id), side_mark, ex=PURGE_MARK_TTL_S, nx=True
                        )
                    continue
                session = str(msg.get("channel")) if msg["platform"] == "web" else None
                mark = json.dumps(
                    {
                        "tenant": msg["tenant"],
                        "session": session,
                        "conversation": _conversation_id(msg, job_id),
                    }
                )
                await redis.set(keys.purged(job_id), mark, ex=PURGE_MARK_TTL_S)
                messages.add((msg["platform"], msg["tenant"], msg["message_id"]))
                result.tenants.add(msg["tenant"])
                if session is not None:
                    sessions.add(session)
                if await _drop_job(redis, keys, queue, arq_id, msg, job_id):
                    result.jobs_queued += 1
                    # It never runs now: nothing of its own for a worker to clear.
                    mark = json.dumps({"tenant": msg["tenant"], "session": None})
                    await redis.set(keys.purged(job_id), mark, ex=PURGE_MARK_TTL_S)
                else:
                    result.jobs_running += 1
    if result.jobs_queued or result.jobs_running:
        logger.info(
            "purge: %d queued jobs deleted, %d running jobs marked to drop their result",
            result.jobs_queued,
            result.jobs_running,
        )


async def _drop_job(
    redis: Redis, keys: Keys, queue: str, arq_id: str, msg: dict[str, Any], job_id: str
) -> bool:
    """Delete one job's payload; a waiting job also leaves its queue and its
    conversation's line. Returns whether it was waiting (not running)."""
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(in_progress_key_prefix + arq_id)
                running = bool(await pipe.exists(in_progress_key_prefix + arq_id))
                pipe.multi()  # type: ignore[no-untyped-call]
                # A running job needs no payload any more (arq re-reads it only to run
                # the job again, which a purged job must not).
                pipe.delete(job_key_prefix + arq_id)
                if not running:
                    pipe.zrem(queue, arq_id)
                    pipe.delete(retry_key_prefix + arq_id)
                await pipe.execute()
                break
            except WatchError:
                continue  # a worker started it meanwhile: look again
    if running or side_job_parent(arq_id[len(keys.prefix) + 1 :]) is not None:
        return not running
    conversation_id = _conversation_id(msg, job_id)
    if conversation_id is not None:
        # As if it had finished: out of the line, and the next message there is woken.
        await ConversationLock(redis, keys, conversation_id, job_id, 1.0).release()
    return True


def _conversation_id(msg: dict[str, Any], job_id: str) -> str | None:
    try:
        return IncomingMessage.model_validate(msg).conversation_id
    except ValidationError as e:
        logger.warning("purge: job=%s has no valid message; its line is left: %s", job_id, e)
        return None


async def finish_purged_job(redis: Redis, keys: Keys, arq_id: str) -> bool:
    """Whether a purge marked the job ``arq_id`` (an arq id: ``SLUICE_KEY_PREFIX`` and
    a reply job id, or its ``queued:`` notice); if so, also delete what it left after
    the purge: its delivery state, a reply kept for another attempt, the web outbox
    of its session and its tenant's cached answers (an answer made from the purged
    message may have been cached meanwhile) and its place in its conversation's line.
    The worker then ends the job without a result, even one that asked to be retried."""
    head = f"{keys.prefix}:"
    if not arq_id.startswith(head):
        return False
    job_id = arq_id[len(head) :]
    parent = side_job_parent(job_id)
    notice = parent is not None
    if parent is not None:
        job_id = parent
    raw = await redis.get(keys.purged(job_id))
    if raw is None:
        return False
    mark = json.loads(raw)
    doomed = [keys.delivered(job_id), keys.undelivered(job_id), result_key_prefix + arq_id]
    if not notice:
        doomed.append(keys.purged(job_id))  # the reply job is over for good
    if mark.get("session"):
        doomed.append(keys.web_outbox(str(mark["session"])))
    if mark.get("tenant"):
        pattern = keys.cache_pattern(str(mark["tenant"]))
        doomed += [_str(k) async for k in redis.scan_iter(pattern, count=1000)]
    for i in range(0, len(doomed), 1000):
        await redis.unlink(*doomed[i : i + 1000])
    if not notice and mark.get("conversation"):
        # Ended for good even if it was parked or asked for a retry: out of its
        # conversation's line, so the next message there does not wait for it.
        await ConversationLock(redis, keys, str(mark["conversation"]), job_id, 1.0).release()
    logger.info("job=%s was purged while it ran: no result or delivery state kept", job_id)
    return True


async def _purge_backlog(
    redis: Redis,
    keys: Keys,
    user: str | None,
    tenant: str | None,
    tenants: set[str],
    messages: set[tuple[str, str, str]],
    sessions: set[str],
) -> int:
    """Delete matching backlog entries (acknowledged too, if a flush had claimed them);
    adds their tenants to ``tenants``, the users' own messages to ``messages`` and
    their web chat sessions to ``sessions``."""
    doomed: list[bytes] = []
    parents: set[tuple[str, str, str]] = set()
    async for entry_id, rec in _backlog_entries(redis, keys):
        if _matches(rec, user, tenant) or _tool_turn_of(rec, parents):
            doomed.append(entry_id)
            tenants.add(rec["tenant"])
            if rec["role"] == "user":
                messages.add(record_key(rec))
                parents.add(record_key(rec))
            if rec["platform"] == "web":
                sessions.add(rec["channel"])
    for i in range(0, len(doomed), 1000):
        part = doomed[i : i + 1000]
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xack(keys.history_backlog(), FLUSH_GROUP, *part)
            pipe.xdel(keys.history_backlog(), *part)
            await pipe.execute()
    return len(doomed)


_zstd = zstandard.ZstdDecompressor()
_AT_TENANT = RECORD_FIELDS.index("tenant")
_AT_USER = RECORD_FIELDS.index("user")


def _bad_entry_matches(blob: bytes, user: str | None, tenant: str | None) -> bool:
    """Whether a parked unreadable backlog entry belongs to the user or tenant.

    Its fields are matched when they still parse as a list; otherwise the ids are
    looked for as msgpack strings (the form they take inside an entry) in its bytes,
    decompressed when possible.
    """
    raw = blob[1:] if blob[:1] in (b"a", b"A") else blob
    if raw[:4] == ZSTD_MAGIC:
        try:
            raw = _zstd.decompress(raw)
        except zstandard.ZstdError as e:
            logger.warning("purge: a parked backlog entry cannot be decompressed: %s", e)
    values: list[Any] | None = None
    try:
        loose = msgpack.unpackb(raw, raw=False)
        if isinstance(loose, list) and len(loose) > max(_AT_USER, _AT_TENANT):
            values = loose
    except (ValueError, msgpack.UnpackException):
        values = None
    if values is not None:
        return (user is None or values[_AT_USER] == user) and (
            tenant is None or values[_AT_TENANT] == tenant
        )
    return (user is None or msgpack.packb(user) in raw) and (
        tenant is None or msgpack.packb(tenant) in raw
    )


async def _purge_bad_backlog(redis: Redis, keys: Keys, user: str | None, tenant: str | None) -> int:
    """Remove the user's or tenant's entries from the parked unreadable backlog."""
    key = keys.history_backlog() + ":bad"
    removed = 0
    blobs: list[Any] = await redis.lrange(key, 0, -1)  # type: ignore[misc]
    for blob in {bytes(b) for b in blobs}:
        if _bad_entry_matches(blob, user, tenant):
            removed += int(await redis.lrem(key, 0, blob))  # type: ignore[misc,arg-type]
    return removed


async def _purge_web_outboxes(
    redis: Redis, keys: Keys, user: str | None, tenant: str | None, sessions: set[str]
) -> int:
    """Delete the web chat outboxes of ``sessions`` (all of them for tenant ``web``).

    The web chat's user id is its session id, so a user purge in every tenant or in
    ``web`` also takes the session named like the user.
    """
    doomed = {keys.web_outbox(s) for s in sessions}
    if user is not None and tenant in (None, "web"):
        doomed.add(keys.web_outbox(user))
    if tenant == "web":
        pattern = glob_escape(keys.web_outbox("")) + "*"
        doomed |= {_str(k) async for k in redis.scan_iter(pattern, count=1000)}
    deleted = 0
    ordered = sorted(doomed)
    for i in range(0, len(ordered), 1000):
        deleted += int(await redis.unlink(*ordered[i : i + 1000]))
    return deleted


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
    wanted = set()
    for platform, tenant_id, message_id in messages:
        job_id = reply_job_id(platform, tenant_id, message_id)
        wanted.add(job_id)
        doomed += [
            keys.delivered(job_id),
            keys.undelivered(job_id),
            f"{result_key_prefix}{keys.prefix}:{job_id}",
        ]
    # The results of the side jobs (queued notices and their refreshes, refusals, the
    # door's check) hold the message too: one scan per kind.
    head = f"{result_key_prefix}{keys.prefix}:"
    for kind in SIDE_JOB_KINDS:
        async for k in redis.scan_iter(f"{glob_escape(head)}{kind}:*", count=1000):
            parent = side_job_parent(_str(k)[len(head) :])
            if parent is not None and (
                parent in wanted or (tenant is not None and parent.split(":")[2] == tenant)
            ):
                doomed.append(_str(k))
    deleted = 0
    for i in range(0, len(doomed), 1000):
        deleted += int(await redis.unlink(*doomed[i : i + 1000]))
    return deleted


async def _purge_window(
    redis: Redis,
    key: str,
    conversation_id: str,
    user: str | None,
    tenant: str | None,
    messages: set[tuple[str, str, str]],
) -> int:
    """Remove matching turns (and tool-call turns stored without a user that answer
    one of them or of ``messages``) from one hot window atomically; returns how many."""
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(key)
                raw: list[Any] = await pipe.lrange(key, 0, -1)  # type: ignore[misc]
                ttl = int(await pipe.ttl(key))
                parents = set(messages)
                keep = []
                for item in raw:
                    rec = make_record(unpack_turn(item), conversation_id)
                    if _matches(rec, user, tenant) or _tool_turn_of(rec, parents):
                        parents.add(record_key(rec))
                    else:
                        keep.append(item)
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
    from core.history.store import make_engine

    if not settings.redis_url and not settings.redis_sentinels:
        raise ConfigError("REDIS_URL is not set (history lives in Redis before SQL)")
    return client(settings), Keys(settings.key_prefix), make_engine(settings)

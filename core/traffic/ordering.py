"""Per-conversation order: one reply at a time per conversation, across every worker.

Two pieces of Redis state per conversation:

- ``pending`` (a sorted set): every accepted message's job id, scored by its arrival
  time (Redis ``TIME``), added by :func:`register_arrival` when the adapter enqueues.
- ``lock``: the job id answering right now, with a TTL that :class:`ConversationLock`
  renews every third of it while the job works, so a SIGKILLed worker's lock frees
  within ``SLUICE_CONVERSATION_LOCK_TTL_S``.

A job may answer when the lock is free and it is the earliest pending message; so
two messages sent 10 ms apart are answered in arrival order, and the second sees the
first answer in its history. A job that finds its conversation busy waits a little
in its slot (``SLUICE_ORDER_WAIT_IN_JOB_S``), then raises :class:`ConversationBusy`
and the worker *parks* it (:func:`park`): it stays in the queue, out of reach for
``SLUICE_ORDER_DEFER_S``, and the job that frees the conversation puts it back at
its own place in the line (its lane's score), so waiting for an earlier message
never sends it to the back of a long queue. It is never dropped.

Priority inheritance: a parked job lends its score to the message it waits for (in
the queue and in the LLM budget's line), so a high-lane message is not held up
behind its conversation's earlier default- or bulk-lane one.

Nothing is stranded: an earlier message that already took the lock once but no longer
holds it belongs to a dead worker, so later messages stop waiting for it (arq runs
it again later); an earlier message that never started for ``SLUICE_ORDER_MAX_WAIT_S``
is dropped from the line as a safety net (its job still answers when it runs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.infra.lock import OwnerLock
from core.infra.redis import Keys
from core.infra.scripts import Lua
from core.messages import FileRef, IncomingMessage
from core.settings import Settings
from core.traffic.wake import WAKE_WORKERS_LUA

logger = logging.getLogger(__name__)

PENDING_TTL_S = 86400
POLL_S = 0.03
# A job waiting in its slot for a conversation's lock looks again at least this often.
FREED_FALLBACK_S = 0.5

_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# KEYS: pending, texts; ARGV: job id, ttl s, message summary ('' = do not keep).
# Returns 1 when added.
_REGISTER = (
    _NOW_MS
    + """
local added = redis.call('ZADD', KEYS[1], 'NX', now, ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
if added == 1 and ARGV[3] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return added
"""
)

# KEYS: lock, pending, started, wake; ARGV: job id, lock ttl ms, max wait ms.
# Returns {1, '', 0} when the lock is ours, {0, blocker, held} otherwise: held is 1
# when the blocker holds the lock (answering now), 0 when it has not started yet.
_ACQUIRE = (
    _NOW_MS
    + """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, '', 0}
end
if holder then return {0, holder, 1} end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  while true do
    local head = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    if #head == 0 or head[1] == ARGV[1] then break end
    local dead = redis.call('SISMEMBER', KEYS[3], head[1]) == 1
    if dead or now - tonumber(head[2]) > tonumber(ARGV[3]) then
      redis.call('ZREM', KEYS[2], head[1])
      redis.call('SREM', KEYS[3], head[1])
    else
      return {0, head[1], 0}
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[3], 86400)
redis.call('HDEL', KEYS[4], ARGV[1])
return {1, '', 0}
"""
)

# The head of a conversation's line (``pending``), if it parked (an entry in ``wake``),
# goes back to its place in its queue, and an idle worker of that queue wakes
# (core.traffic.wake). Prepended to the scripts that free a conversation.
WAKE_HEAD_LUA = (
    WAKE_WORKERS_LUA
    + """
local function wake_head(pending, wake)
  -- A job waiting in its slot for this lock (acquire_conversation) goes now.
  local freed = wake .. ':freed'
  redis.call('RPUSH', freed, '1')
  redis.call('LTRIM', freed, -1, -1)
  redis.call('PEXPIRE', freed, 10000)
  local head = redis.call('ZRANGE', pending, 0, 0)[1]
  if head then
    local w = redis.call('HGET', wake, head)
    if w then
      local v = cjson.decode(w)
      if redis.call('ZADD', v[1], 'XX', 'CH', v[3], v[2]) > 0 then wake_workers(v[1]) end
      redis.call('HDEL', wake, head)
    end
  end
end
"""
)

# KEYS: lock, pending, started, texts, wake; ARGV: job id.
# The next message's job, if parked, goes back to its place in its queue. (The queue
# key comes from the wake entry: fine on one Redis, which is what arq supports.)
_RELEASE = (
    WAKE_HEAD_LUA
    + """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
local held = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  held = 1
end
wake_head(KEYS[2], KEYS[5])
return held
"""
)

# KEYS: lock, pending, wake, my queue, LLM budget line, the queue(s) a reply can be in...
# ARGV: job id, arq job id, queue score, park ms, arq id prefix, lent-score key prefix,
#       ttl s, budget-line score.
# Returns 1 when parked, 0 when the conversation freed meanwhile (back in line now).
# (Keys of the earlier messages are built here from the prefixes: fine on one Redis,
# which is what arq supports.)
_PARK = (
    _NOW_MS
    + """
local earlier = redis.call('ZRANGE', KEYS[2], 0, MAX_LEND - 1)
for _, jid in ipairs(earlier) do
  if jid == ARGV[1] then break end
  local w = redis.call('HGET', KEYS[3], jid)
  if w then
    -- Parked itself: it goes back at the better score when it is woken. Moving it in
    -- its queue now would only un-park it to find the conversation still busy (and
    -- park again, lending back: parked jobs of one conversation woke each other).
    local v = cjson.decode(w)
    if tonumber(ARGV[3]) < tonumber(v[3]) then
      v[3] = ARGV[3]
      redis.call('HSET', KEYS[3], jid, cjson.encode(v))
    end
  else
    for i = 6, #KEYS do
      redis.call('ZADD', KEYS[i], 'XX', 'LT', ARGV[3], ARGV[5] .. jid)
    end
  end
  redis.call('ZADD', KEYS[5], 'XX', 'LT', ARGV[8], jid)
  -- Not in the budget's line yet (not started, or only just): it joins at this score.
  local lk = ARGV[6] .. jid
  local lent = tonumber(redis.call('GET', lk) or ARGV[8])
  if tonumber(ARGV[8]) <= lent then redis.call('SET', lk, ARGV[8], 'EX', 3600) end
end
local holder = redis.call('GET', KEYS[1])
local head = earlier[1]
-- A better score lent to it while it was parked (its wake entry) is kept.
local score = ARGV[3]
local mine = redis.call('HGET', KEYS[3], ARGV[1])
if mine then
  local lent = cjson.decode(mine)[3]
  if tonumber(lent) < tonumber(score) then score = lent end
end
if not holder and (head == nil or head == ARGV[1]) then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('ZADD', KEYS[4], 'XX', score, ARGV[2])
  return 0
end
redis.call('HSET', KEYS[3], ARGV[1], cjson.encode({KEYS[4], ARGV[2], score}))
redis.call('EXPIRE', KEYS[3], ARGV[7])
redis.call('ZADD', KEYS[4], 'XX', now + tonumber(ARGV[4]), ARGV[2])
return 1
""".replace("MAX_LEND", "50")
)


class ConversationBusy(Exception):
    """The conversation is being answered by another job; try this one again later."""

    def __init__(self, conversation_id: str, blocker: str) -> None:
        super().__init__(f"conversation {conversation_id} busy (waiting for {blocker})")
        self.blocker = blocker


async def register_arrival(
    redis: Redis, keys: Keys, msg: IncomingMessage, *, keep_text: bool = False
) -> bool:
    """Put ``msg`` in its conversation's line; ``False`` if it was already there.

    ``keep_text`` also keeps its user and text for burst merging (:func:`absorb_burst`).
    """
    summary = ""
    if keep_text:
        fields: dict[str, Any] = {"user": msg.user, "text": msg.text, "ts": msg.ts}
        if msg.files:
            # File references (never bytes), so that a merged burst keeps its files.
            fields["files"] = [f.model_dump() for f in msg.files]
        summary = json.dumps(fields)
    cid = msg.conversation_id
    added = await Lua(redis, _REGISTER)(
        [keys.conv_pending(cid), keys.conv_texts(cid)], [msg.job_id, PENDING_TTL_S, summary]
    )
    return bool(added)


async def forget_arrival(redis: Redis, keys: Keys, msg: IncomingMessage) -> None:
    """Take ``msg`` out of its conversation's line (its job was not enqueued)."""
    await redis.zrem(keys.conv_pending(msg.conversation_id), msg.job_id)


class ConversationLock:
    """The right to answer in one conversation, renewed in the background until released."""

    def __init__(self, redis: Redis, keys: Keys, conversation_id: str, job_id: str, ttl_s: float):
        self._redis = redis
        self._keys = [
            keys.conv_lock(conversation_id),
            keys.conv_pending(conversation_id),
            keys.conv_started(conversation_id),
            keys.conv_texts(conversation_id),
            keys.conv_wake(conversation_id),
        ]
        self.conversation_id = conversation_id
        self.job_id = job_id
        self._ttl_ms = max(1, int(ttl_s * 1000))
        # Taken and freed by this module's scripts (with the line beside it); renewed
        # and reported lost by the one owner-token lock primitive.
        self.lock = OwnerLock(
            redis, self._keys[0], job_id, self._ttl_ms, what=f"conversation {conversation_id}"
        )
        self._acquire = Lua(redis, _ACQUIRE)
        self._release = Lua(redis, _RELEASE)

    async def try_acquire(self, max_wait_s: float) -> tuple[bool, str, bool]:
        """One attempt; returns (acquired, the job id we wait for, whether that job
        holds the lock, i.e. is answering now rather than not started yet)."""
        res: list[Any] = await self._acquire(
            [*self._keys[:3], self._keys[4]],
            [self.job_id, self._ttl_ms, int(max_wait_s * 1000)],
        )
        blocker = res[1].decode() if isinstance(res[1], bytes) else str(res[1])
        acquired = int(res[0]) == 1
        if acquired:
            self.lock.start_renewing()
        return acquired, blocker, int(res[2]) == 1

    async def release(self) -> None:
        """Stop renewing, leave the line and free the conversation for the next message."""
        await self.lock.stop_renewing()
        await asyncio.shield(self._release(self._keys, [self.job_id]))


async def acquire_conversation(
    redis: Redis, keys: Keys, settings: Settings, msg: IncomingMessage, job_id: str
) -> ConversationLock:
    """Wait (briefly) for the right to answer ``msg``.

    Waits in the slot only while an earlier message is being answered (it may finish
    soon); an earlier message that has not started yet will not finish within the
    wait, so the job steps aside at once and lends it its score (:func:`park`). Under
    a backlog that is common: a user's first message may be late while the second is
    still in time (:mod:`core.traffic.schedule`), and holding the slot would only keep other
    work from it.

    Raises:
        ConversationBusy: still busy after ``SLUICE_ORDER_WAIT_IN_JOB_S``, or waiting
            for an earlier message that has not started; re-defer the job.
    """
    lock = ConversationLock(
        redis, keys, msg.conversation_id, job_id, settings.conversation_lock_ttl_s
    )
    deadline = time.monotonic() + settings.order_wait_in_job_s
    freed = keys.conv_freed(msg.conversation_id)
    while True:
        acquired, blocker, held = await lock.try_acquire(settings.order_max_wait_s)
        if acquired:
            return lock
        left_s = deadline - time.monotonic()
        if not held or left_s <= 0:
            raise ConversationBusy(msg.conversation_id, blocker)
        # Woken when the lock is given back (wake_head pushes a token); looks again on
        # its own after FREED_FALLBACK_S (a token taken by another waiter, a lock that
        # expired instead of being given back).
        try:
            await redis.blpop(  # type: ignore[misc]
                [freed],
                timeout=max(0.01, min(left_s, FREED_FALLBACK_S)),  # type: ignore[arg-type]
            )
        except (RedisError, OSError) as e:
            logger.warning("cannot wait for conversation %s: %s", msg.conversation_id, e)
            await asyncio.sleep(POLL_S)


@dataclass(frozen=True)
class Slot:
    """Where a job waits in line: its queue, its arq id and its score there."""

    queue: str
    arq_id: str
    score_ms: int


async def park(
    redis: Redis,
    keys: Keys,
    msg: IncomingMessage,
    *,
    mine: Slot,
    budget_score_ms: int,
    arq_id_prefix: str,
    queues: list[str],
    park_s: float,
) -> bool:
    """Park a job whose conversation is busy, lending its score to the messages it
    waits for.

    The job stays in its queue, scored ``park_s`` ahead (a safety net: it looks again
    then even if nobody wakes it); the lock's release puts it back at
    ``mine.score_ms``. Every earlier message of the conversation (the one answering,
    and those not started yet) moves up to this job's score in its queue
    (``queues``: every queue a reply job can be in; arq ids are ``arq_id_prefix`` +
    job id) and in the LLM budget's line, now or when it joins it, if that is
    earlier than its own. Returns ``False`` when the conversation freed meanwhile:
    the job is back at its score at once. The caller then ends the arq try without a
    defer of its own (``Retry(defer=None)``), which leaves the score set here.
    """
    cid = msg.conversation_id
    parked = await Lua(redis, _PARK)(
        [
            keys.conv_lock(cid),
            keys.conv_pending(cid),
            keys.conv_wake(cid),
            mine.queue,
            keys.llm("waiters"),
            *queues,
        ],
        [
            msg.job_id,
            mine.arq_id,
            mine.score_ms,
            max(1, int(park_s * 1000)),
            arq_id_prefix,
            keys.llm_lent(""),
            PENDING_TTL_S,
            budget_score_ms,
        ],
    )
    return bool(parked)


async def count_run(redis: Redis, keys: Keys, job_id: str) -> int:
    """Count one real start of a job (not a busy re-defer); returns the count so far."""
    key = keys.job_runs(job_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, PENDING_TTL_S)
        n, _ = await pipe.execute()
    return int(n)


# KEYS: pending, texts, merged marker of the absorbed job; ARGV: absorbed job, leader job.
_ABSORB = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[2], 'EX', 86400)
return 1
"""


async def was_merged(redis: Redis, keys: Keys, job_id: str) -> bool:
    """Whether ``job_id``'s message was answered as part of an earlier one's burst."""
    return bool(await redis.exists(keys.merged(job_id)))


async def absorb_burst(
    redis: Redis, keys: Keys, msg: IncomingMessage, window_s: float
) -> IncomingMessage:
    """Merge the quick follow-ups of ``msg``'s sender into one turn.

    Called by the lock holder. Waits until ``window_s`` passed since the latest
    message of the burst, then takes every later pending message of the same user
    sent within ``window_s`` of the previous one out of the line (another user's
    message ends the burst). Their jobs find themselves merged and send nothing; the
    answer to the returned message (texts joined by newlines) answers them all.
    """
    cid = msg.conversation_id
    pending, texts = keys.conv_pending(cid), keys.conv_texts(cid)
    absorb = Lua(redis, _ABSORB)
    parts, last_ts, files = [msg.text], msg.ts, list(msg.files)
    while True:
        await asyncio.sleep(max(0.0, last_ts + window_s - time.time()))
        later: list[Any] = await redis.zrange(pending, 0, -1)
        grew = False
        for raw_id in later:
            jid = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            if jid == msg.job_id:
                continue
            raw = await redis.hget(texts, jid)  # type: ignore[misc]
            if raw is None:
                break
            info = json.loads(raw)
            if info["ts"] <= msg.ts:
                continue
            if info["user"] != msg.user or info["ts"] - last_ts > window_s:
                break
            if await absorb([pending, texts, keys.merged(jid)], [jid, msg.job_id]):
                parts.append(info["text"])
                files.extend(FileRef.model_validate(f) for f in info.get("files") or ())
                last_ts = info["ts"]
                grew = True
        if not grew:
            break
    if len(parts) == 1:
        return msg
    logger.info("merged %d messages into %s", len(parts), msg.message_id)
    return msg.model_copy(update={"text": "\n".join(parts), "files": files})

"""The door: what the adapter side decides before a message joins the queue.

:func:`core.traffic.queue.enqueue_reply` (which every adapter uses) calls :func:`admit` before
it enqueues anything:

- **Bounded waiting.** The estimated wait in line (:func:`estimate_line`: jobs ahead of
  the message, at the LLM budget's rate; with a provider pool, the summed rate of its
  providers that are up) must stay within ``SLUICE_MAX_WAIT_S``, and the
  queue within ``SLUICE_MAX_QUEUED`` jobs; otherwise the message is refused at once with
  "Very busy right now, please try again in about N min". Nothing is counted for it.
- **Limits at the door.** The per-user and per-tenant limits of :mod:`core.traffic.ratelimit`
  are checked and counted in one Lua call, as the worker does. An admitted message is
  marked (:data:`ADMITTED`), so the worker's own check, kept as a second line, does not
  count it again (it still checks the tokens per day, which only the worker spends).
- **One notice per window.** A refused message gets its notice at once on the reserved
  path (``door_job``, see :mod:`workers.traffic_jobs`), but only the first refusal of a
  user in a limit window does (``SET NX`` on :func:`notice_key`): a flooder sees one
  notice, not thousands. Later refusals of that window are covered by it.

It also holds the Redis side of the **cache at the door**: a reserved-path job may
answer a message from the cache while its reply job still waits, when nothing earlier
of the conversation is in flight. It takes the conversation lock under its own owner
name (:func:`door_owner`) only if the lock is free and the message is first in the
conversation's line (:data:`_TAKE`); after answering it marks the message answered and
frees the conversation for the next message in one step (:data:`_DONE`); on a miss it
gives the lock back without leaving the line (:data:`_LET_GO`). The reply job checks
the mark (:func:`answered_at_door`) once it holds the conversation, so a message is
never answered twice.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from core.framework.bot import Bot
from core.infra import metrics
from core.infra.redis import Keys
from core.infra.scripts import Lua
from core.llm.pool import BudgetLine, budget_lines
from core.messages import IncomingMessage
from core.settings import Settings
from core.traffic.ordering import WAKE_HEAD_LUA
from core.traffic.ratelimit import RateLimiter, limits_for, notice_text

logger = logging.getLogger(__name__)

# meta key set by core.traffic.queue on a message whose limits were counted at the door.
ADMITTED = "sluice_admitted"
ANSWERED_TTL_S = 86_400


def busy_text(retry_in_s: float) -> str:
    """The refusal when waiting work is over its bound."""
    minutes = max(1, math.ceil(retry_in_s / 60))
    return f"Very busy right now, please try again in about {minutes} min."


@dataclass(frozen=True)
class Line:
    """Where a message stands: ``place`` in line (1 = next) and the expected ``wait_s``
    (``None`` when no rate is known yet)."""

    place: int
    wait_s: float | None
    queue_length: int = 0  # jobs in the queue (running ones included)
    now_s: int = 0  # Redis TIME, seconds


@dataclass(frozen=True)
class Admission:
    """What :func:`admit` decided. ``notice`` is the text to send a refused message now
    (``None``: admitted, or this user already got a notice in this window)."""

    admitted: bool
    line: Line
    reason: str = ""
    notice: str | None = None
    notice_marker: str | None = None  # to take back if the notice cannot be queued


def budget_rate_per_s(settings: Settings, learned: Any, rpm: int | None = None) -> float:
    """Requests per second one LLM budget grants: its configured limit (``rpm``, else
    ``SLUICE_LLM_RPM``; or the provider's learned limit when lower or unset) times the
    headroom; 0 when unknown."""
    limit = (settings.llm_rpm if rpm is None else rpm) or 0
    if learned is not None and (limit == 0 or 0 < int(learned) < limit):
        limit = int(learned)
    return limit * settings.llm_budget_headroom / 60


@dataclass(frozen=True)
class BudgetNow:
    """One LLM budget as the door sees it now: the requests per second it grants
    (``rate``, 0 when unknown), what its bucket holds (``level``), how long it stays
    closed (``closed_s``: a 429's retry-after, or its breaker open) and the rank of a
    job in its line (``rank``, when asked for and there)."""

    label: str
    shared: bool
    rate: float
    level: float
    closed_s: float
    rank: int | None = None


@dataclass(frozen=True)
class Budgets:
    """What the LLM budgets grant together, for the door's estimate: with a provider
    pool the sum over its providers that are up (breaker closed, not closed after a
    429); when none is up, all of them from when the first one opens (``closed_s``).
    ``rate`` 0: unknown. ``each`` holds every budget (a pool's per-model ones too)."""

    rate: float
    in_bucket: float
    closed_s: float
    each: tuple[BudgetNow, ...]


async def budgets_now(
    redis: Redis, keys: Keys, settings: Settings, *, job_id: str | None = None
) -> tuple[Budgets, tuple[int, int]]:
    """Every LLM budget a reply job may wait in (:func:`core.llm.pool.budget_lines`: the
    pool's with ``SLUICE_PROVIDERS``, else the one), read in one round trip, and Redis
    TIME. With ``job_id``, its rank in each budget's line too."""
    lines = budget_lines(keys, settings)
    async with redis.pipeline(transaction=False) as pipe:
        _read_budgets(pipe, lines, job_id)
        res = await pipe.execute()
    return _budgets_from(settings, lines, res, ranked=job_id is not None)


def _read_budgets(pipe: Any, lines: list[BudgetLine], job_id: str | None) -> None:
    """Queue the reads of :func:`_budgets_from` on ``pipe``: TIME, then per budget its
    bucket, its breaker and (with ``job_id``) that job's rank in its line."""
    pipe.time()
    for b in lines:
        pipe.hmget(b.keys.llm("bucket"), ["rl", "ts", "lim_r", "blocked"])
        pipe.pttl(b.keys.llm("breaker:open"))
        if job_id is not None:
            pipe.zrank(b.keys.llm("waiters"), job_id)


def _budgets_from(
    settings: Settings, lines: list[BudgetLine], res: list[Any], *, ranked: bool
) -> tuple[Budgets, tuple[int, int]]:
    now = (int(res[0][0]), int(res[0][1]))
    now_ms = now[0] * 1000 + now[1] // 1000
    per = 3 if ranked else 2
    each = []
    for i, b in enumerate(lines):
        (level, ts, learned, blocked), open_ttl = res[1 + i * per], res[2 + i * per]
        rank = res[3 + i * per] if ranked else None
        rate = budget_rate_per_s(settings, learned, b.rpm or 0)
        if level is None:
            have = rate * 60  # never used yet: a full bucket
        else:
            elapsed_ms = max(0.0, now_ms - float(ts or now_ms))
            have = max(0.0, float(level)) + elapsed_ms * rate / 1000
            have = min(rate * 60, have) if rate > 0 else have
        closed_ms = max(int(open_ttl), 0, int(float(blocked)) - now_ms if blocked else 0)
        each.append(
            BudgetNow(
                b.label, b.shared, rate, have, closed_ms / 1000, None if rank is None else int(rank)
            )
        )
    shared = [b for b in each if b.shared]
    up = [b for b in shared if b.closed_s <= 0]
    if up:
        total = Budgets(
            sum(b.rate for b in up), sum(b.level for b in up if b.rate > 0), 0.0, tuple(each)
        )
    else:
        total = Budgets(
            sum(b.rate for b in shared),
            sum(b.level for b in shared if b.rate > 0),
            min((b.closed_s for b in shared), default=0.0),
            tuple(each),
        )
    return total, now


# KEYS: lane counters, start-rate hash. ARGV: least sample interval ms.
# Jobs waiting to start (enqueued - started, all lanes) and the measured start rate
# (jobs/s): sampled at most once per interval, and only while a backlog lasted through
# the interval, so it measures what the workers can start, not how few messages came.
# Returns {waiting, rate}.
_SLOTS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local raw = redis.call('HGETALL', KEYS[1])
local started, enqueued = 0, 0
for i = 1, #raw, 2 do
  local f, v = raw[i], tonumber(raw[i + 1]) or 0
  if string.sub(f, 1, 8) == 'started:' then started = started + v
  elseif string.sub(f, 1, 9) == 'enqueued:' then enqueued = enqueued + v end
end
local waiting = math.max(0, enqueued - started)
local st = redis.call('HMGET', KEYS[2], 't', 'n', 'w', 'r')
local rate = tonumber(st[4] or '0') or 0
if not st[1] then
  redis.call('HSET', KEYS[2], 't', now, 'n', started, 'w', waiting, 'r', tostring(rate))
elseif now - tonumber(st[1]) >= tonumber(ARGV[1]) then
  if tonumber(st[3]) > 0 and waiting > 0 then
    local inst = (started - tonumber(st[2])) * 1000 / (now - tonumber(st[1]))
    if rate > 0 then rate = 0.5 * rate + 0.5 * inst else rate = inst end
  end
  redis.call('HSET', KEYS[2], 't', now, 'n', started, 'w', waiting, 'r', tostring(rate))
end
redis.call('EXPIRE', KEYS[2], 3600)
return {waiting, tostring(rate)}
"""
SLOT_SAMPLE_MS = 1000


async def estimate_line(
    redis: Redis, keys: Keys, settings: Settings, queue: str, score_ms: int, *, queued: bool
) -> Line:
    """The place and expected wait of a job with ``score_ms`` in ``queue`` (already in
    it when ``queued``, about to join it otherwise).

    The place counts the jobs in the queue scored at or before it (running ones
    included: under a backlog they wait in the LLM budget's line). The wait is the
    longer of two limits:

    - the LLM budget: (place - 1 - what the bucket holds now) at the budget's rate,
      plus the time the budget stays closed after a provider 429. With a provider pool
      (``SLUICE_PROVIDERS``) these are the pool's (:func:`budgets_now`): the summed
      rate and buckets of the providers that are up; a provider closed after a 429 or
      with its breaker open does not count while another is up;
    - the worker slots: the jobs ahead that have not started yet, at the rate the
      workers were measured to start jobs while a backlog lasted (``_SLOTS``).

    Cached answers ahead need no budget, so this errs long rather than short.
    """
    lines = budget_lines(keys, settings)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(queue, "-inf", score_ms)
        pipe.zcard(queue)
        _read_budgets(pipe, lines, None)
        ahead, total, *read = await pipe.execute()
    budgets, now = _budgets_from(settings, lines, read, ranked=False)
    place = max(1, int(ahead) + (0 if queued else 1))
    res: list[Any] = await Lua(redis, _SLOTS)(
        [keys.lanes(), f"{keys.prefix}:door:start-rate"], [SLOT_SAMPLE_MS]
    )
    waiting, start_rate = int(res[0]), float(res[1])
    running = max(0, int(total) - waiting)
    slot_wait = max(0, place - 1 - running) / start_rate if start_rate > 0 else 0.0
    rate = budgets.rate
    if rate <= 0:
        return Line(place, slot_wait if start_rate > 0 else None, int(total), int(now[0]))
    budget_wait = budgets.closed_s + max(0.0, place - 1 - budgets.in_bucket) / rate
    return Line(place, max(budget_wait, slot_wait), int(total), int(now[0]))


async def line_of_job(
    redis: Redis, keys: Keys, settings: Settings, queue: str, arq_id: str, job_id: str
) -> Line | None:
    """Where a queued message's reply job stands now; ``None`` once its answer is being
    made (started and not waiting in the LLM budget's line) or it is gone. A started
    job waiting for budget stands at its rank in the line it waits in (with a pool, its
    provider's), at that budget's rate."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zscore(queue, arq_id)
        pipe.exists(in_progress_key_prefix + arq_id)
        score, running = await pipe.execute()
    if running:
        budgets, _now = await budgets_now(redis, keys, settings, job_id=job_id)
        mine = next((b for b in budgets.each if b.rank is not None), None)
        if mine is None:
            return None  # the answer is being made (or the job is about to wait for budget)
        place = int(mine.rank or 0) + 1
        return Line(place, mine.closed_s + place / mine.rate if mine.rate > 0 else None)
    if score is None:
        return None
    return await estimate_line(redis, keys, settings, queue, int(score), queued=True)


async def conversation_line(
    redis: Redis,
    keys: Keys,
    settings: Settings,
    msg: IncomingMessage,
    own: Line,
    *,
    queue: str,
    queues: list[str],
) -> Line:
    """Where ``msg`` stands once the earlier messages of its conversation are counted.

    ``own`` is its place by its own score in ``queue``. A message that waits behind an
    earlier one of its conversation cannot start before that one is answered, however
    good its own score (a high-lane question after a default-lane one). The head of
    the conversation's line starts after its own wait (:func:`line_of_job`; 0 when it
    is being answered) or, when this message's score is better, once this message's
    job reaches a slot and lends it its score (``core.traffic.ordering.park``), i.e.
    after this message's own wait, whichever comes first; then each earlier message
    takes a typical answer time (``SLUICE_ORDER_WAIT_IN_JOB_S``). A job parked for
    its conversation (scored in the future until the conversation frees) has lent its
    score already and has no place of its own: only the conversation's line counts.
    ``queues`` are every queue a reply job can be in. The first in its conversation's
    line gets ``own`` back."""
    pending = keys.conv_pending(msg.conversation_id)
    arq_id = f"{keys.prefix}:{msg.job_id}"
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrank(pending, msg.job_id)
        pipe.zrange(pending, 0, 0)
        pipe.zscore(queue, arq_id)
        pipe.time()
        rank, head, score, now = await pipe.execute()
    if not rank or not head:
        return own  # first in line (or no longer in it: answered meanwhile)
    head_id = head[0].decode() if isinstance(head[0], bytes) else str(head[0])
    head_line: Line | None = None
    for q in queues:
        head_line = await line_of_job(redis, keys, settings, q, f"{keys.prefix}:{head_id}", head_id)
        if head_line is not None:
            break
    earlier = int(rank)
    head_place = head_line.place if head_line is not None else 0
    head_wait = head_line.wait_s if head_line is not None and head_line.wait_s else 0.0
    answers_s = earlier * settings.order_wait_in_job_s
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    if score is not None and float(score) > now_ms:  # parked
        return Line(head_place + earlier, head_wait + answers_s, own.queue_length, own.now_s)
    own_wait = own.wait_s or 0.0
    wait = max(own_wait, min(head_wait, own_wait) + answers_s)
    place = max(own.place, min(head_place, own.place) + earlier)
    return Line(place, wait, own.queue_length, own.now_s)


async def waiting_for_turn(redis: Redis, keys: Keys, msg: IncomingMessage) -> bool:
    """Whether ``msg`` (its job running) still waits for its conversation's turn: it is
    in the conversation's line and does not hold the conversation's lock."""
    cid = msg.conversation_id
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zscore(keys.conv_pending(cid), msg.job_id)
        pipe.get(keys.conv_lock(cid))
        pending, holder = await pipe.execute()
    held = holder is not None and holder in (msg.job_id, msg.job_id.encode())
    return pending is not None and not held


def notice_key(keys: Keys, msg: IncomingMessage, reason: str, window: int) -> str:
    """The marker that this user got a door notice for ``reason`` in this window."""
    ident = f"{msg.platform}:{msg.tenant}:{msg.user}"
    return keys.limit("user", ident, f"door-notice:{reason}:{window}")


async def admit(
    redis: Redis,
    keys: Keys,
    settings: Settings,
    bot: Bot | None,
    msg: IncomingMessage,
    queue: str,
    score_ms: int,
) -> Admission:
    """Decide at the door whether ``msg`` joins the queue (see the module docstring).

    Limits are counted only for an admitted message (one Lua call, check and count).
    Without a loaded bot the limits are left to the worker (not counted here).
    """
    line = await estimate_line(redis, keys, settings, queue, score_ms, queued=False)
    queued, now_s = line.queue_length, line.now_s
    window_s = bot_window(settings, bot)
    retry_in: float | None = None
    reason = ""
    if int(queued) >= settings.max_queued:
        reason = "queue full"
        retry_in = (
            (line.wait_s - settings.max_wait_s) if line.wait_s is not None else float(window_s)
        )
    elif line.wait_s is not None and line.wait_s > settings.max_wait_s:
        reason = "wait over SLUICE_MAX_WAIT_S"
        retry_in = line.wait_s - settings.max_wait_s
    scope = ""
    if retry_in is not None:
        text = busy_text(max(60.0, retry_in))
    elif bot is None:
        return Admission(True, line)
    else:
        verdict = await RateLimiter(redis, keys).check(msg, limits_for(settings, bot, msg))
        if verdict.allowed:
            return Admission(True, line)
        scope = verdict.scope or "user"
        reason = f"over limit {scope}"
        text = notice_text(verdict)
    # One notice per user per window of the limit met (a day for tokens per day), for
    # each reason: a user of a workspace over its limit is told once too.
    span = 86_400 if scope.endswith(":tokens") else window_s
    marker = notice_key(keys, msg, f"{scope or 'busy'}:{span}", int(now_s) // span)
    first = await redis.set(marker, "1", nx=True, ex=span + 1)
    metrics.DOOR_REFUSALS.labels("limit" if scope else "busy").inc()
    if scope and first:
        metrics.RATE_LIMIT_NOTICES.labels(scope).inc()
    logger.info(
        "refused at the door platform=%s tenant=%s message=%s reason=%s wait=%s notice=%s",
        msg.platform,
        msg.tenant,
        msg.message_id,
        reason,
        None if line.wait_s is None else round(line.wait_s),
        bool(first),
    )
    return Admission(False, line, reason, text if first else None, marker if first else None)


def bot_window(settings: Settings, bot: Bot | None) -> int:
    """The limit window (``SLUICE_USER_WINDOW_S``, or the bot's override)."""
    if bot is not None and "user_window_s" in bot.limits:
        return max(1, int(bot.limits["user_window_s"] or settings.user_window_s))
    return max(1, settings.user_window_s)


# --- cache at the door --------------------------------------------------------------


def door_owner(job_id: str) -> str:
    """The conversation lock's owner while the door answers ``job_id`` (not the job id
    itself: the reply job must see the conversation busy, not take it as its own)."""
    return f"door:{job_id}"


def answered_key(keys: Keys, job_id: str) -> str:
    """Marks a message answered at the door."""
    return f"{keys.prefix}:door:answered:{job_id}"


# KEYS: lock, pending. ARGV: owner, job id, ttl ms.
# The lock, only when it is free and the message is first in its conversation's line.
_TAKE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
if head ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""

# KEYS: lock, pending, started, texts, wake, answered, queue, lane counters. ARGV: owner,
# job id, arq id, ttl s, in-progress key prefix, lane.
# Answered: mark it, leave the line, take the reply job out of the queue unless it
# runs (then it finds the mark), free the conversation and wake the next message.
_DONE = (
    WAKE_HEAD_LUA
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[6], '1', 'EX', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[2])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[5], ARGV[2])
if redis.call('EXISTS', ARGV[5] .. ARGV[3]) == 0 and redis.call('ZREM', KEYS[7], ARGV[3]) == 1 then
  redis.call('HINCRBY', KEYS[8], 'started:' .. ARGV[6], 1)
end
redis.call('DEL', KEYS[1])
wake_head(KEYS[2], KEYS[5])
return 1
"""
)

# KEYS: lock, pending, wake. ARGV: owner.
# Not answered: give the lock back, stay in line, wake the head if it parked.
_LET_GO = (
    WAKE_HEAD_LUA
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
wake_head(KEYS[2], KEYS[3])
return 1
"""
)


async def take_conversation(
    redis: Redis, keys: Keys, settings: Settings, msg: IncomingMessage
) -> bool:
    """Hold ``msg``'s conversation for a door answer, if nothing earlier is in flight."""
    cid = msg.conversation_id
    ttl_ms = max(1000, int(settings.conversation_lock_ttl_s * 1000))
    took = await Lua(redis, _TAKE)(
        [keys.conv_lock(cid), keys.conv_pending(cid)], [door_owner(msg.job_id), msg.job_id, ttl_ms]
    )
    return bool(took)


async def renew_conversation(
    redis: Redis, keys: Keys, settings: Settings, msg: IncomingMessage
) -> bool:
    """Keep holding it (the door answer is still being delivered)."""
    ttl_ms = max(1000, int(settings.conversation_lock_ttl_s * 1000))
    owner = door_owner(msg.job_id)
    renewed = await redis.eval(  # type: ignore[misc]
        "if redis.call('GET', KEYS[1]) == ARGV[1] then "
        "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
        1,
        keys.conv_lock(msg.conversation_id),
        owner,
        str(ttl_ms),
    )
    return bool(renewed)


async def answered(redis: Redis, keys: Keys, msg: IncomingMessage, queue: str, arq_id: str) -> bool:
    """Mark ``msg`` answered at the door and free its conversation; ``False`` if the
    door no longer held it (the lock expired: the reply job may answer it then)."""
    cid = msg.conversation_id
    done = await Lua(redis, _DONE)(
        [
            keys.conv_lock(cid),
            keys.conv_pending(cid),
            keys.conv_started(cid),
            keys.conv_texts(cid),
            keys.conv_wake(cid),
            answered_key(keys, msg.job_id),
            queue,
            keys.lanes(),
        ],
        [
            door_owner(msg.job_id),
            msg.job_id,
            arq_id,
            ANSWERED_TTL_S,
            in_progress_key_prefix,
            msg.lane,
        ],
    )
    return bool(done)


async def let_go(redis: Redis, keys: Keys, msg: IncomingMessage) -> None:
    """Not answered at the door: give the conversation back, keeping the message's place."""
    cid = msg.conversation_id
    await Lua(redis, _LET_GO)(
        [keys.conv_lock(cid), keys.conv_pending(cid), keys.conv_wake(cid)],
        [door_owner(msg.job_id)],
    )


async def answered_at_door(redis: Redis, keys: Keys, job_id: str) -> bool:
    """Whether the door already answered this message (its reply job then ends)."""
    return bool(await redis.exists(answered_key(keys, job_id)))

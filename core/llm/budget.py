"""One LLM budget for every worker, and a circuit breaker, both in Redis.

The budget is a token bucket for requests and one for tokens per minute
(``SLUICE_LLM_RPM``, ``SLUICE_LLM_TPM``, times ``SLUICE_LLM_BUDGET_HEADROOM``; when
unset, the limits the provider announces in ``x-ratelimit-limit-*`` are used). It is
corrected from every answer's ``x-ratelimit-remaining-*`` headers (the bucket only
ever goes down to what the provider says is left) and closed for a 429's
``retry-after``. Jobs wait *in line* for it instead of meeting 429s: the line is a
sorted set scored by lane priority (:func:`core.traffic.lanes.priority_ms`), so the head
of the line gets the next request and high-lane jobs overtake. A waiter that stops
polling (a killed worker) drops out of the line after a few seconds.

429s that still come are retried by :func:`core.llm.client.complete_with_retries` (the one
retry layer), which calls :class:`BudgetGate` before every attempt.

The breaker counts provider failures (5xx, timeouts, broken streams; not 429s):
``SLUICE_BREAKER_FAILURES`` within ``SLUICE_BREAKER_WINDOW_S`` open it for
``SLUICE_BREAKER_OPEN_S``; while open no call is made and jobs reply
:func:`unavailable_text` at once. Then it is half-open: one call (the probe) goes
through while other jobs still get the short reply; its success closes the breaker,
its failure opens it again at once. One success also clears the failure count.

Counters for ``sluice status`` and ``sluice bench`` (hash ``{prefix}:llm:stats``):
``calls`` (requests granted), ``calls_in_backlog`` (granted while others waited),
``backlog_ms`` (time during which someone waited), ``wait_ms`` (total time jobs
waited), ``tokens`` (prompt + completion tokens used), ``rate_limited`` (429s met),
``failures``, ``breaker_opens``, ``cache_hits``, ``cache_misses``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.errors import LLMError, LLMRateLimitedError, LLMTransientError, LLMUnavailableError
from core.infra import metrics
from core.infra.redis import Keys
from core.infra.scripts import Lua
from core.llm.client import ChatMessage, Completion
from core.settings import Settings

logger = logging.getLogger(__name__)

STALE_WAITER_MS = 5000
# The head of the line looks again at least this often.
MAX_POLL_S = 1.0
# A waiter behind the head is woken when it becomes the head; it looks again on its own
# after this (a fallback: a wake-up lost, or a lent priority that moved it up). Its
# process's refresh (every REFRESH_S) wakes a blocked waiter that is the head anyway,
# so this is a last resort; each look is a ~18-command script, and under a backlog of
# a hundred waiters a 10 s fallback was ~10 looks a second for nothing.
WAITER_BLOCK_S = 30.0
# How often a process marks its waiters alive and looks for a blocked head.
REFRESH_S = 1.0

# Wake the head of the line (a waiter blocked in its process, see LLMBudget): push its
# name to its process's wake list. KEYS[2]: waiters, KEYS[9]: waiter -> process token.
_WAKE_HEAD = """
local function wake_head()
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if head == nil or head == ARGV[1] then return end
  local proc = redis.call('HGET', KEYS[9], head)
  if proc then
    local key = KEYS[10] .. proc
    redis.call('RPUSH', key, head)
    redis.call('EXPIRE', key, 60)
  end
end
"""

# KEYS: bucket, waiters, seen, stats, breaker-open, breaker-half-open, breaker-probe,
#       the member's lent priority (core.traffic.ordering.park), waiter -> process,
#       the wake lists' prefix.
# ARGV: member, priority, rpm (0: unknown), tpm, est tokens, stale ms, headroom, probe ms,
#       this process's token.
# Returns {status, wait_ms, rank, interval_ms}: status 1 granted, 0 wait, -1 breaker open.
_ACQUIRE = (
    _WAKE_HEAD
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local open_ttl = redis.call('PTTL', KEYS[5])
if open_ttl > 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[9], ARGV[1])
  wake_head()
  return {-1, open_ttl, 0, 0}
end
if redis.call('EXISTS', KEYS[6]) == 1 then
  -- Half-open: one call (the probe) finds out whether the provider is back.
  local probe = redis.call('GET', KEYS[7])
  if probe and probe ~= ARGV[1] then
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('HDEL', KEYS[3], ARGV[1])
    redis.call('HDEL', KEYS[9], ARGV[1])
    wake_head()
    return {-1, math.max(1000, redis.call('PTTL', KEYS[7])), 0, 0}
  end
  if not probe then redis.call('SET', KEYS[7], ARGV[1], 'PX', ARGV[8]) end
end
local st = redis.call('HMGET', KEYS[1], 'rl', 'tl', 'ts', 'blocked', 'lim_r', 'lim_t')
local function limit(conf, learned)
  conf = tonumber(conf)
  learned = tonumber(learned or '0')
  if conf == 0 or (learned > 0 and learned < conf) then conf = learned end
  return math.floor(conf * tonumber(ARGV[7]))
end
local rpm = limit(ARGV[3], st[5])
local tpm = limit(ARGV[4], st[6])
local est = tonumber(ARGV[5])
local ts = tonumber(st[3] or now)
local dt = math.max(0, now - ts)
local rl = tonumber(st[1] or rpm)
local tl = tonumber(st[2] or tpm)
if rpm > 0 then rl = math.min(rpm, rl + dt * rpm / 60000) end
if tpm > 0 then tl = math.min(tpm, tl + dt * tpm / 60000) end
local blocked = tonumber(st[4] or '0')
-- backlog accounting: time during which at least one job waited
local n = redis.call('ZCARD', KEYS[2])
local bstamp = tonumber(redis.call('HGET', KEYS[4], 'backlog_stamp') or '0')
if n > 0 and bstamp > 0 then
  redis.call('HINCRBY', KEYS[4], 'backlog_ms', math.min(now - bstamp, 1000))
end
-- A later message of the same conversation may have lent a better (lower) score.
local prio = tonumber(ARGV[2])
local lent = tonumber(redis.call('GET', KEYS[8]) or ARGV[2])
if lent < prio then prio = lent end
redis.call('ZADD', KEYS[2], 'LT', prio, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], now)
redis.call('HSET', KEYS[9], ARGV[1], ARGV[9])
local dropped = false
while true do
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if head == nil or head == ARGV[1] then break end
  local seen = tonumber(redis.call('HGET', KEYS[3], head) or '0')
  if now - seen <= tonumber(ARGV[6]) then break end
  redis.call('ZREM', KEYS[2], head)
  redis.call('HDEL', KEYS[3], head)
  redis.call('HDEL', KEYS[9], head)
  dropped = true
end
if dropped then wake_head() end
local rank = redis.call('ZRANK', KEYS[2], ARGV[1])
local status = 0
local wait = 0
if now < blocked then
  wait = blocked - now
else
  local need_r = rank + 1
  if (rpm == 0 or rl >= need_r) and (tpm == 0 or tl >= need_r * est) then
    status = 1
    if rpm > 0 then rl = rl - 1 end
    if tpm > 0 then tl = tl - est end
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('HDEL', KEYS[3], ARGV[1])
    redis.call('HDEL', KEYS[9], ARGV[1])
    redis.call('HINCRBY', KEYS[4], 'calls', 1)
    if n > 1 then redis.call('HINCRBY', KEYS[4], 'calls_in_backlog', 1) end
    wake_head()
  else
    if rpm > 0 and rl < 1 then wait = math.max(wait, (1 - rl) * 60000 / rpm) end
    if tpm > 0 and tl < est then wait = math.max(wait, (est - tl) * 60000 / tpm) end
  end
end
if redis.call('ZCARD', KEYS[2]) > 0 then
  redis.call('HSET', KEYS[4], 'backlog_stamp', now)
else
  redis.call('HDEL', KEYS[4], 'backlog_stamp')
end
redis.call('HSET', KEYS[1], 'rl', tostring(rl), 'tl', tostring(tl), 'ts', now)
local interval = 0
if rpm > 0 then interval = 60000 / rpm end
if tpm > 0 then interval = math.max(interval, est * 60000 / tpm) end
return {status, math.ceil(wait), rank, math.ceil(interval)}
"""
)

# KEYS: waiters, seen, waiter -> process, the wake lists' prefix (for wake_head).
# ARGV: member. Leaves the line (a wait that gave up); the next head is woken.
_LEAVE = (
    _WAKE_HEAD.replace("KEYS[9]", "KEYS[3]")
    .replace("KEYS[10]", "KEYS[4]")
    .replace("KEYS[2]", "KEYS[1]")
    + """
local head = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if head == ARGV[1] then wake_head() end
return 1
"""
)

# KEYS: seen, waiters. ARGV: members waiting in this process.
# Marks them alive (Redis time); returns {head of the line, ms since it was last seen}.
_REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fields = {}
for _, m in ipairs(ARGV) do
  fields[#fields + 1] = m
  fields[#fields + 1] = now
end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
if head == nil then return {'', 0} end
return {head, now - tonumber(redis.call('HGET', KEYS[1], head) or '0')}
"""

# KEYS: bucket, stats, fails, half-open, probe.
# ARGV: remaining req (-1 unknown), remaining tok, limit req, limit tok, tokens used.
_SUCCESS = """
local st = redis.call('HMGET', KEYS[1], 'rl', 'tl', 'lim_r', 'lim_t')
-- The first time a limit is learned, the bucket starts from what the provider says
-- is left; after that it is only ever lowered to it (our later grants are not in it).
local function correct(level_field, level, limit_field, known, remaining, limit)
  if tonumber(limit) > 0 then redis.call('HSET', KEYS[1], limit_field, limit) end
  if tonumber(remaining) < 0 then return end
  if (not known and tonumber(limit) > 0) or (level and tonumber(level) > tonumber(remaining)) then
    redis.call('HSET', KEYS[1], level_field, remaining)
  end
end
correct('rl', st[1], 'lim_r', st[3], ARGV[1], ARGV[3])
correct('tl', st[2], 'lim_t', st[4], ARGV[2], ARGV[4])
redis.call('HINCRBY', KEYS[2], 'tokens', ARGV[5])
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
return 1
"""

# KEYS: bucket, stats. ARGV: retry-after ms.
_RATE_LIMITED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
local blocked = tonumber(redis.call('HGET', KEYS[1], 'blocked') or '0')
if until_ms > blocked then redis.call('HSET', KEYS[1], 'blocked', until_ms) end
redis.call('HSET', KEYS[1], 'rl', '0')
redis.call('HINCRBY', KEYS[2], 'rate_limited', 1)
return 1
"""

# KEYS: fails, open, stats, half-open, probe. ARGV: threshold, window ms, open ms.
# Returns open ms or 0. A failed probe (half-open) opens the breaker again at once.
_FAILURE = """
redis.call('HINCRBY', KEYS[3], 'failures', 1)
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n >= tonumber(ARGV[1]) or redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('DEL', KEYS[1], KEYS[5])
  if redis.call('SET', KEYS[2], '1', 'PX', ARGV[3], 'NX') then
    redis.call('HINCRBY', KEYS[3], 'breaker_opens', 1)
  end
  redis.call('SET', KEYS[4], '1', 'EX', 86400)
  return redis.call('PTTL', KEYS[2])
end
return 0
"""


def unavailable_text(retry_in_s: float | None) -> str:
    """The short reply while the breaker is open."""
    minutes = max(1, math.ceil((retry_in_s or 60) / 60))
    unit = "minute" if minutes == 1 else "minutes"
    return f"The assistant is unavailable right now; please try again in {minutes} {unit}."


# What one image part counts against a TPM limit: OpenAI's cost of a 1024x1024 image
# at high detail (85 + 4 tiles * 170).
IMAGE_TOKENS = 765


def estimate_tokens(messages: Sequence[ChatMessage], max_tokens: int) -> int:
    """What a request counts against a TPM limit: ~4 characters a token, plus
    :data:`IMAGE_TOKENS` per image part, plus max_tokens."""
    chars = images = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "image_url":
                    images += 1
                elif isinstance(part.get("text"), str):
                    chars += len(part["text"])
    return math.ceil(chars / 4) + images * IMAGE_TOKENS + max_tokens


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _header_int(headers: dict[str, str], name: str) -> int:
    try:
        return int(float(headers[name]))
    except (KeyError, ValueError):
        return -1


class LLMBudget:
    """The shared budget and breaker; one per worker process, over the shared Redis."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._bucket = keys.llm("bucket")
        self._waiters = keys.llm("waiters")
        self._seen = keys.llm("seen")
        self.stats_key = keys.llm("stats")
        self._open = keys.llm("breaker:open")
        self._fails = keys.llm("breaker:fails")
        self._half = keys.llm("breaker:half-open")
        self._probe = keys.llm("breaker:probe")
        self._procs = keys.llm("waiter-procs")
        self._wake_prefix = keys.llm("wake:")
        self._keys = keys
        # This process's waiters: woken through one wake list per process.
        self._proc = uuid.uuid4().hex
        self._local: dict[str, asyncio.Event] = {}
        self._blocked: set[str] = set()
        self._listener: asyncio.Task[None] | None = None
        self._acquire = Lua(redis, _ACQUIRE)
        self._leave_line = Lua(redis, _LEAVE)
        self._refresh = Lua(redis, _REFRESH)
        self._success = Lua(redis, _SUCCESS)
        self._rate_limited = Lua(redis, _RATE_LIMITED)
        self._failure = Lua(redis, _FAILURE)

    async def breaker_open_for(self) -> float:
        """Seconds until the breaker closes (0 when closed)."""
        ttl = int(await self._redis.pttl(self._open))
        return ttl / 1000 if ttl > 0 else 0.0

    async def expected_wait_s(self) -> float:
        """How long a new request would wait for this budget now, by requests per minute:
        ``inf`` while the breaker is open, 0 when the bucket has room for everyone in line
        and one more. The provider pool (:mod:`core.llm.pool`) picks by it."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.pttl(self._open)
            pipe.hmget(self._bucket, ["rl", "ts", "blocked", "lim_r"])
            pipe.zcard(self._waiters)
            (secs, usecs), open_ttl, (level, ts, blocked, learned), waiting = await pipe.execute()
        if int(open_ttl) > 0:
            return math.inf
        now_ms = int(secs) * 1000 + int(usecs) // 1000
        blocked_s = max(0.0, (float(blocked or 0) - now_ms) / 1000)
        rpm = float(self._settings.llm_rpm or 0)
        if learned is not None and (rpm == 0 or 0 < int(learned) < rpm):
            rpm = float(learned)
        rpm *= self._settings.llm_budget_headroom
        if rpm <= 0:
            return blocked_s
        have = rpm
        if level is not None:
            elapsed_ms = max(0.0, now_ms - float(ts or now_ms))
            have = min(rpm, float(level) + elapsed_ms * rpm / 60_000)
        short = int(waiting) + 1 - have
        return max(blocked_s, short * 60 / rpm if short > 0 else 0.0)

    async def acquire(
        self,
        member: str,
        priority_ms: int,
        est_tokens: int,
        on_queued: Callable[[float], Awaitable[None]] | None = None,
    ) -> float:
        """Wait in line for one request's budget; returns the seconds waited.

        ``on_queued`` is called once with the expected wait when that first exceeds
        ``SLUICE_QUEUED_NOTICE_AFTER_S``.

        Raises:
            LLMUnavailableError: the breaker is open, or the wait passed
                ``SLUICE_LLM_BUDGET_WAIT_S``.
        """
        woken = asyncio.Event()
        self._local[member] = woken
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="sluice-llm-budget-wake")
        try:
            return await self._wait_in_line(member, priority_ms, est_tokens, on_queued, woken)
        finally:
            self._local.pop(member, None)
            self._blocked.discard(member)

    async def _wait_in_line(
        self,
        member: str,
        priority_ms: int,
        est_tokens: int,
        on_queued: Callable[[float], Awaitable[None]] | None,
        woken: asyncio.Event,
    ) -> float:
        s = self._settings
        started = time.monotonic()
        told = False
        keys = [
            self._bucket,
            self._waiters,
            self._seen,
            self.stats_key,
            self._open,
            self._half,
            self._probe,
            self._keys.llm_lent(member),
            self._procs,
            self._wake_prefix,
        ]
        probe_ms = int((s.llm_timeout_s + 5) * 1000)
        while True:
            woken.clear()
            res: list[Any] = await self._acquire(
                keys,
                [
                    member,
                    priority_ms,
                    s.llm_rpm or 0,
                    s.llm_tpm or 0,
                    est_tokens,
                    STALE_WAITER_MS,
                    s.llm_budget_headroom,
                    probe_ms,
                    self._proc,
                ],
            )
            status, wait_ms, rank, interval_ms = (int(x) for x in res)
            waited = time.monotonic() - started
            if status == 1:
                if waited > 0.001:
                    metrics.LLM_BUDGET_WAITS.inc()
                    await self._redis.hincrby(  # type: ignore[misc]
                        self.stats_key, "wait_ms", int(waited * 1000)
                    )
                return waited
            if status == -1:
                raise LLMUnavailableError("the provider circuit breaker is open", wait_ms / 1000)
            if waited > s.llm_budget_wait_s:
                await self._leave(member)
                raise LLMUnavailableError(f"no LLM budget within {s.llm_budget_wait_s:.0f} s")
            expected_s = (wait_ms + rank * interval_ms) / 1000
            if on_queued is not None and not told and expected_s > s.queued_notice_after_s:
                told = True
                await on_queued(expected_s)
            if rank == 0:
                # The head: the bucket has its request in wait_ms.
                self._blocked.discard(member)
                delay = min(MAX_POLL_S, max(0.005, wait_ms / 1000))
            else:
                # Behind the head: woken when it becomes the head (see _listen).
                self._blocked.add(member)
                delay = max(0.005, min(WAITER_BLOCK_S, s.llm_budget_wait_s - waited + 0.01))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), delay)

    async def _listen(self) -> None:
        """Wake this process's waiters while it has any: names pushed to its wake list
        (the head changed), and, once a second, mark them alive in the line (one call
        for all) and wake a blocked one that is the head, or the first one when the
        head's process stopped marking it (dead: that waiter's call drops it)."""
        wake_key = self._wake_prefix + self._proc
        last_refresh = 0.0
        while self._local:
            try:
                popped: Any = await self._redis.blpop(  # type: ignore[misc]
                    [wake_key],
                    timeout=REFRESH_S,  # type: ignore[arg-type]  # Redis takes fractions
                )
                if popped:
                    self._wake(_text(popped[1]))
                if time.monotonic() - last_refresh < REFRESH_S or not self._local:
                    continue
                last_refresh = time.monotonic()
                head_raw, age_ms = await self._refresh(
                    [self._seen, self._waiters], list(self._local)
                )
                head = _text(head_raw)
                if head in self._blocked:
                    self._wake(head)
                elif head and head not in self._local and int(age_ms) > STALE_WAITER_MS:
                    self._wake(next(iter(self._local)))
            except (RedisError, OSError) as e:
                # Waiters still look again on their own (WAITER_BLOCK_S).
                logger.warning("llm budget: cannot wait for wake-ups: %s", e)
                await asyncio.sleep(REFRESH_S)

    def _wake(self, member: str) -> None:
        event = self._local.get(member)
        if event is not None:
            event.set()

    async def _leave(self, member: str) -> None:
        await self._leave_line(
            [self._waiters, self._seen, self._procs, self._wake_prefix], [member]
        )

    async def succeeded(self, completion: Completion) -> None:
        """Correct the bucket from the answer's headers; count tokens; reset the breaker."""
        h = completion.headers
        await self._success(
            [self._bucket, self.stats_key, self._fails, self._half, self._probe],
            [
                _header_int(h, "x-ratelimit-remaining-requests"),
                _header_int(h, "x-ratelimit-remaining-tokens"),
                _header_int(h, "x-ratelimit-limit-requests"),
                _header_int(h, "x-ratelimit-limit-tokens"),
                completion.tokens_in + completion.tokens_out,
            ],
        )

    async def failed(self, error: LLMError) -> None:
        """A 429 closes the bucket for its ``retry-after``; other transient errors count
        towards opening the breaker."""
        if isinstance(error, LLMRateLimitedError):
            retry_ms = int((error.retry_after_s or 1.0) * 1000)
            await self._rate_limited([self._bucket, self.stats_key], [retry_ms])
            # The provider answers: it is up, whatever the breaker thought.
            await self._redis.delete(self._half, self._probe)
            return
        if isinstance(error, LLMTransientError):
            s = self._settings
            opened = await self._failure(
                [self._fails, self._open, self.stats_key, self._half, self._probe],
                [s.breaker_failures, int(s.breaker_window_s * 1000), int(s.breaker_open_s * 1000)],
            )
            if int(opened) > 0:
                logger.warning("llm circuit breaker open for %.0fs", int(opened) / 1000)
            return
        # A refused request (4xx) still shows the provider is up.
        await self._redis.delete(self._half, self._probe)

    async def count(self, field: str, n: int = 1) -> None:
        """Add to one of the counters (e.g. ``cache_hits``)."""
        await self._redis.hincrby(self.stats_key, field, n)  # type: ignore[misc]

    async def stats(self) -> dict[str, int]:
        """The counters, for ``sluice status`` and ``sluice bench``."""
        raw: dict[Any, Any] = await self._redis.hgetall(self.stats_key)  # type: ignore[misc]
        out = {}
        for k, v in raw.items():
            key = k.decode() if isinstance(k, bytes) else str(k)
            if key != "backlog_stamp":
                out[key] = int(v)
        out["waiting"] = int(await self._redis.zcard(self._waiters))
        return out


def quota_use_in_backlog(stats: dict[str, int], rpm: int) -> float | None:
    """Share of the provider's request quota used while jobs waited in line
    (``calls_in_backlog`` over what ``rpm`` allowed during ``backlog_ms``); ``None``
    when there was no backlog. The bench's "quota use while a backlog existed"."""
    backlog_ms = stats.get("backlog_ms", 0)
    if backlog_ms <= 0:
        return None
    return stats.get("calls_in_backlog", 0) / (rpm * backlog_ms / 60_000)


class BudgetGate:
    """What :func:`core.llm.client.complete_with_retries` calls around each attempt of one job."""

    def __init__(
        self,
        budget: LLMBudget,
        member: str,
        priority_ms: int,
        est_tokens: int,
        on_queued: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.budget = budget
        self.member = member
        self.priority_ms = priority_ms
        self.est_tokens = est_tokens
        self.on_queued = on_queued
        self.waited_s = 0.0

    async def before_call(self) -> None:
        """Wait for budget (raises :class:`LLMUnavailableError` when the breaker is open)."""
        self.waited_s += await self.budget.acquire(
            self.member, self.priority_ms, self.est_tokens, self.on_queued
        )

    async def after_success(self, completion: Completion) -> None:
        """Report a finished call."""
        await self.budget.succeeded(completion)

    async def after_failure(self, error: LLMError) -> None:
        """Report a failed call."""
        await self.budget.failed(error)

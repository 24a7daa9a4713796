"""Refreshing queued notices: one sweeping loop per worker process, not a job per refresh.

A message that waits long (``SLUICE_NOTICE_REFRESH_AFTER_S``) gets its queued notice
refreshed every ``SLUICE_NOTICE_REFRESH_EVERY_S`` until its answer starts. Each refresh
used to be an arq job of its own (enqueue, pick, start, finish: ~30 Redis commands with
arq's ``WATCH``/``MULTI``/``EXEC``); under a backlog of a minute and more that was most of
the Redis commands a message cost. Now a notice to refresh is one member of a sorted set
(:meth:`core.infra.redis.Keys.notice_refresh`, scored by when it is due, in Redis time)
with its message in a hash beside it, and every worker process runs one
:class:`Refresher` next to its reserved notice loop (:mod:`workers.notices`):

- :data:`_CLAIM` takes the due notices in one script call and re-scores each one
  ``SLUICE_NOTICE_REFRESH_EVERY_S`` ahead (a lease, which is also its next refresh): a
  refresher that dies mid-refresh leaves it to the next sweep of any worker, and two
  workers never refresh one notice in the same round.
- Each claimed notice is refreshed (:func:`workers.traffic_jobs.refresh_notice`); one
  that is over (the answer started, the message is gone, ``MAX_REFRESHES`` reached, or
  the refresh failed) leaves the set.
- The loop sleeps until the earliest due notice (at least :data:`MIN_SLEEP_MS`, so
  notices falling due close together are claimed in one call), at most one refresh
  interval: a notice added meanwhile is due a whole interval after it was added, so
  none is refreshed later than that least sleep and the sweep itself take. An idle
  worker sweeps once per interval.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.infra.redis import Keys
from core.infra.scripts import Lua
from core.messages import IncomingMessage
from core.settings import Settings

logger = logging.getLogger(__name__)

# Refreshes of one notice at most (a wait is bounded by SLUICE_MAX_WAIT_S anyway).
MAX_REFRESHES = 400
# Notices claimed by one sweep (a full batch sweeps again at once).
BATCH = 100
# A refresh that takes longer is abandoned (the reserved path's job timeout).
REFRESH_TIMEOUT_S = 30.0
# Least sleep between sweeps: notices falling due within it are claimed together (one
# script call), at most this late.
MIN_SLEEP_MS = 1000.0
# After a Redis error, the next sweep.
RETRY_S = 1.0

# KEYS: due set, messages, counts. ARGV: job id, message JSON, refreshes done, every ms.
# Schedule a notice's refresh one interval from now (Redis time).
_SCHEDULE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
return now
"""

# KEYS: due set, messages, counts. ARGV: every ms, batch, max refreshes.
# Claim the due notices: each is re-scored one interval ahead (its lease and next
# refresh) and counted; one without its message or past the maximum leaves the set.
# Returns {now ms, earliest due score or false, {job id, message, n, ...}}.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(due) do
  local msg = redis.call('HGET', KEYS[2], id)
  local n = redis.call('HINCRBY', KEYS[3], id, 1)
  if msg and n <= tonumber(ARGV[3]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
    out[#out + 1] = id
    out[#out + 1] = msg
    out[#out + 1] = n
  else
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
  end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {now, first[2] or false, out}
"""


def _keys(keys: Keys) -> list[str]:
    return [keys.notice_refresh(), keys.notice_refresh_payload(), keys.notice_refresh_count()]


def _every_ms(settings: Settings) -> int:
    return max(1, int(settings.notice_refresh_every_s * 1000))


async def schedule_refresh(
    redis: Redis, keys: Keys, settings: Settings, msg: IncomingMessage, done: int
) -> None:
    """Refresh ``msg``'s queued notice one interval from now; ``done``: refreshes so far."""
    await Lua(redis, _SCHEDULE)(
        _keys(keys), [msg.job_id, msg.model_dump_json(), done, _every_ms(settings)]
    )


async def drop_refresh(redis: Redis, keys: Keys, job_id: str) -> None:
    """No more refreshes of ``job_id``'s notice."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrem(keys.notice_refresh(), job_id)
        pipe.hdel(keys.notice_refresh_payload(), job_id)
        pipe.hdel(keys.notice_refresh_count(), job_id)
        await pipe.execute()


RefreshFn = Callable[[dict[str, Any], IncomingMessage], Awaitable[bool]]


class Refresher:
    """The sweeping loop of one worker process (see the module docstring); ``ctx`` is
    the worker's (Redis, responders, traffic), ``refresh`` refreshes one notice and
    says whether to keep refreshing it (:func:`workers.traffic_jobs.refresh_notice`)."""

    def __init__(
        self, settings: Settings, keys: Keys, ctx: dict[str, Any], refresh: RefreshFn
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.ctx = ctx
        self.refresh = refresh
        self.redis: Redis = ctx["redis"]
        self._claim = Lua(self.redis, _CLAIM)
        self._slots = asyncio.Semaphore(max(1, settings.notice_max_jobs))

    async def sweep(self) -> tuple[int, float]:
        """Refresh every due notice once; returns how many were claimed and how long to
        sleep until the next sweep (seconds)."""
        every_ms = _every_ms(self.settings)
        now, first, flat = await self._claim(_keys(self.keys), [every_ms, BATCH, MAX_REFRESHES])
        claimed = [(flat[i], flat[i + 1], int(flat[i + 2])) for i in range(0, len(flat), 3)]
        if claimed:
            await asyncio.gather(*(self._one(job, raw, n) for job, raw, n in claimed))
        if len(claimed) >= BATCH:
            return len(claimed), 0.0
        until_ms = (float(first) - int(now)) if first is not None else every_ms
        return len(claimed), min(every_ms, max(MIN_SLEEP_MS, until_ms)) / 1000

    async def _one(self, raw_job: bytes | str, raw: bytes | str, n: int) -> None:
        job_id = raw_job.decode() if isinstance(raw_job, bytes) else raw_job
        keep = False
        async with self._slots:
            try:
                msg = IncomingMessage.model_validate(json.loads(raw))
                keep = await asyncio.wait_for(
                    self.refresh(self.ctx, msg), timeout=REFRESH_TIMEOUT_S
                )
            except Exception as e:  # one notice's failure must not stop the others
                logger.warning("notice of job=%s not refreshed (no more tries): %r", job_id, e)
        if not keep or n >= MAX_REFRESHES:
            try:
                await drop_refresh(self.redis, self.keys, job_id)
            except (RedisError, OSError) as e:
                logger.warning("refresh of job=%s not dropped (the next sweep does): %s", job_id, e)

    async def run(self) -> None:
        """Sweep until cancelled; Redis errors are logged and the sweep tried again."""
        while True:
            try:
                _, delay = await self.sweep()
            except (RedisError, OSError) as e:
                logger.warning("queued notice refresher: %s (again in %.0f s)", e, RETRY_S)
                delay = RETRY_S
            if delay > 0:
                await asyncio.sleep(delay)

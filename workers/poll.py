"""The worker's poll: start due jobs in one Lua call, and block while idle.

Two costs of arq's own poll are removed here, both Redis commands that grow with the
number of workers and running jobs rather than with messages:

- **Idle workers block.** arq polls every ``poll_delay`` (``SLUICE_WORKER_POLL_DELAY_S``)
  whatever happens. :class:`BlockingPoll` polls as arq does while there is work, but
  a poll that starts nothing blocks on the queue's wake list
  (:mod:`core.traffic.wake`, ``BLPOP``) until an enqueuer pushes a token, the next
  deferred job falls due, or ``SLUICE_WORKER_IDLE_BLOCK_S`` passes (the fallback: a
  lost push costs latency, never a job). A worker whose slots are all taken waits,
  without Redis, for one of its jobs to end (or the same fallback).
- **Running jobs are looked up in O(1).** Running jobs stay in arq's queue until they
  end, at its head under a backlog. The Sluice poll used to ``EXISTS`` each one's
  in-progress marker on every poll. :data:`START_DUE_LUA` keeps an index of running
  jobs per queue (``{queue}:running``, a sorted set scored by when the in-progress
  marker expires) and skips a page of 100 running ids with one ``ZMSCORE``. It also
  takes the in-progress marker itself (``SET NX``, atomic in the script) instead of
  arq's ``WATCH``/``MULTI`` round trips per job, and claims the job's delivery for
  this worker (:mod:`workers.reaper`) in the same call.

The index is kept where in-progress markers are deleted: a job's end
(:func:`workers.reaper.track_finished`) and the hand-back of a dead worker's jobs
(:func:`workers.reaper.reap`). An entry that outlives its marker some other way holds
its job back until the entry's score passes, exactly as long as arq's own marker would
have (``job_timeout`` + 10 s). A marker set by something else (arq's stock worker)
is still honoured: an id not in the index is started only if ``SET NX`` takes its
marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from arq.worker import Worker
from redis.exceptions import RedisError

from core.traffic.schedule import SWEEP_LUA
from core.traffic.wake import wake_key

logger = logging.getLogger(__name__)

# How many queue ids one ZMSCORE looks at.
PAGE = 100


def running_key(queue: str) -> str:
    """The index of an arq queue's running jobs (id -> when its marker expires, ms)."""
    return f"{queue}:running"


class BlockingPoll(Worker):
    """An arq worker whose idle polls block on the queue's wake list.

    ``idle_block_s`` (``SLUICE_WORKER_IDLE_BLOCK_S``): the longest an idle worker
    blocks before it polls anyway; ``0`` polls every ``poll_delay`` as arq does.
    """

    def __init__(self, *args: Any, idle_block_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_block_s = idle_block_s
        self.idle_blocks = 0
        self._slot_freed = asyncio.Event()
        self._picked = 0
        self._next_due_ms: int | None = None

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._slot_freed.set()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's start, noting whether the poll found anything to start."""
        self._picked = len(job_ids)
        await super().start_jobs(job_ids)

    async def _poll_iteration(self) -> None:
        self._picked = 0
        self._next_due_ms = None
        await super()._poll_iteration()
        if self.idle_block_s > 0 and not self.burst and self.allow_pick_jobs:
            await self._idle_wait()

    async def _idle_wait(self) -> None:
        """Block until there may be work for this worker (see the module's docstring)."""
        if self.job_counter >= self.max_jobs:
            self._slot_freed.clear()
            if self.job_counter >= self.max_jobs:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), self.idle_block_s)
            return
        if self._picked:
            return
        timeout_s = self.idle_block_s
        if self._next_due_ms is not None:
            timeout_s = min(timeout_s, max(0.0, self._next_due_ms / 1000 - time.time()))
        if timeout_s < 0.01:
            return
        self.idle_blocks += 1
        try:
            # A blocking pop on a pooled connection: the pool lends it for the block.
            await self.pool.blpop(  # type: ignore[misc]
                [wake_key(self.queue_name)],
                timeout=timeout_s,  # type: ignore[arg-type]  # Redis takes fractions of s
            )
        except (RedisError, OSError) as e:
            # The next poll meets the same outage and handles it as arq does.
            logger.warning("cannot wait on the wake list of %s: %s", self.queue_name, e)


# KEYS: queue, its deadline index, its running index, this worker's job set ('' key
#       ignored when ARGV[10] is '').
# ARGV: now ms, free slots, in-progress key prefix, most ids to look at, band shift ms,
#       sweep batch, slots kept for in-time work, the score from which a reply job is
#       not in the in-time band, in-progress ms, worker member ('' none), job owner key
#       prefix, answered key prefix, owner ttl s.
# Returns {id, score, answered, id, score, answered, ..., next due ms or -1}.
# First the deadline sweep (core.traffic.schedule: jobs that turned late move behind
# the ones still in time), then the first ``free`` ids due by score whose job is not
# running, each started here (its in-progress marker taken with SET NX, its index
# entry, its owner); reply jobs past the in-time band (late ones) never take the last
# ``reserve`` slots. When nothing starts: expired index entries go, and the score of
# the next job not due yet is returned (the idle worker's block ends then).
START_DUE_LUA = (
    SWEEP_LUA
    + """
sweep(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[5]), tonumber(ARGV[6]))
local now = tonumber(ARGV[1])
local out = {}
local started = 0
local offset = 0
local free = tonumber(ARGV[2])
local limit = tonumber(ARGV[4])
local late_room = free - tonumber(ARGV[7])
local boundary = tonumber(ARGV[8])
local member = ARGV[10]
local done = false
while not done and started < free and offset < limit do
  local page = redis.call(
    'ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', offset, PAGE)
  if #page == 0 then break end
  local ids = {}
  for i = 1, #page, 2 do ids[#ids + 1] = page[i] end
  local marks = redis.call('ZMSCORE', KEYS[3], unpack(ids))
  for j, id in ipairs(ids) do
    local score = page[2 * j]
    local late = tonumber(score) >= boundary and string.find(id, ':reply:', 1, true)
    if late and late_room <= 0 then
      -- Only late reply jobs and later housekeeping follow: leave them for a freer poll.
      done = true
      break
    end
    if not (marks[j] and tonumber(marks[j]) > now)
        and redis.call('SET', ARGV[3] .. id, '1', 'PX', ARGV[9], 'NX') then
      redis.call('ZADD', KEYS[3], now + tonumber(ARGV[9]), id)
      local answered = 0
      if member ~= '' then
        redis.call('SET', ARGV[11] .. id, member, 'EX', ARGV[13])
        answered = redis.call('EXISTS', ARGV[12] .. id)
      end
      out[#out + 1] = id
      out[#out + 1] = score
      out[#out + 1] = answered
      started = started + 1
      if late then late_room = late_room - 1 end
      if started >= free then break end
    end
  end
  offset = offset + #ids
end
if started > 0 and member ~= '' then
  for i = 1, #out, 3 do redis.call('SADD', KEYS[4], out[i]) end
  redis.call('EXPIRE', KEYS[4], ARGV[13])
end
local next_due = -1
if started == 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  local nxt = redis.call(
    'ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if nxt[2] then next_due = nxt[2] end
end
out[#out + 1] = next_due
return out
""".replace("PAGE", str(PAGE))
)

"""The order in which waiting messages are served: lanes, fair shares, target wait.

Every reply job waits in the arq queue, and once started in the LLM budget's line,
by one *score* (lowest first). Three things set it:

- **Lanes** (:mod:`core.traffic.lanes`): a message's lane gives it a head start
  (``SLUICE_LANE_HIGH_BOOST_S``, ``SLUICE_LANE_DEFAULT_BOOST_S``).
- **Fair shares** (virtual-time fair queuing): each user has a virtual clock in Redis.
  A message starts at ``max(arrival, the user's clock)`` and moves the clock on by
  ``SLUICE_FAIR_STEP_S`` divided by the tenant's weight (``SLUICE_TENANT_WEIGHTS``).
  So a user's second queued message waits behind the first messages other users send
  within that step, a user who sends 20 messages at once is spread over 20 steps,
  and a user who sends at a normal pace never notices. Heavy users are still served,
  only later: the clock is a score, not a limit. It never runs more than
  :data:`MAX_AHEAD_MS` ahead of the message's arrival. A message that arrives while
  its user's clock is more than one unweighted step ahead (more than one message
  waiting ahead; a tenant of weight w: w) is *over its share*: it is late at once, in
  a band of its own after the late one (below), so under overload a heavy sender's
  extras never take the quota from messages that can still make their target, nor
  from other users' late messages: heavy users are served last, not dropped.
- **Target wait** (``SLUICE_TARGET_WAIT_S``): a message whose answer can still come
  within the target goes before one that already cannot. Scores live in three bands:
  *in time* (:data:`IN_TIME_BAND_MS` in the past), *late* (:data:`LATE_BAND_MS` in
  the past) and *over share* (:data:`OVER_SHARE_BAND_MS` in the past), all due for
  arq: in-time < late < over-share. A message becomes late ``SLUICE_TARGET_MARGIN_S``
  before its target passes, or at once when its fair start is already past that
  point. Queued in-time messages are listed in a deadline index
  (``{queue}:sched-deadlines``); each worker poll moves those that turned
  late into the late band (:data:`SWEEP_LUA`, run by ``workers.settings``) before it
  picks jobs (never into the over-share band). Late messages are still answered, in
  their own order, after the ones in time; over-share ones after the late ones.

Within a band the order is the fair start minus the lane's head start, so lanes
and fairness hold among late and over-share messages too. Per-conversation order does not come
from scores at all (:mod:`core.traffic.ordering` keeps it, and a parked job lends its score
to the messages it waits for, whatever band they are in).

The band a job joins the budget line with is the one it has when it starts; it
keeps that place while it waits there (it holds a worker slot, and the line is short
next to the queue), so a started job is never pushed back behind newer ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.infra.redis import Keys
from core.infra.scripts import Lua
from core.traffic.lanes import boost_ms

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from core.messages import IncomingMessage
    from core.settings import Settings

__all__ = [
    "BAND_SHIFT_MS",
    "IN_TIME_BAND_MS",
    "LATE_BAND_MS",
    "MAX_AHEAD_MS",
    "OVER_SHARE_BAND_MS",
    "SWEEP_BATCH",
    "SWEEP_LUA",
    "Place",
    "budget_score",
    "deadlines_key",
    "default_place",
    "fair_key",
    "message_place",
    "place_message",
    "score_of",
    "tenant_weight",
]

HOUR_MS = 3_600_000
# In-time scores sit five hours in the past, late ones three, over-share ones one: all
# are due for arq, every in-time score is below every late one and every late one below
# every over-share one (for messages up to about an hour old), and arq's job key (TTL:
# score - now + 1 day) lives for 19 h at least.
IN_TIME_BAND_MS = 5 * HOUR_MS
LATE_BAND_MS = 3 * HOUR_MS
OVER_SHARE_BAND_MS = HOUR_MS
# A user's virtual clock never runs further ahead of a message's arrival than this,
# so an over-share score (fair start - OVER_SHARE_BAND_MS) is never in the future.
MAX_AHEAD_MS = OVER_SHARE_BAND_MS
# How many index entries one poll moves at most.
SWEEP_BATCH = 200
DEADLINES_TTL_S = 2 * 3600

# KEYS: the user's clock, the queue's deadline index.
# ARGV: arrival ms, step ms (0: no fair shares), most ms ahead, ms until late,
#       arq job id, index ttl s, unweighted step ms.
# Returns {fair start ms, late-at ms, over share 0/1}; an in-time message joins the
# index. A message over its user's share (fair start more than one step after its
# arrival) is late at once, in the over-share band.
_PLACE = """
local a = tonumber(ARGV[1])
local step = tonumber(ARGV[2])
local ahead = tonumber(ARGV[3])
local start = a
if step > 0 then
  local clock = tonumber(redis.call('GET', KEYS[1]) or '0')
  if clock > start then start = clock end
  if start > a + ahead then start = a + ahead end
  local nxt = math.min(start + step, a + ahead)
  redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', math.max(1, nxt - a))
end
local late_at = a + tonumber(ARGV[4])
-- Over its share: the user already has more than one unweighted step of messages
-- waiting ahead (a tenant of weight w: w messages). It goes behind every message that
-- can still make its target, and behind every late one too.
local over = 0
if step > 0 and start - a > tonumber(ARGV[7]) then over = 1 end
if over == 1 or start >= late_at then
  late_at = a
else
  redis.call('ZADD', KEYS[2], late_at, ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
return {string.format('%d', start), string.format('%d', late_at), over}
"""

# The deadline sweep, a Lua function that a worker's poll script calls before it picks
# jobs: sweep(queue, deadline index, now ms, band shift ms, batch). Jobs whose late-at
# time passed move from the in-time band to the late band (only from the in-time band:
# never into the over-share band, never past now). A parked
# job (score in the future) is looked at again a second later; a job no longer queued
# (answered) leaves the index. Returns how many moved.
SWEEP_LUA = """
local function sweep(queue, index, now, shift, batch)
  local due = redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, batch)
  local moved = 0
  for _, id in ipairs(due) do
    local score = redis.call('ZSCORE', queue, id)
    if not score then
      redis.call('ZREM', index, id)
    elseif tonumber(score) > now then
      redis.call('ZADD', index, now + 1000, id)
    else
      -- Only an in-time score moves (once): a stale entry, e.g. re-added by a duplicate
      -- delivery, must never push a late job into the future.
      if tonumber(score) <= now - MIDWAY then
        redis.call('ZADD', queue, 'XX', tonumber(score) + shift, id)
        moved = moved + 1
      end
      redis.call('ZREM', index, id)
    end
  end
  return moved
end
""".replace("MIDWAY", str((IN_TIME_BAND_MS + LATE_BAND_MS) // 2))
BAND_SHIFT_MS = IN_TIME_BAND_MS - LATE_BAND_MS


@dataclass(frozen=True)
class Place:
    """Where a message stands: its fair start (before the lane's head start) and the
    time from which it counts as late, both in ms since the epoch, and whether it came
    over its user's share (then it waits in the over-share band, after the late one)."""

    fair_ms: int
    late_at_ms: int
    over_share: bool = False


def tenant_weight(settings: Settings, tenant: str) -> float:
    """The tenant's share weight (``SLUICE_TENANT_WEIGHTS``; 1 when not listed)."""
    return settings.tenant_weights.get(tenant, 1.0)


def deadlines_key(queue: str) -> str:
    """The deadline index of one queue: its in-time jobs (arq ids) by the time they turn
    late. Named after the queue, so it lives under the same prefix."""
    return f"{queue}:sched-deadlines"


def fair_key(keys: Keys, tenant: str, user: str) -> str:
    """The Redis key of one user's virtual clock. Ids are hashed: they come from
    platforms and users and may be long or odd; the key stays short and plain."""
    digest = hashlib.sha256(f"{tenant}\x00{user}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"{keys.prefix}:fair:{digest[:32]}"


async def place_message(
    redis: Redis,
    settings: Settings,
    msg: IncomingMessage,
    *,
    queue: str,
    arq_id: str,
    arrived_ms: int,
) -> Place:
    """Take ``msg``'s place in line: advance its user's virtual clock and, when the
    message can still be answered in time, list it in ``queue``'s deadline index."""
    keys = Keys(settings.key_prefix)
    step_ms = int(settings.fair_step_s * 1000 / tenant_weight(settings, msg.tenant))
    res = await Lua(redis, _PLACE)(
        [fair_key(keys, msg.tenant, msg.user), deadlines_key(queue)],
        [
            arrived_ms,
            step_ms,
            MAX_AHEAD_MS,
            int((settings.target_wait_s - settings.target_margin_s) * 1000),
            arq_id,
            DEADLINES_TTL_S,
            int(settings.fair_step_s * 1000),
        ],
    )
    return Place(fair_ms=int(res[0]), late_at_ms=int(res[1]), over_share=bool(int(res[2])))


def default_place(settings: Settings, arrived_ms: int) -> Place:
    """The place of a message enqueued without one (by an older version): its arrival."""
    late_in_ms = int((settings.target_wait_s - settings.target_margin_s) * 1000)
    return Place(fair_ms=arrived_ms, late_at_ms=arrived_ms + late_in_ms)


def score_of(
    settings: Settings, lane: str, place: Place, now_ms: int, *, boosted: bool = True
) -> int:
    """The score (lower first) of a message at ``place`` as of ``now_ms``: its fair start
    less its lane's head start (``boosted``; not in per-lane queues), in the in-time
    band or, from its late-at time on, in the late band; in the over-share band when
    it came over its user's share."""
    key = place.fair_ms - (boost_ms(settings, lane) if boosted else 0)
    if place.over_share:
        return key - OVER_SHARE_BAND_MS
    late = now_ms >= place.late_at_ms
    return key - (LATE_BAND_MS if late else IN_TIME_BAND_MS)


def message_place(settings: Settings, msg: IncomingMessage, now_ms: int) -> Place:
    """The place ``msg`` was enqueued with (carried in the job), else its arrival
    (its platform time stamp, never later than ``now_ms``)."""
    if msg.fair_ms is not None and msg.late_at_ms is not None:
        return Place(fair_ms=msg.fair_ms, late_at_ms=msg.late_at_ms, over_share=msg.over_share)
    arrived_ms = min(now_ms, int(msg.ts * 1000)) if msg.ts > 0 else now_ms
    return default_place(settings, arrived_ms)


def budget_score(settings: Settings, msg: IncomingMessage, now_ms: int) -> int:
    """``msg``'s place in the LLM budget's line as of ``now_ms``: the same score as in
    the one queue (lane head start included, in-time or late band)."""
    return score_of(settings, msg.lane, message_place(settings, msg, now_ms), now_ms)

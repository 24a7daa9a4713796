"""Discord's REST API, paced for every worker at once.

Discord limits each route per major id (channel, webhook token) in *buckets* that it
describes in ``X-RateLimit-*`` headers, and every bot to 50 requests per second
overall. A worker pool shares one bot token, so pacing state must be shared too:
it lives in Redis and two Lua scripts read and update it atomically.

- Before a request, :data:`_ACQUIRE` checks a global pause (set after a global 429),
  a sliding one-second window of requests from all workers (``SLUICE_DISCORD_GLOBAL_RPS``,
  below Discord's 50) and the route's bucket; it reserves a slot or says how long
  to wait. An unknown bucket lets one request through to learn its limits.
  Best-effort requests (streamed edits, typing) leave the last slot of a bucket and
  a few of the global window to requests that must go out (final text).
- A request counts as *in flight* from its slot until its answer is folded in. When a
  bucket's window turns over, the requests still in flight are taken from the new
  window: one that reaches Discord late (a slow network, a busy host) lands in
  Discord's next window, and without this the pool's fresh window would overfill it.
- After a response, :data:`_UPDATE` folds the bucket headers in; a 429 sets the
  bucket (or the global pause) to wait out ``retry_after``. A global 429 also halves
  the pool's global rate for 30 s: something else is using the same token's budget
  (the host bot in plugin mode, say).

Buckets are named as Discord names them: every response carries ``X-RateLimit-Bucket``,
a hash that several routes may share. The route -> hash mapping is learned from
responses and kept in Redis (``{prefix}:discord:route:{method template}``, a day) and in
each process; a bucket's state is then keyed by hash and major id, so routes that
share a bucket share one budget. Until a route's hash is known its bucket is keyed by
the route itself.

A 429's ``X-RateLimit-Scope`` says whose limit it was: ``global`` (or ``"global":
true``) pauses every request of the pool; ``user`` is the bucket's; ``shared`` is a
limit of the resource shared with everyone else (a busy channel): the bucket waits it
out, but it does not count as the bot's own 429 (no global pause, no lowered rate;
:attr:`RateLimitStats.shared_limited`, with its own retry cap).

Clocks come from Redis ``TIME`` so workers on different hosts agree.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from dataclasses import dataclass
from typing import Any

import aiohttp
from redis.asyncio import Redis

from core.errors import DeliveryError, DeliveryRetryableError
from core.infra.redis import Keys
from core.settings import Settings

logger = logging.getLogger(__name__)

# Our window estimates end a little after Discord's, so a refill never comes early.
_MARGIN_MS = 80
_PROBE_MS = 1000
# The global limit is counted over 1.1 s, not 1 s: requests that leave a worker
# spread over a second can arrive at Discord bunched closer together.
_GLOBAL_SPAN_MS = 1100
# After a global 429 the pool sends at half its recent rate for this long.
_LEARN_MS = 30_000
_MAX_429_RETRIES = 5
_USER_AGENT = "DiscordBot (https://github.com/sluice, 0.1) Sluice"
_ROUTE_BUCKET_TTL_S = 86_400
_BUCKET_HASH_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A request taken from a bucket counts as in flight until its answer is folded in, or
# at most this long (longer than the HTTP session's total timeout of 15 s).
_IN_FLIGHT_MS = 20_000

# KEYS: bucket, global window, global pause, learned global limit, the bucket's
#       in-flight set
# ARGV: global rps, request id, margin_ms, probe_ms, best effort, global span ms,
#       global exempt, in-flight ms
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local exempt = ARGV[7] == '1'
local reserve = tonumber(ARGV[5])
local span = tonumber(ARGV[6])
if not exempt then
  local pause = redis.call('PTTL', KEYS[3])
  if pause > 0 then return pause end
  local global_limit = tonumber(ARGV[1])
  global_limit = math.min(global_limit, tonumber(redis.call('GET', KEYS[4]) or global_limit))
  global_limit = global_limit - reserve * math.min(5, math.floor(global_limit / 4))
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - span)
  if redis.call('ZCARD', KEYS[2]) >= math.max(global_limit, 1) then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return math.max(tonumber(oldest[2]) + span - now, 1)
  end
end
local b = redis.call('HMGET', KEYS[1], 'remaining', 'reset_at', 'limit', 'window', 'probe')
local remaining = tonumber(b[1])
local reset_at = tonumber(b[2])
if remaining ~= nil and b[5] == '1' and now < reset_at then
  return 50
end
if remaining == nil then
  redis.call('HSET', KEYS[1], 'remaining', 0, 'reset_at', now + tonumber(ARGV[4]),
             'limit', 1, 'window', tonumber(ARGV[4]), 'probe', 1)
else
  if now >= reset_at then
    -- A new window. Requests taken in the old one that are still in flight may reach
    -- Discord after its window turned over and count in the new one: they are taken
    -- from it (those older than a request's longest life are forgotten).
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - tonumber(ARGV[8]))
    remaining = math.max(tonumber(b[3]) - redis.call('ZCARD', KEYS[5]), 0)
    reset_at = now + tonumber(b[4]) + tonumber(ARGV[3])
  end
  if remaining <= reserve then return math.max(reset_at - now, 1) end
  redis.call('HSET', KEYS[1], 'remaining', remaining - 1, 'reset_at', reset_at)
end
redis.call('PEXPIRE', KEYS[1], 3600000)
redis.call('ZADD', KEYS[5], now, ARGV[2])
redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[8]) * 2)
if not exempt then
  redis.call('ZADD', KEYS[2], now, ARGV[2])
  redis.call('PEXPIRE', KEYS[2], span * 2)
end
return 0
"""

# KEYS: bucket, the in-flight set the request was taken from
# ARGV: limit, remaining, reset_after_ms, margin_ms, request id
_UPDATE = """
redis.call('ZREM', KEYS[2], ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local header_remaining = tonumber(ARGV[2])
local reset_after = tonumber(ARGV[3])
local new_reset = now + reset_after + tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 'remaining', 'reset_at', 'window', 'probe')
local cur_remaining = tonumber(b[1])
local cur_reset = tonumber(b[2])
local window = tonumber(b[3]) or 0
if cur_remaining == nil or b[4] == '1' then
  redis.call('HSET', KEYS[1], 'remaining', header_remaining, 'reset_at', new_reset,
             'limit', limit, 'window', reset_after, 'probe', 0)
else
  if header_remaining == limit - 1 or reset_after > window then window = reset_after end
  redis.call('HSET', KEYS[1], 'remaining', math.min(cur_remaining, header_remaining),
             'reset_at', math.max(cur_reset, new_reset), 'limit', limit, 'window', window)
end
redis.call('PEXPIRE', KEYS[1], 3600000)
return 0
"""

# KEYS: bucket, global pause, global window, learned global limit, the in-flight set
#       the request was taken from
# ARGV: wait_ms, margin_ms, is_global, span_ms, learn_ms, request id
_LIMITED = """
redis.call('ZREM', KEYS[5], ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wait = tonumber(ARGV[1])
if ARGV[3] == '1' then
  if redis.call('PTTL', KEYS[2]) <= 0 then
    -- The first global 429 of an episode: someone else uses the token's global limit
    -- too (or it is lower than configured); halve what we send per second for a while.
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[4]))
    local sent = redis.call('ZCARD', KEYS[3])
    local current = tonumber(redis.call('GET', KEYS[4]) or sent)
    local learned = math.max(1, math.floor(math.min(current, sent) / 2))
    redis.call('SET', KEYS[4], learned, 'PX', tonumber(ARGV[5]))
  end
  redis.call('SET', KEYS[2], 1, 'PX', math.max(wait, 1))
else
  redis.call('HSET', KEYS[1], 'remaining', 0, 'reset_at', now + wait + tonumber(ARGV[2]))
  redis.call('HSETNX', KEYS[1], 'limit', 1)
  redis.call('HSETNX', KEYS[1], 'window', wait)
  redis.call('PEXPIRE', KEYS[1], 3600000)
end
return 0
"""


class DiscordHTTPError(DeliveryError):
    """Discord refused a request (4xx other than 429); retrying cannot help."""

    def __init__(self, message: str, *, status: int, code: int | None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Route:
    """One REST call: the route template names the bucket, ``major`` its major id."""

    method: str
    template: str
    major: str
    path: str

    @property
    def key(self) -> str:
        """The route without its parameters: ``METHOD /template``."""
        return f"{self.method} {self.template}"

    @property
    def bucket(self) -> str:
        """The rate-limit bucket of this call until Discord names it (by route)."""
        return f"{self.key}:{self.major}"

    @property
    def global_exempt(self) -> bool:
        """Interaction callbacks and webhooks do not count against the global limit."""
        return self.template.startswith(("/interactions/", "/webhooks/"))


@dataclass
class _Taken:
    """A slot taken from a bucket: the request counts as in flight until answered."""

    in_flight_key: str
    request_id: str


class RateLimitStats:
    """Counters for tests and logs: how often pacing waited and Discord said 429."""

    def __init__(self) -> None:
        self.requests = 0
        self.limited = 0
        self.waited_s = 0.0
        self.skipped = 0
        self.shared_limited = 0  # 429s of a limit shared with others (scope "shared")


class DiscordRest:
    """An aiohttp client for Discord's REST API with pacing shared through Redis.

    One per process; :meth:`start` opens the HTTP session, :meth:`close` closes it.
    """

    def __init__(self, settings: Settings, redis: Redis, *, token: str | None = None) -> None:
        self._settings = settings
        self._redis = redis
        self._keys = Keys(settings.key_prefix)
        self._base = settings.discord_api_url.rstrip("/")
        secret = settings.discord_token.get_secret_value() if settings.discord_token else None
        self._token = token or secret
        self._session: aiohttp.ClientSession | None = None
        self._acquire = redis.register_script(_ACQUIRE)
        self._update = redis.register_script(_UPDATE)
        self._limited = redis.register_script(_LIMITED)
        self._slot = 0
        self._route_buckets: dict[str, str] = {}  # route key -> Discord's bucket hash
        self.stats = RateLimitStats()

    async def start(self) -> None:
        """Open the HTTP session (idempotent)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=15, connect=5),
                headers={"User-Agent": _USER_AGENT},
            )

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def bucket_of(self, route: Route) -> str:
        """The bucket ``route`` counts against: Discord's hash and the major id once
        learned (from this process or, through Redis, any other), else the route."""
        known = self._route_buckets.get(route.key)
        if known is None:
            raw = await self._redis.get(self._keys.discord_route_bucket(route.key))
            if raw is not None:
                known = self._route_buckets[route.key] = (
                    raw.decode() if isinstance(raw, bytes) else str(raw)
                )
        return f"{known}:{route.major}" if known else route.bucket

    @staticmethod
    def _named_bucket(route: Route, resp: aiohttp.ClientResponse) -> str | None:
        name = resp.headers.get("X-RateLimit-Bucket")
        if name is not None and not _BUCKET_HASH_RE.match(name):
            logger.debug("odd X-RateLimit-Bucket on %s; ignored", route.key)
            return None
        return name

    async def _learn_bucket(self, route: Route, resp: aiohttp.ClientResponse) -> None:
        name = self._named_bucket(route, resp)
        if name is None or self._route_buckets.get(route.key) == name:
            return
        self._route_buckets[route.key] = name
        await self._redis.set(
            self._keys.discord_route_bucket(route.key), name, ex=_ROUTE_BUCKET_TTL_S
        )

    async def _wait_for_slot(self, route: Route, *, best_effort: bool) -> _Taken | None:
        """Reserve a request slot; ``None`` when ``best_effort`` and none is free now."""
        while True:
            self._slot += 1
            bucket_key = self._keys.discord_bucket(await self.bucket_of(route))
            taken = _Taken(f"{bucket_key}:in-flight", f"{id(self)}:{self._slot}:{random.random()}")
            wait_ms = int(
                await self._acquire(
                    keys=[
                        bucket_key,
                        self._keys.discord_global(),
                        self._keys.discord_global_pause(),
                        self._keys.discord_global_learned(),
                        taken.in_flight_key,
                    ],
                    args=[
                        self._settings.discord_global_rps,
                        taken.request_id,
                        _MARGIN_MS,
                        _PROBE_MS,
                        1 if best_effort else 0,
                        _GLOBAL_SPAN_MS,
                        1 if route.global_exempt else 0,
                        _IN_FLIGHT_MS,
                    ],
                )
            )
            if wait_ms <= 0:
                return taken
            if best_effort:
                self.stats.skipped += 1
                return None
            # Sleep at most half a second at a time: a probe's answer or another worker's
            # update may free a slot earlier than the estimate.
            sleep_s = min(wait_ms / 1000, 0.5) * (1 + 0.2 * random.random())
            self.stats.waited_s += sleep_s
            await asyncio.sleep(sleep_s)

    async def request(
        self,
        route: Route,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        best_effort: bool = False,
        context: str = "",
    ) -> Any:
        """Send one request, paced; retry 429s, 5xx and network errors a bounded number of times.

        Returns the decoded JSON body (``None`` for 204, or when ``best_effort`` is set
        and the request was skipped because no slot was free). A ``best_effort``
        request is never retried: a 429 skips it, a 5xx raises at once.

        Raises:
            DiscordHTTPError: a 4xx other than 429 (e.g. 403 missing permissions).
            DeliveryRetryableError: 5xx, network errors or 429s outlasted the retries.
        """
        await self.start()
        assert self._session is not None
        headers = {"Content-Type": "application/json"}
        if not route.global_exempt and self._token:
            headers["Authorization"] = f"Bot {self._token}"
        failures = limited = shared = 0
        max_failures = 0 if best_effort else self._settings.discord_retries
        while True:
            taken = await self._wait_for_slot(route, best_effort=best_effort)
            if taken is None:
                return None
            try:
                status, body, scope, retry_after_s = await self._send(
                    route, taken, json=json, params=params, headers=headers
                )
            except (aiohttp.ClientError, TimeoutError) as e:
                failures += 1
                if failures > max_failures:
                    raise DeliveryRetryableError(
                        f"discord {route.method} {route.template} {context}: {e}"
                    ) from e
                await asyncio.sleep(_backoff_s(failures))
                continue
            if 200 <= status < 300:
                return body
            if status == 429:
                if scope == "shared":
                    shared += 1
                    self.stats.shared_limited += 1
                else:
                    limited += 1
                    self.stats.limited += 1
                logger.log(
                    logging.INFO if scope == "shared" else logging.WARNING,
                    "discord 429 (%s) %s %s %s; retry in %.2fs",
                    scope,
                    route.method,
                    route.template,
                    context,
                    retry_after_s,
                )
                if best_effort:
                    return None
                if limited > _MAX_429_RETRIES or shared > _MAX_429_RETRIES:
                    raise DeliveryRetryableError(
                        f"discord {route.method} {route.template} {context}: rate limited",
                        retry_after_s=retry_after_s,
                    )
                continue
            message, code = _error_text(body)
            if status >= 500:
                failures += 1
                logger.warning(
                    "discord %s %s %s answered %s (try %s)",
                    route.method,
                    route.template,
                    context,
                    status,
                    failures,
                )
                if failures > max_failures:
                    raise DeliveryRetryableError(
                        f"discord {route.method} {route.template} {context}: {status} {message}"
                    )
                await asyncio.sleep(_backoff_s(failures))
                continue
            raise DiscordHTTPError(
                f"discord {route.method} {route.template} {context}: {status} {message}",
                status=status,
                code=code,
            )

    async def _send(
        self,
        route: Route,
        taken: _Taken,
        *,
        json: Any,
        params: dict[str, str] | None,
        headers: dict[str, str],
    ) -> tuple[int, Any, str, float]:
        """One HTTP request on a taken slot, its answer folded into the pacing state.

        Returns the status, the decoded body, a 429's scope and its retry-after.
        """
        assert self._session is not None
        try:
            resp = await self._session.request(
                route.method, self._base + route.path, json=json, params=params, headers=headers
            )
        except aiohttp.ClientConnectorError:
            # It never reached Discord. A request without an answer that may have (a
            # timeout) stays in flight until _IN_FLIGHT_MS forgets it.
            await self._land(taken)
            raise
        async with resp:
            self.stats.requests += 1
            body = await _body(resp)
            status = resp.status
            scope = _scope(resp, body) if status == 429 else ""
            if status == 429:
                # The 429 waits out the bucket under the name Discord gave it.
                await self._learn_bucket(route, resp)
                retry_after_s = await self._note_429(
                    route, body, taken, is_global=scope == "global"
                )
                return status, body, scope, retry_after_s
            # The bucket's state first, then its name: a request that finds the name must
            # find the state, or it would probe an "unknown" bucket.
            if not await self._note_headers(route, resp, taken):
                await self._land(taken)
            await self._learn_bucket(route, resp)
        return status, body, scope, 0.0

    async def _land(self, taken: _Taken) -> None:
        """The request was answered: it no longer counts as in flight."""
        await self._redis.zrem(taken.in_flight_key, taken.request_id)

    async def _note_headers(
        self, route: Route, resp: aiohttp.ClientResponse, taken: _Taken
    ) -> bool:
        """Fold a response's bucket headers in (and land the request); ``False`` when
        it had none to fold."""
        h = resp.headers
        if "X-RateLimit-Remaining" not in h:
            return False
        try:
            limit = int(h["X-RateLimit-Limit"])
            remaining = int(h["X-RateLimit-Remaining"])
            reset_after_ms = int(float(h["X-RateLimit-Reset-After"]) * 1000)
        except (KeyError, ValueError):
            logger.debug("unreadable rate-limit headers on %s", route.template)
            return False
        name = self._named_bucket(route, resp)
        bucket = f"{name}:{route.major}" if name else await self.bucket_of(route)
        await self._update(
            keys=[self._keys.discord_bucket(bucket), taken.in_flight_key],
            args=[limit, remaining, reset_after_ms, _MARGIN_MS, taken.request_id],
        )
        return True

    async def _note_429(self, route: Route, body: Any, taken: _Taken, *, is_global: bool) -> float:
        retry_after_s = 1.0
        if isinstance(body, dict):
            try:
                retry_after_s = max(float(body.get("retry_after", 1.0)), 0.0)
            except (TypeError, ValueError):
                logger.debug("unreadable retry_after on %s", route.key)
        await self._limited(
            keys=[
                self._keys.discord_bucket(await self.bucket_of(route)),
                self._keys.discord_global_pause(),
                self._keys.discord_global(),
                self._keys.discord_global_learned(),
                taken.in_flight_key,
            ],
            args=[
                int(retry_after_s * 1000),
                _MARGIN_MS,
                "1" if is_global else "0",
                _GLOBAL_SPAN_MS,
                _LEARN_MS,
                taken.request_id,
            ],
        )
        return retry_after_s


def _scope(resp: aiohttp.ClientResponse, body: Any) -> str:
    """Whose limit a 429 is: ``global``, ``shared`` or ``user`` (the bucket's)."""
    scope = resp.headers.get("X-RateLimit-Scope", "").lower()
    if (
        scope == "global"
        or resp.headers.get("X-RateLimit-Global", "").lower() == "true"
        or (isinstance(body, dict) and body.get("global") is True)
    ):
        return "global"
    return "shared" if scope == "shared" else "user"


async def _body(resp: aiohttp.ClientResponse) -> Any:
    if resp.status == 204:
        return None
    if resp.content_type == "application/json":
        return await resp.json()
    return await resp.text()


def _error_text(body: Any) -> tuple[str, int | None]:
    if isinstance(body, dict):
        return str(body.get("message", "")), body.get("code")
    return str(body)[:200], None


def _backoff_s(failures: int) -> float:
    return float(min(0.25 * 2 ** (failures - 1), 4.0) * (0.5 + random.random()))

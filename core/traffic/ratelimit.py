"""Per-user and per-tenant limits, atomic in Redis and shared by every process.

Two limits per scope (a user, a tenant): messages per fixed window
(``SLUICE_USER_REQUESTS_PER_WINDOW`` per ``SLUICE_USER_WINDOW_S``) and LLM tokens per
UTC day. One Lua script checks both scopes and counts the message only when both
allow it, so concurrent workers can never let a user through twice.

Over the limit there is no LLM call. Every message still gets exactly one visible
reply, and the *first* over-limit message of a window gets the notice that says when
to try again (:attr:`Verdict.first_notice`); later over-limit messages in that window
get a one-line reminder without the wait (:data:`REMINDER`), so a user who keeps
typing is not flooded with notices. Both are ``Reply(kind="notice")``; platforms that
allow it show them only to that user.

Admin users and tenants (``SLUICE_ADMIN_USERS`` / ``SLUICE_ADMIN_TENANTS``) are exempt,
or limited by ``SLUICE_ADMIN_REQUESTS_PER_WINDOW`` when that is set. A bot can
override any limit by name with ``Bot(limits={...})``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from core.framework.bot import Bot
from core.infra.redis import Keys
from core.infra.scripts import Lua
from core.messages import IncomingMessage
from core.settings import Settings

REMINDER = "⏳ Still over the limit; see the notice above for when to try again."

# KEYS: none (single-instance key names built from ARGV[1], the key prefix).
# ARGV: prefix, user, tenant, window s, user req limit, tenant req limit,
#       user token limit, tenant token limit (0 = none).
# Returns {allowed, scope, retry_after_ms, first_notice}.
_CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local p, user, tenant = ARGV[1], ARGV[2], ARGV[3]
local window = tonumber(ARGV[4])
local win = math.floor(now / window)
local day = math.floor(now / 86400)
local win_left = (win + 1) * window - now
local day_left = (day + 1) * 86400 - now
local ureq = p .. ':limit:user:' .. user .. ':req:' .. window .. ':' .. win
local treq = p .. ':limit:tenant:' .. tenant .. ':req:' .. window .. ':' .. win
local utok = p .. ':limit:user:' .. user .. ':tok:' .. day
local ttok = p .. ':limit:tenant:' .. tenant .. ':tok:' .. day
local checks = {
  {'user', utok, tonumber(ARGV[7]), day_left, 'tokday:' .. day, user},
  {'tenant', ttok, tonumber(ARGV[8]), day_left, 'tokday:' .. day, tenant},
  {'user', ureq, tonumber(ARGV[5]), win_left, 'req:' .. window .. ':' .. win, user},
  {'tenant', treq, tonumber(ARGV[6]), win_left, 'req:' .. window .. ':' .. win, tenant},
}
for _, c in ipairs(checks) do
  local limit = c[3]
  if limit > 0 and tonumber(redis.call('GET', c[2]) or '0') >= limit then
    local nkey = p .. ':limit:' .. c[1] .. ':' .. c[6] .. ':notice:' .. c[5]
    local first = redis.call('SET', nkey, '1', 'NX', 'EX', math.ceil(c[4]) + 1)
    local kind = c[1] .. (string.find(c[5], 'tok') and ':tokens' or ':requests')
    return {0, kind, math.ceil(c[4] * 1000), first and 1 or 0}
  end
end
if tonumber(ARGV[5]) > 0 then
  redis.call('INCR', ureq)
  redis.call('EXPIRE', ureq, window + 1)
end
if tonumber(ARGV[6]) > 0 then
  redis.call('INCR', treq)
  redis.call('EXPIRE', treq, window + 1)
end
return {1, '', 0, 0}
"""

# ARGV: prefix, user, tenant, tokens.
_RECORD = """
local t = redis.call('TIME')
local day = math.floor(tonumber(t[1]) / 86400)
local p = ARGV[1]
for _, k in ipairs({p .. ':limit:user:' .. ARGV[2] .. ':tok:' .. day,
                    p .. ':limit:tenant:' .. ARGV[3] .. ':tok:' .. day}) do
  redis.call('INCRBY', k, ARGV[4])
  redis.call('EXPIRE', k, 2 * 86400)
end
return 1
"""


@dataclass(frozen=True)
class Limits:
    """The limits that apply to one message (``None``: no limit)."""

    window_s: int
    user_requests: int | None
    tenant_requests: int | None
    user_tokens_per_day: int | None
    tenant_tokens_per_day: int | None


@dataclass(frozen=True)
class Verdict:
    """The outcome of :meth:`RateLimiter.check`."""

    allowed: bool
    scope: str = ""
    retry_after_s: float = 0.0
    first_notice: bool = False


def limits_for(settings: Settings, bot: Bot, msg: IncomingMessage) -> Limits:
    """Settings, overridden by the bot's ``limits``, adjusted for admins."""

    def pick(name: str) -> Any:
        return bot.limits[name] if name in bot.limits else getattr(settings, name)

    user_req = pick("user_requests_per_window")
    tenant_req = pick("tenant_requests_per_window")
    user_tok = pick("user_tokens_per_day")
    tenant_tok = pick("tenant_tokens_per_day")
    if msg.user in settings.admin_users:
        user_req = settings.admin_requests_per_window
        user_tok = None
    if msg.tenant in settings.admin_tenants:
        tenant_req = settings.admin_requests_per_window
        tenant_tok = None
    return Limits(
        window_s=int(pick("user_window_s")),
        user_requests=user_req,
        tenant_requests=tenant_req,
        user_tokens_per_day=user_tok,
        tenant_tokens_per_day=tenant_tok,
    )


def notice_text(verdict: Verdict) -> str:
    """The short notice for the first over-limit message of a window."""
    wait = _human(verdict.retry_after_s)
    if verdict.scope.endswith(":tokens"):
        what = (
            "today's usage limit"
            if verdict.scope.startswith("user")
            else ("this workspace's usage limit for today")
        )
    elif verdict.scope.startswith("tenant"):
        what = "this workspace's message limit"
    else:
        what = "your message limit"
    return f"You've reached {what}. Please try again in {wait}."


def _human(seconds: float) -> str:
    s = max(1, math.ceil(seconds))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{math.ceil(s / 60)} min"
    return f"{math.ceil(s / 3600)} h"


def _tenant_id(msg: IncomingMessage) -> str:
    # Ids are unique only within a platform (and user ids within a workspace): the
    # same "U1" in two Slack workspaces is two people with two counters.
    return f"{msg.platform}:{msg.tenant}"


def _user_id(msg: IncomingMessage) -> str:
    return f"{msg.platform}:{msg.tenant}:{msg.user}"


class RateLimiter:
    """Checks and counts messages and tokens against :class:`Limits` in Redis."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._prefix = keys.prefix
        self._check = Lua(redis, _CHECK)
        self._record = Lua(redis, _RECORD)

    async def check(self, msg: IncomingMessage, limits: Limits) -> Verdict:
        """Count ``msg`` if every limit allows it; otherwise say which and for how long."""
        res: list[Any] = await self._check(
            [],
            [
                self._prefix,
                _user_id(msg),
                _tenant_id(msg),
                limits.window_s,
                limits.user_requests or 0,
                limits.tenant_requests or 0,
                limits.user_tokens_per_day or 0,
                limits.tenant_tokens_per_day or 0,
            ],
        )
        if int(res[0]) == 1:
            return Verdict(allowed=True)
        scope = res[1].decode() if isinstance(res[1], bytes) else str(res[1])
        return Verdict(
            allowed=False,
            scope=scope,
            retry_after_s=int(res[2]) / 1000,
            first_notice=int(res[3]) == 1,
        )

    async def record_tokens(self, msg: IncomingMessage, tokens: int) -> None:
        """Add the tokens one answer used to the user's and the tenant's day."""
        if tokens > 0:
            await self._record([], [self._prefix, _user_id(msg), _tenant_id(msg), tokens])

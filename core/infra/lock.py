"""One owner-token lock on Redis: the response cache's single flight, a conversation's
turn (:mod:`core.traffic.ordering`) and the history flush all hold one.

The lock is a key whose value is the owner's token. It is taken with ``SET NX PX``,
renewed in the background every third of its TTL, and only its owner can renew or
delete it (compare and act in Lua). A holder that dies stops renewing, so the key
expires after at most one TTL and the next owner goes on.

One policy for a Redis error while renewing: log it and try again at the next tick
(the key outlives a short outage by its TTL). When a renewal finds another value (the
key expired and someone else took it), the lock is *lost*: :attr:`OwnerLock.lost` is
set, renewing stops, and the holder must not act as the owner any longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.infra.scripts import Lua

logger = logging.getLogger(__name__)

# KEYS: lock. ARGV: owner token, ttl ms.
RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS: lock. ARGV: owner token.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class OwnerLock:
    """A Redis key held by one owner token, renewed in the background while held.

    ``acquire()`` takes it (``SET NX PX``); a caller whose own script takes the key
    (with more state changed atomically beside it) calls :meth:`start_renewing`
    instead. :meth:`release` deletes the key if this owner still holds it; a caller
    whose own script frees it calls :meth:`stop_renewing` first.
    """

    def __init__(self, redis: Redis, key: str, owner: str, ttl_ms: int, *, what: str) -> None:
        self._redis = redis
        self.key = key
        self.owner = owner
        self.ttl_ms = max(1, int(ttl_ms))
        self._what = what
        self._renew = Lua(redis, RENEW_LUA)
        self._release = Lua(redis, RELEASE_LUA)
        self._renewer: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()

    async def acquire(self) -> bool:
        """Take the lock if it is free; renew it from then on. Returns whether taken."""
        if not await self._redis.set(self.key, self.owner, px=self.ttl_ms, nx=True):
            return False
        self.start_renewing()
        return True

    def start_renewing(self) -> None:
        """Renew every third of the TTL until :meth:`stop_renewing` or the lock is lost."""
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_loop())

    async def stop_renewing(self) -> None:
        """Stop the background renewal (the key then lives out its TTL)."""
        task, self._renewer = self._renewer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def release(self) -> bool:
        """Stop renewing and delete the key if this owner still holds it.

        Shielded: a cancelled holder still frees the lock. Returns whether it was held.
        """
        await self.stop_renewing()
        return bool(await asyncio.shield(self._release([self.key], [self.owner])))

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                held = await self._renew([self.key], [self.owner, self.ttl_ms])
            except (RedisError, OSError) as e:
                logger.warning("cannot renew the %s lock (owner %s): %s", self._what, self.owner, e)
                continue
            if not held:
                logger.warning("the %s lock was lost by %s", self._what, self.owner)
                self.lost.set()
                return

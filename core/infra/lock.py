"""One owner-token lock on Redis: the response cache's single flight, a conversation's
turn (:mod:`core.traffic.ordering`) and the history flush all hold one.

The lock is a key whose value is the owner's token. It is taken with ``SET NX PX``,
renewed in the background every third of its TTL, and only its owner can renew or
delete it (compare and act in Lua). A holder that dies stops renewing, so the key
expires after at most one TTL and the next owner goes on.

A process renews all the locks it holds through one Redis client together
(:class:`_Renewer`): one script call a tick (every third of the shortest TTL held)
renews them all, instead of one call per lock. Under a backlog every waiting job holds
a conversation lock and often a cache lock, so this is a third fewer commands for the
renewals (``GET`` and ``PEXPIRE`` a lock, one ``EVALSHA`` a tick).

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

# KEYS: lock. ARGV: owner token.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# KEYS: locks. ARGV: owner token and ttl ms of each, in turn.
# Returns one 1 or 0 for each lock (renewed, or not held by that owner).
RENEW_MANY_LUA = """
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[2 * i - 1] then
    out[i] = redis.call('PEXPIRE', KEYS[i], ARGV[2 * i])
  else
    out[i] = 0
  end
end
return out
"""


class _Renewer:
    """Renews every lock that one event loop holds through one Redis client, in one
    script call a tick; ticks every third of the shortest TTL registered. A lock that
    joins is renewed at the end of the current tick (within a third of its TTL, so it
    never lapses) and at every tick after. It runs while it has locks."""

    _all: dict[tuple[int, int], _Renewer] = {}

    def __init__(self, redis: Redis, key: tuple[int, int]) -> None:
        self._key = key
        self._script = Lua(redis, RENEW_MANY_LUA)
        self.locks: dict[int, OwnerLock] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, redis: Redis) -> _Renewer:
        """The renewer of ``redis`` in the running event loop."""
        key = (id(asyncio.get_running_loop()), id(redis))
        renewer = cls._all.get(key)
        if renewer is None:
            renewer = cls._all[key] = cls(redis, key)
        return renewer

    def add(self, lock: OwnerLock) -> None:
        """Renew ``lock`` from the end of the current tick on."""
        self.locks[id(lock)] = lock
        self._changed.set()  # a shorter TTL shortens the tick
        if self._task is None:
            self._all[self._key] = self
            self._task = asyncio.create_task(self._run(), name="sluice-lock-renewer")

    async def remove(self, lock: OwnerLock) -> None:
        """Stop renewing ``lock``; the last one out stops the loop."""
        if self.locks.pop(id(lock), None) is None or self.locks:
            return
        task = self._detach()
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _detach(self) -> asyncio.Task[None] | None:
        task, self._task = self._task, None
        if self._all.get(self._key) is self:
            del self._all[self._key]
        return task

    def _tick_s(self) -> float:
        return min(lock.ttl_ms for lock in self.locks.values()) / 3000

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.locks:
            start = loop.time()
            deadline = start + self._tick_s()
            self._changed.clear()
            while (remaining := deadline - loop.time()) > 0:
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
                self._changed.clear()
                if not self.locks:
                    break
                deadline = min(deadline, start + self._tick_s())
            held = list(self.locks.values())
            if not held:
                break
            args: list[str | int | float] = []
            for lock in held:
                args += [lock.owner, lock.ttl_ms]
            try:
                renewed = await self._script([lock.key for lock in held], args)
            except (RedisError, OSError) as e:
                logger.warning("cannot renew %d locks (again next tick): %s", len(held), e)
                continue
            for lock, ok in zip(held, renewed, strict=True):
                if not ok and self.locks.get(id(lock)) is lock:
                    logger.warning("the %s lock was lost by %s", lock.what, lock.owner)
                    del self.locks[id(lock)]
                    lock.renewing = None
                    lock.lost.set()
        self._detach()


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
        self.what = what
        self._release = Lua(redis, RELEASE_LUA)
        self.renewing: _Renewer | None = None  # while renewed
        self.lost = asyncio.Event()

    async def acquire(self) -> bool:
        """Take the lock if it is free; renew it from then on. Returns whether taken."""
        if not await self._redis.set(self.key, self.owner, px=self.ttl_ms, nx=True):
            return False
        self.start_renewing()
        return True

    def start_renewing(self) -> None:
        """Renew every third of the TTL until :meth:`stop_renewing` or the lock is lost
        (with the process's other locks: :class:`_Renewer`)."""
        if self.renewing is None:
            self.renewing = _Renewer.of(self._redis)
            self.renewing.add(self)

    async def stop_renewing(self) -> None:
        """Stop the background renewal (the key then lives out its TTL; a renewal of
        the process's locks already on its way may still renew it once)."""
        renewer, self.renewing = self.renewing, None
        if renewer is not None:
            await renewer.remove(self)

    async def release(self) -> bool:
        """Stop renewing and delete the key if this owner still holds it.

        Shielded: a cancelled holder still frees the lock. Returns whether it was held.
        """
        await self.stop_renewing()
        return bool(await asyncio.shield(self._release([self.key], [self.owner])))

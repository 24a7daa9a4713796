"""The one owner-token lock (core.infra.lock): cache single flight, conversation turns,
history flush and purge all hold it."""

from __future__ import annotations

import asyncio
import time
import uuid

from redis.asyncio import Redis

from core.infra.lock import OwnerLock


def _key() -> str:
    return f"test-lock:{uuid.uuid4().hex}"


async def test_one_owner_at_a_time_and_only_the_owner_releases(redis: Redis) -> None:
    key = _key()
    first = OwnerLock(redis, key, "a", 5_000, what="test")
    second = OwnerLock(redis, key, "b", 5_000, what="test")
    assert await first.acquire()
    assert not await second.acquire()
    assert not await second.release(), "a non-owner's release deletes nothing"
    assert await redis.get(key) == b"a"
    assert await first.release()
    assert await redis.get(key) is None
    assert await second.acquire()
    await second.release()


async def test_a_held_lock_outlives_its_ttl_while_renewed(redis: Redis) -> None:
    key = _key()
    lock = OwnerLock(redis, key, "a", 300, what="test")
    assert await lock.acquire()
    try:
        until = time.monotonic() + 1.2  # four TTLs
        while time.monotonic() < until:
            assert await redis.get(key) == b"a"
            await asyncio.sleep(0.05)
        assert not lock.lost.is_set()
    finally:
        await lock.release()


async def test_a_holder_that_stops_renewing_loses_the_key_to_the_next_owner(
    redis: Redis,
) -> None:
    key = _key()
    dead = OwnerLock(redis, key, "dead", 300, what="test")
    assert await dead.acquire()
    await dead.stop_renewing()  # as a killed process would
    nxt = OwnerLock(redis, key, "next", 300, what="test")
    deadline = time.monotonic() + 10
    while not await nxt.acquire():
        assert time.monotonic() < deadline, "the dead holder's key never expired"
        await asyncio.sleep(0.05)
    assert not await dead.release(), "the old owner cannot free the new owner's lock"
    assert await redis.get(key) == b"next"
    await nxt.release()


async def test_a_lock_taken_over_is_reported_lost_and_no_longer_renewed(redis: Redis) -> None:
    key = _key()
    lock = OwnerLock(redis, key, "a", 300, what="test")
    assert await lock.acquire()
    await redis.set(key, "intruder", px=60_000)  # expired meanwhile and taken by another
    await asyncio.wait_for(lock.lost.wait(), 10)
    assert await redis.pttl(key) > 1_000, "the loser did not touch the new owner's TTL"
    assert not await lock.release()
    assert await redis.get(key) == b"intruder"
    await redis.delete(key)


async def test_locks_held_together_are_renewed_together_and_one_lost_leaves_the_others(
    redis: Redis,
) -> None:
    """A process renews its locks in one batch; a lock with a shorter TTL that joins in
    the middle of a longer one's tick does not lapse, and one lock lost stops only its
    own renewal."""
    long_key, short_key, third_key = _key(), _key(), _key()
    long = OwnerLock(redis, long_key, "a", 900, what="test")
    short = OwnerLock(redis, short_key, "b", 300, what="test")
    third = OwnerLock(redis, third_key, "c", 300, what="test")
    assert await long.acquire()
    await asyncio.sleep(0.1)  # inside the long lock's tick (300 ms)
    assert await short.acquire()
    assert await third.acquire()
    try:
        until = time.monotonic() + 1.2  # four of the short TTLs
        while time.monotonic() < until:
            assert await redis.mget(long_key, short_key, third_key) == [b"a", b"b", b"c"]
            await asyncio.sleep(0.05)
        await redis.set(short_key, "intruder", px=60_000)
        await asyncio.wait_for(short.lost.wait(), 10)
        until = time.monotonic() + 1.2
        while time.monotonic() < until:
            assert await redis.mget(long_key, third_key) == [b"a", b"c"]
            await asyncio.sleep(0.05)
        assert not long.lost.is_set() and not third.lost.is_set()
        assert await redis.get(short_key) == b"intruder"
    finally:
        assert await long.release()
        assert await third.release()
        assert not await short.release()
        await redis.delete(short_key)

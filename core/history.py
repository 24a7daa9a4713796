"""Conversation history: the hot window in Redis.

Each conversation keeps its last ``history_max_turns`` turns in a Redis list, so a
worker builds the model's context with one ``LRANGE`` and never touches SQL on the
hot path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.errors import HistoryError
from core.messages import Turn
from core.redis import Keys


class HotHistory:
    """Append to and read the recent turns of conversations in Redis (bounded)."""

    def __init__(self, redis: Redis, keys: Keys, *, max_turns: int, ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self.max_turns = max_turns
        self.ttl_s = ttl_s

    async def append(self, conversation_id: str, turns: Sequence[Turn]) -> None:
        """Add turns at the end of a conversation, in one round trip, dropping the oldest."""
        if not turns:
            return
        key = self._keys.history(conversation_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(key, *[t.model_dump_json() for t in turns])
                pipe.ltrim(key, -self.max_turns, -1)
                pipe.expire(key, self.ttl_s)
                await pipe.execute()
        except RedisError as e:
            raise HistoryError(f"cannot append to history of {conversation_id}: {e}") from e

    async def recent(self, conversation_id: str, n: int) -> list[Turn]:
        """The last ``n`` turns of a conversation, oldest first."""
        if n <= 0:
            return []
        try:
            key = self._keys.history(conversation_id)
            raw: list[Any] = await self._redis.lrange(key, -n, -1)  # type: ignore[misc]
        except RedisError as e:
            raise HistoryError(f"cannot read history of {conversation_id}: {e}") from e
        return [Turn.model_validate_json(r) for r in raw]

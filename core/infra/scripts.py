"""Running Lua scripts on Redis with typed arguments (EVALSHA, loaded on first use)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


class Lua:
    """One Lua script bound to a client; arguments may be ``str``, ``int`` or ``float``."""

    def __init__(self, redis: Redis, source: str) -> None:
        self._script: AsyncScript = redis.register_script(source)

    async def __call__(self, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        """Run the script (EVALSHA; the source is sent once if Redis does not know it)."""
        return await self._script(keys=list(keys), args=list(args))

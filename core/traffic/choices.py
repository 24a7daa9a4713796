"""Choices admins make per tenant or per channel: the model (``/model``), and whether
the bot answers a channel's messages without a mention (``/listen``, Discord).

They live in Redis, without expiry, so every worker and adapter sees the same choice
at once: ``{prefix}:choice:model:{platform}:{tenant}`` for a whole tenant,
``{prefix}:choice:model:{platform}:{tenant}:{channel}`` for one channel (the channel's
choice wins). A stored model that is no longer in ``SLUICE_ALLOWED_MODELS`` is
ignored, so removing a model from the list takes it out of use everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from core.infra.redis import Keys


class Choices:
    """Read and write the per-tenant and per-channel choices.

    Args:
        redis: The shared Redis.
        keys: Key names (the deployment's prefix).
        allowed_models: ``SLUICE_ALLOWED_MODELS``; a model outside it is never used.
        default_model: The model used when nothing was chosen (the bot's, else
            ``SLUICE_MODEL``); shown by ``/model``.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        allowed_models: Sequence[str] = (),
        default_model: str = "",
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.allowed_models = list(allowed_models)
        self.default_model = default_model

    async def chosen_model(
        self, platform: str, tenant: str, channel: str
    ) -> tuple[str | None, str | None]:
        """The models chosen for the channel and for the tenant (``None``: not chosen,
        or no longer allowed)."""
        if not self.allowed_models:
            return None, None
        raw = await self._redis.mget(
            self._keys.choice("model", platform, tenant, channel),
            self._keys.choice("model", platform, tenant),
        )
        out: list[str | None] = []
        for value in raw:
            name = value.decode() if isinstance(value, bytes) else value
            out.append(name if name in self.allowed_models else None)
        return out[0], out[1]

    async def model_for(self, platform: str, tenant: str, channel: str) -> str:
        """The model to answer with in ``channel``: its choice, the tenant's, else the default."""
        for_channel, for_tenant = await self.chosen_model(platform, tenant, channel)
        return for_channel or for_tenant or self.default_model

    async def set_model(
        self, platform: str, tenant: str, channel: str | None, model: str | None
    ) -> None:
        """Choose ``model`` for a channel (or the tenant when ``channel`` is ``None``);
        ``None`` goes back to the default.

        Raises:
            ValueError: ``model`` is not in the allow-list.
        """
        key = self._keys.choice("model", platform, tenant, channel)
        if model is None:
            await self._redis.delete(key)
            return
        if model not in self.allowed_models:
            raise ValueError(f"{model!r} is not an allowed model")
        await self._redis.set(key, model)

    async def listening(self, platform: str, tenant: str, channel: str) -> bool:
        """Whether the bot answers every message in ``channel`` without a mention."""
        key = self._keys.choice("listen", platform, tenant, channel)
        return bool(await self._redis.exists(key))

    async def set_listening(self, platform: str, tenant: str, channel: str, on: bool) -> None:
        """Turn listening without a mention on or off for ``channel``."""
        key = self._keys.choice("listen", platform, tenant, channel)
        if on:
            await self._redis.set(key, "1")
        else:
            await self._redis.delete(key)

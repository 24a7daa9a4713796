"""``sluice cache clear``: drop cached answers (all, or one tenant's)."""

from __future__ import annotations

import asyncio

import click


@click.group("cache")
def cache() -> None:
    """The response cache."""


@cache.command("clear")
@click.option("--tenant", default=None, help="Only this tenant's cached answers.")
def clear(tenant: str | None) -> None:
    """Delete cached answers; prints how many were deleted."""
    from redis.asyncio import Redis

    from core.infra.redis import Keys, client
    from core.settings import get_settings
    from core.traffic.cache import clear_cache

    settings = get_settings()
    if not settings.redis_url and not settings.redis_sentinels:
        raise click.ClickException("REDIS_URL is not set: point it at your Redis.")

    async def run() -> int:
        redis: Redis = client(settings)
        try:
            return await clear_cache(redis, Keys(settings.key_prefix), tenant)
        finally:
            await redis.aclose()

    n = asyncio.run(run())
    scope = f"tenant {tenant}" if tenant else "all tenants"
    click.echo(f"deleted {n} cached answer key(s) ({scope})")

"""Fixtures for the history tests: settings on SQLite or on Postgres (own schema each)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from core.history.store import make_engine
from core.infra.redis import Keys
from core.settings import Settings

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_reachable() -> bool:
    """Whether the CI Postgres answers on 127.0.0.1:5432."""
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            return True
    except OSError:
        return False


def base_settings(redis_url: str, database_url: str, **kw: object) -> Settings:
    """Settings for one test: own key prefix, the given database, fast flush knobs."""
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=redis_url,
        database_url=database_url,
        key_prefix=f"h{uuid.uuid4().hex[:12]}",
        history_flush_lock_ttl_s=2.0,
        **kw,  # type: ignore[arg-type]
    )


async def drop_pg_schema(schema: str) -> None:
    """Drop a test's Postgres schema."""
    import asyncpg

    conn = await asyncpg.connect(PG_URL, timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_kind(request: pytest.FixtureRequest) -> str:
    """Run a test on SQLite and on Postgres."""
    kind: str = request.param
    if kind == "postgres" and not postgres_reachable():
        pytest.skip("Postgres is not reachable on 127.0.0.1:5432")
    return kind


@pytest.fixture
def hsettings(redis_url: str, db_kind: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings on the parametrised database; a Postgres schema of its own, dropped after."""
    if db_kind == "sqlite":
        yield base_settings(redis_url, f"sqlite:///{tmp_path}/history.db")
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield base_settings(redis_url, PG_URL, db_schema=schema)
    asyncio.run(drop_pg_schema(schema))


@pytest.fixture
def sqlite_settings(redis_url: str, tmp_path: Path) -> Settings:
    """Settings on a fresh SQLite file."""
    return base_settings(redis_url, f"sqlite:///{tmp_path}/history.db")


@pytest.fixture
async def engine(hsettings: Settings) -> AsyncIterator[AsyncEngine]:
    """An engine on the test's database (schema created)."""
    from core.history.store import ensure_schema

    eng = make_engine(hsettings)
    await ensure_schema(hsettings, eng)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture
async def rds(redis_url: str, hsettings: Settings) -> AsyncIterator[Redis]:
    """A Redis client; the test's keys are deleted after it."""
    client: Redis = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(f"{hsettings.key_prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
def keys(hsettings: Settings) -> Keys:
    """Key names under the test's prefix."""
    return Keys(hsettings.key_prefix)

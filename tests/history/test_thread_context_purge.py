"""A purge drops cached thread context: all of a tenant's, or the threads that quote the
purged user (read again from the platform when needed)."""

from __future__ import annotations

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from core.history.admin import purge
from core.history.threads import ThreadView
from core.infra.redis import Keys


def _view(*lines: str) -> str:
    return ThreadView(
        system_text="\n".join(lines), shown=len(lines), total=len(lines)
    ).model_dump_json()


async def test_purge_drops_the_tenants_threads_and_those_quoting_the_user(
    engine: AsyncEngine, rds: Redis, keys: Keys
) -> None:
    quoting = keys.thread_context("slack:T1:C1:1.1")
    other = keys.thread_context("slack:T1:C1:2.2")
    elsewhere = keys.thread_context("slack:T2:C9:3.3")
    await rds.set(quoting, _view("[user U1]: hello", "[user U2]: hi"))
    await rds.set(other, _view("[user U2]: only me"))
    await rds.set(elsewhere, _view("[user U3]: another workspace"))
    result = await purge(rds, keys, engine, user="U1")
    assert result.thread_contexts == 1
    assert [await rds.exists(k) for k in (quoting, other, elsewhere)] == [0, 1, 1]
    result = await purge(rds, keys, engine, tenant="T1")
    assert result.thread_contexts == 1
    assert [await rds.exists(k) for k in (other, elsewhere)] == [0, 1]

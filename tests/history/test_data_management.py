"""Export, purge, usage, retention and schema commands, through the real ``sluice`` CLI."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from core.history.hot import unpack_record, unpack_turn
from core.history.store import count_rows, iter_records
from core.infra.redis import Keys
from core.settings import Settings
from tests.helpers import ROOT, base_env, settings_env
from tests.history.helpers import exchange, make_history, message
from workers.flush import Flusher

SECRET = "secret-of-u1"


async def sluice(settings: Settings, *args: str) -> tuple[int, str, str]:
    """Run ``sluice ARGS`` in a subprocess with the test's settings."""
    env = {**base_env(), **settings_env(settings)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sluice",
        *args,
        env=env,
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return int(proc.returncode or 0), out.decode(), err.decode()


async def populate(rds: Redis, settings: Settings, engine: AsyncEngine) -> None:
    """U1 in T1 and T2, U2 in T1 (sharing a channel with U1); half flushed, half not."""
    history = make_history(rds, settings, engine=engine)
    long_text = f"{SECRET} long " + "lorem ipsum dolor " * 120  # compressed in Redis
    msgs = [
        message(1, user="U1", tenant="T1", channel="shared", text=f"{SECRET} one"),
        message(2, user="U2", tenant="T1", channel="shared", text="u2 in shared"),
        message(3, user="U1", tenant="T2", channel="c2", text=long_text),
        message(4, user="U2", tenant="T1", channel="u2only", text="u2 alone"),
    ]
    # Recent, as a purge's look for reply-job traces goes back a week.
    msgs = [m.model_copy(update={"ts": time.time() - 60 + m.ts % 100}) for m in msgs]
    for m in msgs[:2]:
        await history.append(
            m.conversation_id, exchange(m, f"{SECRET} answer" if m.user == "U1" else None), origin=m
        )
    await Flusher(rds, settings, engine).run(max_s=10)
    for m in msgs[2:]:
        await history.append(m.conversation_id, exchange(m), origin=m)
    keys = Keys(settings.key_prefix)
    # What reply jobs leave for a while: delivery state, a reply owed, arq's result.
    for m in msgs:
        said = f"{SECRET} reply" if m.user == "U1" else f"reply to {m.user}"
        await rds.hset(keys.delivered(m.job_id), mapping={"ids": "[]", "texts": f'["{said}"]'})
        await rds.hset(keys.undelivered(m.job_id), mapping={"reply": said, "attempts": 1})
        await rds.set(f"arq:result:{keys.prefix}:{m.job_id}", f"args: {m.text[:40]}")
    await rds.set(f"{keys.prefix}:cache:T1:abc", f"cached answer for {SECRET}")
    await rds.set(f"{keys.prefix}:cache:T2:def", f"cached answer for {SECRET}")
    await rds.set(f"{keys.prefix}:cache:T9:ghi", "another tenant's cache")


async def redis_dump(rds: Redis, prefix: str) -> dict[str, str]:
    """Every key of the test with its content decoded (decompressing history entries)."""
    out: dict[str, str] = {}
    async for raw in rds.scan_iter(f"{prefix}:*", count=1000):
        key = raw.decode()
        kind = (await rds.type(key)).decode()
        if kind == "string":
            out[key] = (await rds.get(key) or b"").decode(errors="replace")
        elif kind == "list":
            out[key] = " ".join(
                unpack_turn(x).model_dump_json() for x in await rds.lrange(key, 0, -1)
            )
        elif kind == "stream":
            entries = await rds.xrange(key)
            out[key] = " ".join(json.dumps(unpack_record(f[b"r"])) for _, f in entries)
        elif kind == "set":
            out[key] = " ".join(m.decode() for m in await rds.smembers(key))
        elif kind == "hash":
            out[key] = json.dumps(
                {k.decode(): v.decode() for k, v in (await rds.hgetall(key)).items()}
            )
    return out


async def test_export_user_gives_all_their_messages_from_sql_and_backlog_and_nobody_elses(
    hsettings: Settings, rds: Redis, engine: AsyncEngine
) -> None:
    await populate(rds, hsettings, engine)
    code, out, err = await sluice(hsettings, "history", "export", "--user", "U1")
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert {(x["message_id"], x["source"]) for x in lines} == {
        ("m1", "sql"),
        ("m1:answer", "sql"),
        ("m3", "backlog"),
        ("m3:answer", "backlog"),
    }
    assert all(x["user"] == "U1" for x in lines)
    assert next(x for x in lines if x["message_id"] == "m3")["text"].startswith(SECRET)

    code, out, _ = await sluice(hsettings, "history", "export", "--tenant", "T1")
    assert code == 0
    assert {json.loads(x)["message_id"] for x in out.splitlines()} == {
        "m1",
        "m1:answer",
        "m2",
        "m2:answer",
        "m4",
        "m4:answer",
    }


async def test_purge_user_removes_them_from_sql_redis_and_cache_and_leaves_others(
    hsettings: Settings, rds: Redis, engine: AsyncEngine
) -> None:
    await populate(rds, hsettings, engine)
    before = await redis_dump(rds, hsettings.key_prefix)
    assert any(SECRET in v for v in before.values())

    code, out, err = await sluice(hsettings, "history", "purge", "--user", "U1", "--yes")
    assert code == 0, err
    assert "2 SQL rows" in out and "2 backlog entries" in out

    after = await redis_dump(rds, hsettings.key_prefix)
    leftovers = {k: v for k, v in after.items() if SECRET in v or '"U1"' in v}
    assert leftovers == {}
    assert "6 reply-job keys" in out  # m1 and m3: delivered, undelivered, arq result
    results = [k.decode() async for k in rds.scan_iter(f"arq:result:{hsettings.key_prefix}:*")]
    assert sorted(r.rsplit(":", 1)[1] for r in results) == ["m2", "m4"]
    assert len([k for k in after if ":delivered:" in k]) == 2  # U2's two messages
    assert f"{hsettings.key_prefix}:cache:T9:ghi" in after
    assert [r async for r in iter_records(engine, user="U1")] == []
    u2 = [r["message_id"] async for r in iter_records(engine, user="U2")]
    assert u2 == ["m2", "m2:answer"]
    # U2's unflushed turns and their place in the shared channel are intact.
    await Flusher(rds, hsettings, engine).run(max_s=10)
    assert sorted([r["message_id"] async for r in iter_records(engine, user="U2")]) == [
        "m2",
        "m2:answer",
        "m4",
        "m4:answer",
    ]
    assert await count_rows(engine) == (4, 4)
    shared = Keys(hsettings.key_prefix).history("slack:T1:shared:-")
    assert [unpack_turn(x).message_id for x in await rds.lrange(shared, 0, -1)] == [
        "m2",
        "m2:answer",
    ]


async def test_purge_tenant_leaves_other_tenants_untouched(
    hsettings: Settings, rds: Redis, engine: AsyncEngine
) -> None:
    await populate(rds, hsettings, engine)
    code, _, err = await sluice(hsettings, "history", "purge", "--tenant", "T1", "--yes")
    assert code == 0, err
    after = await redis_dump(rds, hsettings.key_prefix)
    assert not [k for k in after if ":T1:" in k]
    results = [k.decode() async for k in rds.scan_iter(f"arq:result:{hsettings.key_prefix}:*")]
    assert [r for r in results if ":T1:" in r] == [] and len(results) == 1
    assert not any('"T1"' in v for v in after.values())
    await Flusher(rds, hsettings, engine).run(max_s=10)
    assert sorted([r["message_id"] async for r in iter_records(engine, tenant="T2")]) == [
        "m3",
        "m3:answer",
    ]
    assert [r async for r in iter_records(engine, tenant="T1")] == []


async def test_usage_counts_messages_and_tokens_per_user_tenant_and_day(
    hsettings: Settings, rds: Redis, engine: AsyncEngine
) -> None:
    history = make_history(rds, hsettings)
    now = time.time()
    for i, user in enumerate(["U1", "U1", "U2"]):
        m = message(i, user=user).model_copy(update={"ts": now})
        await history.append(m.conversation_id, exchange(m), origin=m)
    await Flusher(rds, hsettings, engine).run(max_s=10)
    code, out, err = await sluice(hsettings, "usage", "--json", "--days", "2")
    assert code == 0, err
    rows: list[dict[str, Any]] = [json.loads(x) for x in out.splitlines()]
    by_user = {r["user"]: r for r in rows}
    assert by_user["U1"]["messages"] == 2 and by_user["U1"]["answers"] == 2
    assert by_user["U1"]["tokens_in"] == 20 and by_user["U1"]["tokens_out"] == 40
    assert by_user["U2"]["messages"] == 1 and by_user["U2"]["tenant"] == "T1"
    code, out, _ = await sluice(hsettings, "usage", "--days", "2")
    assert code == 0 and "U1" in out and "tokens" in out


async def test_history_status_shows_the_backlog_and_the_last_flush(
    hsettings: Settings, rds: Redis, engine: AsyncEngine
) -> None:
    history = make_history(rds, hsettings)
    m = message(1)
    await history.append(m.conversation_id, exchange(m), origin=m)
    code, out, err = await sluice(hsettings, "history", "status", "--json")
    assert code == 0, err
    st = json.loads(out)
    assert st["length"] == 2 and st["last_flush_ts"] is None and not st["full"]
    await Flusher(rds, hsettings, engine).run(max_s=10)
    code, out, _ = await sluice(hsettings, "history", "status")
    assert code == 0 and "backlog: 0 of 1,000,000" in out and "s ago" in out

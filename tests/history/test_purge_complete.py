"""A purge leaves nothing behind and nothing comes back.

Tool-call turns, queued and running reply jobs, web chat outboxes, the parked
unreadable backlog, a flush that stalled across the purge, and the ``--yes`` guard.
Real Redis, SQLite and Postgres, real ``sluice worker`` and flush processes, the
simulator for the model.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zstandard
from arq.connections import ArqRedis
from pydantic import SecretStr
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from core.errors import HistoryError
from core.history.admin import purge
from core.history.hot import make_record, unpack_record, unpack_turn
from core.history.store import COLUMNS, RECORD_FIELDS, count_rows, iter_records
from core.infra.redis import Keys
from core.messages import IncomingMessage, Turn
from core.settings import Settings
from core.traffic.queue import connect_queue, enqueue_reply
from tests.conftest import Sim
from tests.helpers import ROOT, Proc, base_env, settings_env
from tests.history.bots import gate_key
from tests.history.conftest import (
    PG_URL,
    base_settings,
    drop_pg_schema,
    postgres_reachable,
)
from tests.history.helpers import exchange, make_history, message, run_flush_process
from tests.history.test_data_management import SECRET, populate, sluice
from workers.flush import Flusher

pytestmark = pytest.mark.timeout(180)


async def eventually(check: Callable[[], object], timeout_s: float, what: str) -> None:
    """Call (and await) ``check()`` every 50 ms until it is true; fail naming ``what``
    on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _text(raw: bytes) -> str:
    """A hot-window turn or backlog record as JSON, anything else as text."""
    for parse in (
        lambda b: unpack_turn(b).model_dump_json(),
        lambda b: json.dumps(unpack_record(b)),
    ):
        try:
            return parse(raw)
        except (ValueError, HistoryError, zstandard.ZstdError):
            continue
    return raw.decode(errors="replace")


async def everything(rds: Redis, prefix: str) -> dict[str, str]:
    """Every key of the test (and arq's keys of its jobs) with its content as text."""
    out: dict[str, str] = {}
    for pattern in (f"{prefix}:*", f"arq:*:{prefix}:*"):
        async for raw in rds.scan_iter(pattern, count=1000):
            key = raw.decode()
            kind = (await rds.type(key)).decode()
            if kind == "string":
                out[key] = _text(await rds.get(key) or b"")
            elif kind == "list":
                out[key] = " ".join(_text(x) for x in await rds.lrange(key, 0, -1))
            elif kind == "stream":
                out[key] = " ".join(_text(v) for _, f in await rds.xrange(key) for v in f.values())
            elif kind in ("set", "zset"):
                members = await (rds.smembers(key) if kind == "set" else rds.zrange(key, 0, -1))
                out[key] = " ".join(m.decode(errors="replace") for m in members)
            elif kind == "hash":
                out[key] = " ".join(
                    f"{k.decode()}={_text(v)}" for k, v in (await rds.hgetall(key)).items()
                )
    return out


async def user_rows(engine: AsyncEngine, user: str) -> int:
    """How many SQL rows ``user`` has."""
    return len([r async for r in iter_records(engine, user=user)])


async def all_rows(engine: AsyncEngine, tenant: str) -> list[dict[str, Any]]:
    """Every SQL row of a tenant, as dicts."""
    return [dict(r) async for r in iter_records(engine, tenant=tenant)]


# --- --yes ------------------------------------------------------------------------------


async def test_purge_without_yes_and_without_a_terminal_says_to_pass_yes_and_deletes_nothing(
    hsettings: Settings, rds: Redis, engine: AsyncEngine
) -> None:
    await populate(rds, hsettings, engine)
    before = await everything(rds, hsettings.key_prefix)
    rows = await count_rows(engine)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sluice",
        "history",
        "purge",
        "--user",
        "U1",
        env={**base_env(), **settings_env(hsettings)},
        cwd=str(ROOT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    # Even a "y" on a pipe is not a confirmation: nobody is there to give it.
    out, err = await proc.communicate(b"y\n")
    assert proc.returncode == 2
    assert "pass --yes" in err.decode()
    assert "purged" not in out.decode()
    assert await count_rows(engine) == rows
    assert await everything(rds, hsettings.key_prefix) == before


# --- Tool-call turns ------------------------------------------------------------------------


def legacy_tool_turns(m: IncomingMessage, secret: str) -> list[Turn]:
    """A tool-call step and its result as stored before tool turns carried their user."""
    return [
        Turn(
            role="assistant",
            text="",
            message_id=f"{m.message_id}:step1",
            ts=m.ts + 0.1,
            tool_calls=[{"id": "c1", "name": "lookup", "arguments": json.dumps({"t": secret})}],
        ),
        Turn(
            role="tool",
            text=f"notes: {secret}",
            message_id=f"{m.message_id}:tool:c1",
            ts=m.ts + 0.2,
            tool_call_id="c1",
            tool_name="lookup",
        ),
    ]


async def test_tool_turns_stored_without_a_user_are_purged_with_the_message_they_answer(
    hsettings: Settings, rds: Redis, engine: AsyncEngine
) -> None:
    history = make_history(rds, hsettings, engine=engine)
    keys = Keys(hsettings.key_prefix)
    m1 = message(1, user="U1", channel="shared", text=f"{SECRET} asks")
    m2 = message(2, user="U2", channel="shared", text="u2 asks")
    m3 = message(3, user="U1", channel="shared", text=f"{SECRET} again")
    conv = m1.conversation_id

    def legacy(m: IncomingMessage, secret: str) -> list[Turn]:
        user_turn, answer = exchange(m)
        return [user_turn, *legacy_tool_turns(m, secret), answer]

    # As an older Sluice left them: no origin, so the tool turns have no user in the
    # hot window, the backlog or (after a flush) SQL.
    await history.append(conv, legacy(m1, SECRET) + legacy(m2, "u2-tool-data"))
    await Flusher(rds, hsettings, engine).run(max_s=10)
    await history.append(conv, legacy(m3, SECRET))  # still in the backlog
    sql = await all_rows(engine, "T1")
    assert [r["user"] for r in sql if r["tool"]] == [None] * 4

    result = await purge(rds, keys, engine, user="U1")

    assert result.sql_rows == 4 and result.backlog_entries == 4
    left = sorted(r["message_id"] for r in await all_rows(engine, "T1"))
    assert left == ["m2", "m2:answer", "m2:step1", "m2:tool:c1"]
    window = [unpack_turn(x).message_id for x in await rds.lrange(keys.history(conv), 0, -1)]
    assert window == ["m2", "m2:step1", "m2:tool:c1", "m2:answer"]
    dump = await everything(rds, hsettings.key_prefix)
    assert [k for k, v in dump.items() if SECRET in v] == []
    # What is left is flushed as before, and U2's tool turns come back whole from SQL.
    await Flusher(rds, hsettings, engine).run(max_s=10)
    assert await count_rows(engine) == (4, 4)


# --- With a worker -------------------------------------------------------------------------


@pytest.fixture
def wsettings(hsettings: Settings, llm_sim: Sim) -> Settings:
    """The test's settings with the simulator and the purge test bot, for workers."""
    return hsettings.model_copy(
        update={
            "openai_api_key": SecretStr("sk-test-key-0123456789"),
            "openai_base_url": f"{llm_sim.url}/v1",
            "app": "tests.history.bots:purge_bot",
            "stream_min_interval_s": 0.0,
            "worker_poll_delay_s": 0.02,
            "llm_retries": 1,
            "llm_timeout_s": 20.0,
            "tool_timeout_s": 120.0,
            "tool_call_timeout_s": 120.0,
        }
    )


@pytest.fixture
def worker(wsettings: Settings, tmp_path: Path) -> Iterator[Callable[[], Proc]]:
    """Factory: a real ``sluice worker`` on the test's settings, stopped after the test."""
    procs: list[Proc] = []

    def start() -> Proc:
        env = {**base_env(), **settings_env(wsettings)}
        proc = Proc(["worker"], env, tmp_path / f"worker-{len(procs)}.log")
        procs.append(proc)
        proc.wait_for_output("worker ready", timeout_s=60)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
async def queue(wsettings: Settings) -> AsyncIterator[ArqRedis]:
    """An arq pool that enqueues as the adapters do."""
    pool = await connect_queue(wsettings)
    try:
        yield pool
    finally:
        await pool.aclose()


def web_message(user: str, text: str, *, channel: str | None = None) -> IncomingMessage:
    """A web chat message from ``user`` (their session is the channel unless given)."""
    return IncomingMessage(
        platform="web",
        tenant="web",
        channel=channel or user,
        user=user,
        message_id=uuid.uuid4().hex,
        text=text,
        ts=time.time(),
    )


async def outbox_done(rds: Redis, keys: Keys, msg: IncomingMessage) -> dict[str, Any] | None:
    """The ``done`` event of ``msg`` in its session's web outbox, if it is there."""
    for _, fields in await rds.xrange(keys.web_outbox(msg.channel)):
        event = json.loads(fields[b"data"])
        if event.get("type") == "done" and event.get("message_id") == msg.message_id:
            return dict(event)
    return None


async def arq_keys(rds: Redis, what: str, prefix: str) -> set[str]:
    """arq's keys of one kind (``job``, ``result``, ``in-progress``) under the test's ids."""
    return {k.decode() async for k in rds.scan_iter(f"arq:{what}:{prefix}:*", count=1000)}


async def test_tool_turns_of_a_reply_carry_their_user_and_purge_leaves_none_of_them(
    wsettings: Settings,
    rds: Redis,
    engine: AsyncEngine,
    queue: ArqRedis,
    worker: Callable[[], Proc],
) -> None:
    keys = Keys(wsettings.key_prefix)
    alice, bob = f"alice-{uuid.uuid4().hex[:8]}", f"bob-{uuid.uuid4().hex[:8]}"
    asked = web_message(alice, f'{SECRET} [[tool:lookup {{"topic": "{SECRET}"}}]]')
    other = web_message(bob, 'bob asks [[tool:lookup {"topic": "bob-topic"}]]')
    worker()
    for m in (asked, other):
        assert await enqueue_reply(queue, wsettings, m)
    for m in (asked, other):
        await eventually(lambda m=m: outbox_done(rds, keys, m), 60, f"the answer to {m.user}")

    turns = [unpack_turn(x) for x in await rds.lrange(keys.history(asked.conversation_id), 0, -1)]
    assert [t.message_id for t in turns] == [
        asked.message_id,
        f"{asked.message_id}:step1",
        f"{asked.message_id}:tool:{turns[1].tool_calls[0]['id']}",  # type: ignore[index]
        f"{asked.message_id}:answer",
    ]
    assert {t.user for t in turns} == {alice}  # the tool turns too, in Redis ...

    async def flushed() -> bool:
        return await user_rows(engine, alice) == 4 and await user_rows(engine, bob) == 4

    await eventually(flushed, 60, "the worker's flush to store both users' four turns")
    stored = [r async for r in iter_records(engine, tenant="web")]
    assert {r["user"] for r in stored if r["conversation_id"] == asked.conversation_id} == {
        alice
    }  # ... and in SQL

    code, out, err = await sluice(wsettings, "history", "purge", "--user", alice, "--yes")
    assert code == 0, err
    assert "4 SQL rows" in out and "1 web outboxes" in out
    dump = await everything(rds, wsettings.key_prefix)
    assert {k: v for k, v in dump.items() if SECRET in v or alice in v} == {}
    assert keys.web_outbox(alice) not in dump and keys.web_outbox(bob) in dump
    assert [r async for r in iter_records(engine, tenant="web") if r["user"] != bob] == []
    assert await user_rows(engine, bob) == 4
    assert not [k for k in await arq_keys(rds, "result", wsettings.key_prefix) if alice in k]


async def test_purge_deletes_queued_jobs_and_the_conversation_goes_on_without_them(
    wsettings: Settings,
    rds: Redis,
    engine: AsyncEngine,
    queue: ArqRedis,
    worker: Callable[[], Proc],
) -> None:
    keys = Keys(wsettings.key_prefix)
    room = f"room-{uuid.uuid4().hex[:8]}"
    alice, bob = f"alice-{uuid.uuid4().hex[:8]}", f"bob-{uuid.uuid4().hex[:8]}"
    # No worker yet: everything waits. Alice's two messages are ahead of Bob's in the
    # room's line; a third waits in her own session.
    alices = [
        web_message(alice, f"{SECRET} first", channel=room),
        web_message(alice, f"{SECRET} second", channel=room),
        web_message(alice, f"{SECRET} alone"),
    ]
    bobs = web_message(bob, "bob in the room", channel=room)
    for m in [*alices[:2], bobs, alices[2]]:
        assert await enqueue_reply(queue, wsettings, m)
    replies = f"arq:job:{wsettings.key_prefix}:reply:"
    assert (
        len([k for k in await arq_keys(rds, "job", wsettings.key_prefix) if k.startswith(replies)])
        == 4
    )

    result = await purge(rds, keys, engine, user=alice)

    assert (result.jobs_queued, result.jobs_running) == (3, 0)
    prefix = wsettings.key_prefix
    # Bob's reply job is left, and its door check (it waits behind Alice's messages, so
    # it shows a queued notice): both are Bob's alone.
    assert await arq_keys(rds, "job", prefix) - {f"arq:job:{prefix}:door:{bobs.job_id}"} == {
        f"arq:job:{prefix}:{bobs.job_id}"
    }
    assert [m.decode() for m in await rds.zrange(wsettings.queue_name, 0, -1)] == [
        f"{prefix}:{bobs.job_id}"
    ]
    assert [
        m.decode() for m in await rds.zrange(keys.conv_pending(bobs.conversation_id), 0, -1)
    ] == [bobs.job_id]
    dump = await everything(rds, prefix)
    assert {k: v for k, v in dump.items() if SECRET in v} == {}

    # Bob's message no longer waits for Alice's: a worker answers it at once.
    worker()
    done = await eventually_value(lambda: outbox_done(rds, keys, bobs), 60, "bob's answer")
    assert done["kind"] == "answer" and "bob in the room" in done["text"]
    mine = f"arq:result:{prefix}:{bobs.job_id}"

    async def results() -> dict[str, Any] | None:
        # arq stores the result once the job returns, after the reply is out.
        found = await arq_keys(rds, "result", prefix)
        return {"keys": found} if mine in found else None

    found = await eventually_value(results, 60, "bob's job result")
    # Bob's door check (his queued notice: he waited behind Alice) may have one too.
    assert found["keys"] - {f"arq:result:{prefix}:door:{bobs.job_id}"} == {mine}
    hist = await rds.lrange(keys.history(bobs.conversation_id), 0, -1)
    assert [unpack_turn(x).user for x in hist] == [bob, bob]


async def eventually_value(
    get: Callable[[], Awaitable[dict[str, Any] | None]], timeout_s: float, what: str
) -> dict[str, Any]:
    """Await ``get()`` every 50 ms until it returns something; that."""
    deadline = time.monotonic() + timeout_s
    while (value := await get()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return value


async def test_a_job_running_during_the_purge_stores_nothing_and_keeps_no_result(
    wsettings: Settings,
    rds: Redis,
    engine: AsyncEngine,
    queue: ArqRedis,
    worker: Callable[[], Proc],
) -> None:
    keys = Keys(wsettings.key_prefix)
    prefix = wsettings.key_prefix
    alice, bob = f"alice-{uuid.uuid4().hex[:8]}", f"bob-{uuid.uuid4().hex[:8]}"
    gate = uuid.uuid4().hex[:8]
    asked = web_message(alice, f'{SECRET} [[tool:gate {{"name": "{gate}"}}]]')
    proc = worker()
    assert await enqueue_reply(queue, wsettings, asked)
    # The job runs and waits in its tool until the gate opens.
    await eventually(
        lambda: rds.exists(gate_key(prefix, gate) + ":entered"), 60, "the job to reach its tool"
    )
    assert await rds.exists(f"arq:in-progress:{prefix}:{asked.job_id}")

    result = await purge(rds, keys, engine, user=alice)
    assert (result.jobs_queued, result.jobs_running) == (0, 1)
    assert not await rds.exists(f"arq:job:{prefix}:{asked.job_id}")

    await rds.rpush(gate_key(prefix, gate), "open")

    async def ended() -> bool:
        return not await rds.exists(f"arq:in-progress:{prefix}:{asked.job_id}")

    await eventually(ended, 60, "arq to end the job")
    assert await arq_keys(rds, "result", prefix) == set()
    assert await arq_keys(rds, "job", prefix) == set()
    assert await rds.zscore(wsettings.queue_name, f"{prefix}:{asked.job_id}") is None
    # Its turns were dropped (the model did answer after the purge), and its session's
    # outbox and the tenant's cache, written meanwhile, are gone too.
    data = await everything(rds, prefix)
    assert {k: v for k, v in data.items() if SECRET in v or alice in v} == {}
    assert f"job={asked.job_id} was purged while it ran" in proc.output()
    assert "was purged meanwhile: its turns are not stored" in proc.output()

    # The worker goes on: the next message is answered and stored as usual.
    nxt = web_message(bob, "bob after the purge")
    assert await enqueue_reply(queue, wsettings, nxt)
    done = await eventually_value(lambda: outbox_done(rds, keys, nxt), 60, "bob's answer")
    assert done["kind"] == "answer"

    async def bob_stored() -> bool:
        return await user_rows(engine, bob) == 2

    await eventually(bob_stored, 60, "the worker's flush to store bob's turns")
    assert await user_rows(engine, alice) == 0
    assert "Traceback" not in proc.output()


# --- The parked unreadable backlog --------------------------------------------------------


def entry_values(user: str, tenant: str, n: int) -> list[Any]:
    """The first ``n`` fields of a record of ``user`` in ``tenant``."""
    rec = make_record(
        Turn(role="user", text=f"{SECRET} of {user}", message_id=f"{user}-m", user=user),
        f"slack:{tenant}:C1:-",
    )
    return [rec[f] for f in RECORD_FIELDS][:n]  # type: ignore[literal-required]


async def test_purge_removes_the_users_entries_from_the_unreadable_backlog_only(
    hsettings: Settings, rds: Redis, engine: AsyncEngine
) -> None:
    keys = Keys(hsettings.key_prefix)
    bad = keys.history_backlog() + ":bad"
    zstd = zstandard.ZstdCompressor()
    u1 = [
        b"a" + msgpack.packb(entry_values("U1", "T1", 10)),  # too few fields
        b"A" + zstd.compress(msgpack.packb(entry_values("U1", "T1", 12))),
        b"Z?" + msgpack.packb("U1") + b"\xc1 torn",  # only the id can be found
    ]
    others = [
        b"a" + msgpack.packb(entry_values("U2", "T1", 10)),
        b"Z?" + msgpack.packb("U12") + b"\xc1 torn",
    ]
    await rds.rpush(bad, *u1, *others)

    result = await purge(rds, keys, engine, user="U1")

    assert result.bad_entries == 3
    assert await rds.lrange(bad, 0, -1) == others
    result = await purge(rds, keys, engine, tenant="T1")
    assert result.bad_entries == 1
    assert await rds.lrange(bad, 0, -1) == others[1:]


# --- Fencing out a stalled flush ------------------------------------------------------------


async def stall_flush_across_a_purge(
    settings: Settings, rds: Redis, engine: AsyncEngine, tmp_path: Path, point: str
) -> str:
    """U1 and U2 in the backlog; a flush process stalls at ``point`` past its lock; U1
    is purged; the flush wakes up. Returns the flush process's output."""
    history = make_history(rds, settings)
    for i, user in enumerate(["U1", "U2"]):
        m = message(i, user=user, text=f"{SECRET} {user}" if user == "U1" else "u2")
        await history.append(m.conversation_id, exchange(m), origin=m)
    log = tmp_path / f"flush-{point}.log"
    proc = run_flush_process(settings, log, pause=f"{point}:1")
    try:
        await eventually(lambda: "PAUSED" in log.read_text(), 60, "the flush to stall")
        # The purge waits for the stalled flush's lock to expire, then deletes U1.
        result = await purge(rds, Keys(settings.key_prefix), engine, user="U1")
        assert result.backlog_entries == 2
        os.kill(proc.pid, signal.SIGCONT)
        await eventually(
            lambda: "a purge ran since this flush started" in log.read_text(),
            60,
            "the stalled flush to be fenced out",
        )
        # The same process then flushes what is left; its next run stalls at the same
        # point (the hook stops every run's first batch).
        await eventually(lambda: log.read_text().count("PAUSED") == 2, 60, "the next run")
        os.kill(proc.pid, signal.SIGCONT)
        try:
            code = await asyncio.to_thread(proc.wait, 120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the flush did not end:\n{log.read_text()}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert code == 0, output
    return output


async def test_a_flush_stalled_before_its_transaction_cannot_write_purged_rows_back(
    hsettings: Settings, rds: Redis, engine: AsyncEngine, tmp_path: Path
) -> None:
    output = await stall_flush_across_a_purge(hsettings, rds, engine, tmp_path, "after_read")
    assert "a purge ran since this flush started" in output
    # Fenced, rolled back, then the same process flushed what was left: U2 only.
    assert [r async for r in iter_records(engine, user="U1")] == []
    assert sorted([r["message_id"] async for r in iter_records(engine, user="U2")]) == [
        "m1",
        "m1:answer",
    ]
    assert await count_rows(engine) == (2, 2)


@pytest.fixture
def pg_settings(redis_url: str) -> Iterator[Settings]:
    """Settings on Postgres only (a schema of its own, dropped after)."""
    if not postgres_reachable():
        pytest.skip("Postgres is not reachable on 127.0.0.1:5432")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield base_settings(redis_url, PG_URL, db_schema=schema)
    asyncio.run(drop_pg_schema(schema))


@pytest.mark.postgres
async def test_a_flush_stalled_inside_its_transaction_cannot_commit_purged_rows_on_postgres(
    pg_settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    # (On SQLite a flush stalled inside its transaction holds the one write lock: the
    # purge cannot delete anything until it goes on, so there is nothing to race.)
    from core.history.store import ensure_schema, make_engine

    engine = make_engine(pg_settings)
    rds: Redis = Redis.from_url(redis_url)
    try:
        await ensure_schema(pg_settings, engine)
        output = await stall_flush_across_a_purge(
            pg_settings, rds, engine, tmp_path, "before_commit"
        )
        assert "a purge ran since this flush started" in output
        assert [r async for r in iter_records(engine, user="U1")] == []
        assert await count_rows(engine) == (2, 2)
    finally:
        doomed = [k async for k in rds.scan_iter(f"{pg_settings.key_prefix}:*")]
        if doomed:
            await rds.delete(*doomed)
        await rds.aclose()
        await engine.dispose()


async def _insert_at_0002(engine: AsyncEngine, records: list[Any]) -> None:
    """Insert rows with the columns schema 0002 has (later revisions add more)."""
    from sqlalchemy import text

    cols = [c for c in COLUMNS if c != "files"]
    quoted = ", ".join(f'"{c}"' for c in cols)
    sql = text(f"INSERT INTO messages ({quoted}) VALUES ({', '.join(':' + c for c in cols)})")
    async with engine.begin() as conn:
        for rec in records:
            await conn.execute(sql, {**rec, "text_encoding": None})


async def test_upgrade_from_0002_adds_the_purge_fence_and_a_purge_moves_it(
    hsettings: Settings,
) -> None:
    from core.history.store import delete_records, fence_epoch, make_engine, schema_status, upgrade

    engine = make_engine(hsettings)
    try:
        assert await upgrade(hsettings, engine, revision="0002") == "0002"
        m = message(1)
        await _insert_at_0002(engine, [make_record(t, m.conversation_id, m) for t in exchange(m)])
        assert await upgrade(hsettings, engine) == "0005"
        assert (await schema_status(engine))[0] == "0005"
        assert await fence_epoch(engine) == 0
        assert await count_rows(engine) == (2, 2)  # the rows of 0002 are kept
        assert await delete_records(engine, user="U1") == 2
        assert await fence_epoch(engine) == 1
    finally:
        await engine.dispose()


async def test_on_sqlite_a_purge_behind_a_flush_stalled_in_its_transaction_stops_clearly(
    sqlite_settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    """SQLite has one writer: a flush stalled inside its transaction holds the write lock,
    so the purge cannot delete (or bump the epoch) until it goes on. The purge stops with
    a clear error; run again after the flush, it finishes the job."""
    from core.history.store import ensure_schema, make_engine

    settings = sqlite_settings
    engine = make_engine(settings)
    rds: Redis = Redis.from_url(redis_url)
    log = tmp_path / "flush-before_commit.log"
    proc = None
    try:
        await ensure_schema(settings, engine)
        history = make_history(rds, settings)
        for i, user in enumerate(["U1", "U2"]):
            m = message(i, user=user, text=f"{SECRET} {user}" if user == "U1" else "u2")
            await history.append(m.conversation_id, exchange(m), origin=m)
        proc = run_flush_process(settings, log, pause="before_commit:1")
        await eventually(lambda: "PAUSED" in log.read_text(), 60, "the flush to stall")

        code, out, err = await sluice(settings, "history", "purge", "--user", "U1", "--yes")
        assert code == 2, out + err
        assert "purge stopped part way" in err and "run it again" in err
        assert "Traceback" not in err

        os.kill(proc.pid, signal.SIGCONT)
        assert await asyncio.to_thread(proc.wait, 120) == 0, log.read_text()
        assert await user_rows(engine, "U1") == 2  # the flush committed what it held
        code, out, err = await sluice(settings, "history", "purge", "--user", "U1", "--yes")
        assert code == 0, err
        assert await user_rows(engine, "U1") == 0 and await user_rows(engine, "U2") == 2
        data = await everything(rds, settings.key_prefix)
        assert {k: v for k, v in data.items() if SECRET in v} == {}
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        doomed = [k async for k in rds.scan_iter(f"{settings.key_prefix}:*")]
        if doomed:
            await rds.delete(*doomed)
        await rds.aclose()
        await engine.dispose()


async def test_purge_deletes_arq_results_of_reply_jobs_and_of_their_queued_notices(
    hsettings: Settings, rds: Redis, engine: AsyncEngine
) -> None:
    await populate(rds, hsettings, engine)
    prefix = hsettings.key_prefix
    # populate() leaves each reply job's result; the queued notices' results hold the
    # message as well.
    for mid, tenant in (("m1", "T1"), ("m2", "T1"), ("m3", "T2")):
        job = f"reply:slack:{tenant}:{mid}"
        await rds.set(f"arq:result:{prefix}:queued:{job}", f"args of {mid}")
    await purge(rds, Keys(prefix), engine, user="U1")
    left = {k.decode() async for k in rds.scan_iter(f"arq:result:{prefix}:*")}
    assert left == {
        f"arq:result:{prefix}:reply:slack:T1:m2",
        f"arq:result:{prefix}:reply:slack:T1:m4",
        f"arq:result:{prefix}:queued:reply:slack:T1:m2",
    }
    await purge(rds, Keys(prefix), engine, tenant="T1")
    assert [k async for k in rds.scan_iter(f"arq:result:{prefix}:*")] == []


async def test_purge_stops_the_queued_notice_refreshes_of_the_users_messages(
    hsettings: Settings, rds: Redis, engine: AsyncEngine
) -> None:
    """The refresher keeps each message beside its entry: a purge takes the user's out."""
    from workers.refresher import schedule_refresh

    keys = Keys(hsettings.key_prefix)
    mine = IncomingMessage(
        platform="slack", tenant="T1", channel="C1", user="U1", message_id="m1", text="x"
    )
    other = IncomingMessage(
        platform="slack", tenant="T1", channel="C1", user="U2", message_id="m9", text="y"
    )
    for m in (mine, other):
        await schedule_refresh(rds, keys, hsettings, m, 0)
    result = await purge(rds, keys, engine, user="U1")
    assert result.notice_refreshes == 1
    assert await rds.zrange(keys.notice_refresh(), 0, -1) == [other.job_id.encode()]
    assert await rds.hkeys(keys.notice_refresh_payload()) == [other.job_id.encode()]  # type: ignore[misc]
    assert mine.model_dump_json().encode() not in await rds.hvals(keys.notice_refresh_payload())  # type: ignore[misc]
    await rds.delete(
        keys.notice_refresh(), keys.notice_refresh_payload(), keys.notice_refresh_count()
    )

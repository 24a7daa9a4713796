"""The SQL side: schema creation and upgrades, odd text round trips, retention."""

from __future__ import annotations

import time

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from core.errors import ConfigError
from core.history.store import (
    conversation_tail,
    count_rows,
    delete_older_than,
    ensure_schema,
    make_engine,
    schema_status,
    upgrade,
)
from core.settings import Settings
from tests.history.helpers import exchange, make_history, message
from workers.flush import Flusher

ODD_TEXTS = {
    "nul": "before\x00after\x00\x00end",
    "emoji": "🚀👩🏽‍💻🇫🇷 family: 👨‍👩‍👧‍👦",
    "rtl": "\u202eRTL override\u202c and \u200fمرحبا بالعالم\u200e שלום",
    "big": ("Ünïcödé lorem ipsum 🙂 " * 5000)[:100_000] + "\x00tail",
    "json-looking": '"quoted \\u0000 not a nul"',
    "zero-width": "a\u200bb\u200dc\ufeffd",
}


async def test_odd_text_is_stored_and_read_back_exactly(
    hsettings: Settings, rds: Redis, engine: AsyncEngine
) -> None:
    history = make_history(rds, hsettings, engine=engine)
    msgs = {
        name: message(i, text=text, channel="odd")
        for i, (name, text) in enumerate(ODD_TEXTS.items())
    }
    for m in msgs.values():
        await history.append(m.conversation_id, exchange(m, answer=m.text + "!"), origin=m)
    conv = next(iter(msgs.values())).conversation_id
    # From Redis (the big ones compressed there) ...
    hot = await history.hot(conv, 100)
    assert [t.text for t in hot if t.role == "user"] == list(ODD_TEXTS.values())
    # ... and from SQL after the flush.
    result = await Flusher(rds, hsettings, engine).run(max_s=30)
    assert result.error is None and result.inserted == 2 * len(ODD_TEXTS)
    stored = await conversation_tail(engine, conv, 100)
    assert [r["text"] for r in stored if r["role"] == "user"] == list(ODD_TEXTS.values())
    assert [r["text"] for r in stored if r["role"] == "assistant"] == [
        t + "!" for t in ODD_TEXTS.values()
    ]
    await rds.delete(history._keys.history(conv))
    assert [t.text for t in await history.recent(conv, 100)] == [
        x for t in ODD_TEXTS.values() for x in (t, t + "!")
    ]


async def test_empty_database_gets_the_schema_and_an_older_one_names_the_upgrade_command(
    hsettings: Settings,
) -> None:
    engine = make_engine(hsettings)
    try:
        # A database made by an older Sluice: the first migration only.
        assert await upgrade(hsettings, engine, revision="0001") == "0001"
        with pytest.raises(ConfigError, match="sluice db upgrade"):
            await ensure_schema(hsettings, engine)
        assert await upgrade(hsettings, engine) == "0005"
        await ensure_schema(hsettings, engine)
        rev, head, has_messages = await schema_status(engine)
        assert rev == head == "0005" and has_messages
    finally:
        await engine.dispose()


async def test_tool_call_turns_keep_their_tool_fields_through_sql(
    hsettings: Settings, rds: Redis, engine: AsyncEngine
) -> None:
    from core.messages import Turn

    history = make_history(rds, hsettings, engine=engine)
    m = message(1)
    calls = [{"id": "call_1", "name": "weather", "arguments": '{"city": "Oslo"}'}]
    turns = [
        exchange(m)[0],
        Turn(
            role="assistant",
            text="",
            message_id="m1:step1",
            tool_calls=calls,
            tokens_in=5,
            ts=m.ts + 0.1,
        ),
        Turn(
            role="tool",
            text='{"temp": 3}',
            message_id="m1:tool:call_1",
            tool_call_id="call_1",
            ts=m.ts + 0.2,
            tool_name="weather",
        ),
        exchange(m)[1],
    ]
    await history.append(m.conversation_id, turns, origin=m)
    await Flusher(rds, hsettings, engine).run(max_s=10)
    await rds.delete(history._keys.history(m.conversation_id))
    back = await history.recent(m.conversation_id, 10)
    assert [t.model_dump(exclude={"user"}) for t in back] == [
        t.model_dump(exclude={"user"}) for t in turns
    ]


async def test_retention_deletes_only_messages_older_than_the_limit(
    hsettings: Settings, rds: Redis, engine: AsyncEngine
) -> None:
    history = make_history(rds, hsettings)
    now = time.time()
    for i, age_days in enumerate([40, 31, 29, 1]):
        m = message(i).model_copy(update={"ts": now - age_days * 86400})
        await history.append(m.conversation_id, exchange(m), origin=m)
    await Flusher(rds, hsettings, engine).run(max_s=10)
    assert await delete_older_than(engine, 30) == 4
    assert await count_rows(engine) == (4, 4)
    assert [r["message_id"] for r in await conversation_tail(engine, "slack:T1:C1:-", 10)] == [
        "m2",
        "m2:answer",
        "m3",
        "m3:answer",
    ]


async def test_a_worker_refuses_an_older_schema_until_sluice_db_upgrade(
    sqlite_settings: Settings,
) -> None:
    from tests.history.test_data_management import sluice

    await upgrade(sqlite_settings, revision="0001")
    code, out, err = await sluice(sqlite_settings, "worker", "--burst")
    assert code == 2
    assert "sluice db upgrade" in err
    code, out, err = await sluice(sqlite_settings, "db", "upgrade")
    assert code == 0, err
    assert "revision 0005" in out
    code, out, err = await sluice(sqlite_settings, "worker", "--burst")
    assert code == 0, err


def test_record_fields_match_the_record_type_and_the_table_columns() -> None:
    from core.history.store import COLUMNS, RECORD_FIELDS, Record

    assert tuple(Record.__annotations__) == RECORD_FIELDS
    assert (*RECORD_FIELDS[:9], "text_encoding", *RECORD_FIELDS[9:]) == COLUMNS
    from core.history.store import MessageRow

    assert set(MessageRow.model_fields) == {"id", *COLUMNS}


async def test_an_answer_with_a_lone_surrogate_is_stored_with_a_replacement_character(
    hsettings: Settings, rds: Redis, engine: AsyncEngine
) -> None:
    history = make_history(rds, hsettings, engine=engine)
    m = message(1)
    await history.append(m.conversation_id, exchange(m, answer="bad \ud800 half"), origin=m)
    await Flusher(rds, hsettings, engine).run(max_s=10)
    stored = await conversation_tail(engine, m.conversation_id, 10)
    assert stored[1]["text"].startswith("bad \ufffd") and stored[1]["text"].endswith(" half")


def test_a_record_without_its_message_takes_place_from_the_conversation_id() -> None:
    from core.errors import HistoryError
    from core.history.hot import make_record, split_conversation_id
    from core.messages import Turn

    assert split_conversation_id("discord:G1:C1:-") == ("discord", "G1", "C1", None)
    # A Discord guild channel: each user is their own conversation, thread "user:<id>".
    assert split_conversation_id("discord:G1:C1:user:U7") == ("discord", "G1", "C1", "user:U7")
    for broken in ("web:web:s", "web::s:-", "nothing"):
        with pytest.raises(HistoryError):
            split_conversation_id(broken)
    assert split_conversation_id("slack:T1:C1:171.5") == ("slack", "T1", "C1", "171.5")
    rec = make_record(Turn(role="user", text="hi", message_id="x", user="U"), "slack:T:C:th")
    assert (rec["platform"], rec["tenant"], rec["channel"], rec["thread"], rec["user"]) == (
        "slack",
        "T",
        "C",
        "th",
        "U",
    )

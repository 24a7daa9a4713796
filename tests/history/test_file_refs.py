"""History keeps references to attached files (name, type, size, platform id), never
their bytes: in the Redis hot window, in the backlog, in SQL and in an export."""

from __future__ import annotations

import json

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from core.framework.agent import history_messages
from core.history.admin import export_records
from core.history.store import conversation_tail
from core.infra.redis import Keys
from core.messages import StoredFile, Turn
from core.settings import Settings
from tests.history.helpers import exchange, make_history, message
from workers.flush import Flusher

FILES = [
    StoredFile(id="F0001", name="chart.png", mimetype="image/png", size=48_213),
    StoredFile(id="F0002", name="report <b>q3</b>.pdf", mimetype="application/pdf", size=9),
]


async def test_file_references_go_through_redis_and_sql_and_export_without_content(
    hsettings: Settings, rds: Redis, engine: AsyncEngine
) -> None:
    history = make_history(rds, hsettings, engine=engine)
    m = message(1, text="look at these", channel="files")
    user, answer = exchange(m)
    turns = [user.model_copy(update={"files": FILES}), answer]
    await history.append(m.conversation_id, turns, origin=m)
    [hot_user] = [t for t in await history.hot(m.conversation_id, 10) if t.role == "user"]
    assert hot_user.files == FILES
    result = await Flusher(rds, hsettings, engine).run(max_s=30)
    assert result.error is None and result.inserted == 2
    stored = await conversation_tail(engine, m.conversation_id, 10)
    [row] = [r for r in stored if r["role"] == "user"]
    assert json.loads(row["files"] or "[]") == [f.model_dump() for f in FILES]
    assert [r["files"] for r in stored if r["role"] == "assistant"] == [None]
    # The window warmed again from SQL has the references too.
    await rds.delete(Keys(hsettings.key_prefix).history(m.conversation_id))
    warmed = await history.recent(m.conversation_id, 10)
    assert [t.files for t in warmed] == [FILES, None]
    exported = [r async for r in export_records(rds, Keys(hsettings.key_prefix), engine, user="U1")]
    assert [json.loads(r["files"]) for r in exported if r["role"] == "user"] == [
        [f.model_dump() for f in FILES]
    ]


def test_later_turns_name_earlier_files_to_the_model_without_their_content() -> None:
    earlier = [
        Turn(role="user", text="what is this", message_id="m1", files=FILES),
        Turn(role="assistant", text="a chart", message_id="m1:answer"),
    ]
    [user, assistant] = history_messages(earlier)
    assert user["content"] == (
        "what is this\n[Attached earlier: chart.png (image/png), "
        "report <b>q3</b>.pdf (application/pdf)]"
    )
    assert assistant["content"] == "a chart"

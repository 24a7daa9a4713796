"""The SQL record of every message: table, engine, schema migrations and bulk writes.

Every user message and every answer ends up here, written in batches by the
``flush_history`` job (``workers/flush.py``) and never on the hot path. SQLite
(the default, with WAL) and Postgres (through asyncpg) are supported; the schema
is managed by the Alembic migrations shipped in ``core/migrations``.

Postgres ``TEXT`` cannot hold NUL characters, so a text containing one is stored
JSON-encoded with ``text_encoding = 'json'`` (on every database, so that both keep
the same bytes) and decoded on the way out: what goes in comes back exactly.

A purge fences out flushes that started before it: :func:`delete_records` increments
the one-row ``history_fence`` table's ``epoch`` in its transaction, and a flush's
insert (:func:`insert_values` with ``fence=``) compares the epoch it read before it
read the backlog, inside its own transaction, and rolls back with
:class:`FlushFenced` when a purge came in between.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import asyncpg
from sqlalchemy import (
    Index,
    Table,
    UniqueConstraint,
    case,
    delete,
    event,
    exists,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlmodel import Field, SQLModel

from core.errors import ConfigError, HistoryError
from core.infra import metrics
from core.settings import Settings

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
UPGRADE_HINT = "run `sluice db upgrade`"
SCHEMA_WAIT_S = 5.0
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class MessageRow(SQLModel, table=True):
    """One stored message: a user's message or an answer.

    ``(platform, tenant, message_id)`` is unique: message ids from the platforms are
    only unique within one workspace (a Slack ``ts`` is not even global), and the
    flush inserts with ``ON CONFLICT DO NOTHING`` on it, so a record flushed twice is
    stored once. An answer's ``user`` is the user it answered. ``tool`` holds a turn's
    tool-call fields as JSON (``{"tool_calls": [...]}`` or ``{"tool_call_id": ...,
    "tool_name": ...}``), ``None`` for plain messages. ``files`` lists the files a user
    message had attached, as JSON references (``[{"id", "name", "mimetype", "size"}]``),
    never their content.
    """

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("platform", "tenant", "message_id", name="uq_messages_message_id"),
        Index("ix_messages_conversation_ts", "conversation_id", "ts"),
        Index("ix_messages_tenant_user_ts", "tenant", "user", "ts"),
        Index("ix_messages_ts", "ts", postgresql_using="brin"),
    )

    id: int | None = Field(default=None, primary_key=True)
    message_id: str = Field(max_length=255)
    platform: str = Field(max_length=32)
    tenant: str = Field(max_length=255)
    channel: str = Field(max_length=255)
    thread: str | None = Field(default=None, max_length=255)
    conversation_id: str = Field(max_length=1024)
    user: str | None = Field(default=None, max_length=255)
    role: str = Field(max_length=16)
    text: str
    text_encoding: str | None = Field(default=None, max_length=16)
    ts: float
    model: str | None = Field(default=None, max_length=255)
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: int = 0
    lane: str = Field(default="default", max_length=64)
    cached: bool = False
    tool: str | None = None
    files: str | None = None


_table: Table = MessageRow.__table__  # type: ignore[attr-defined]


class FenceRow(SQLModel, table=True):
    """The purge epoch (one row, ``id = 1``; migration 0003): a purge increments it,
    a flush that read an older one before a purge may not commit."""

    __tablename__ = "history_fence"

    id: int = Field(primary_key=True)
    epoch: int = 0


class FlushFenced(HistoryError):
    """A purge ran since this flush read the purge epoch; its transaction rolled back
    (the batch stays in the backlog and is read again by the next flush)."""


_FENCE_SELECT = "SELECT epoch FROM history_fence WHERE id = 1"
_FENCE_BUMP = "UPDATE history_fence SET epoch = epoch + 1 WHERE id = 1"
_NO_FENCE = "the database has no purge fence (history_fence): run `sluice db upgrade`"


class Record(TypedDict):
    """One message as it travels from Redis to SQL (the backlog's payload).

    The fields' order is the backlog's wire order (:data:`RECORD_FIELDS`): add new
    fields at the end, or entries already in Redis would be read wrongly.
    """

    message_id: str
    platform: str
    tenant: str
    channel: str
    thread: str | None
    conversation_id: str
    user: str | None
    role: str
    text: str
    ts: float
    model: str | None
    tokens_in: int
    tokens_out: int
    latency_ms: int
    lane: str
    cached: bool
    tool: str | None
    files: str | None


RECORD_FIELDS: tuple[str, ...] = tuple(Record.__annotations__)
"""The order of a record's values in the backlog and in :func:`insert_values`."""

COLUMNS: tuple[str, ...] = (
    *RECORD_FIELDS[: RECORD_FIELDS.index("text") + 1],
    "text_encoding",
    *RECORD_FIELDS[RECORD_FIELDS.index("text") + 1 :],
)
"""The table's columns in insert order: the record's fields, and how ``text`` is stored."""


def record_key(rec: Record | dict[str, Any]) -> tuple[str, str, str]:
    """The identity of a record: what the unique constraint is on."""
    return (rec["platform"], rec["tenant"], rec["message_id"])


def encode_text(text: str) -> tuple[str, str | None]:
    """Text as stored, and its encoding (``None``: as is; ``'json'``: held a NUL)."""
    if "\x00" in text:
        return json.dumps(text, ensure_ascii=False), "json"
    return text, None


def decode_text(stored: str, encoding: str | None) -> str:
    """The original text of a stored message."""
    if encoding == "json":
        value = json.loads(stored)
        if not isinstance(value, str):
            raise HistoryError("a stored json-encoded text is not a string")
        return value
    if encoding is None:
        return stored
    raise HistoryError(f"unknown text encoding {encoding!r} in the database")


def _to_row(rec: Record) -> dict[str, Any]:
    text, enc = encode_text(rec["text"])
    row: dict[str, Any] = {c: rec.get(c) for c in COLUMNS}
    row["text"] = text
    row["text_encoding"] = enc
    row["tokens_in"] = int(rec.get("tokens_in") or 0)
    row["tokens_out"] = int(rec.get("tokens_out") or 0)
    row["latency_ms"] = int(rec.get("latency_ms") or 0)
    row["cached"] = bool(rec.get("cached"))
    row["lane"] = rec.get("lane") or "default"
    row["ts"] = float(rec["ts"])
    return row


def row_to_record(row: Any) -> Record:
    """A :class:`Record` from a selected ``messages`` row (text decoded)."""
    m = row._mapping
    return Record(
        message_id=m["message_id"],
        platform=m["platform"],
        tenant=m["tenant"],
        channel=m["channel"],
        thread=m["thread"],
        conversation_id=m["conversation_id"],
        user=m["user"],
        role=m["role"],
        text=decode_text(m["text"], m["text_encoding"]),
        ts=float(m["ts"]),
        model=m["model"],
        tokens_in=int(m["tokens_in"]),
        tokens_out=int(m["tokens_out"]),
        latency_ms=int(m["latency_ms"]),
        lane=m["lane"],
        cached=bool(m["cached"]),
        tool=m["tool"],
        files=m["files"],
    )


# --- Engine -------------------------------------------------------------------------------


def async_url(database_url: str) -> str:
    """``DATABASE_URL`` with an async driver: aiosqlite for SQLite, asyncpg for Postgres."""
    url = make_url(database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        return url.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if backend in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise ConfigError(
        f"DATABASE_URL must be sqlite:///path or postgresql://...; got a {backend!r} URL"
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers never block the flush's writer; NORMAL is durable across app crashes
    # (a power cut may lose the last commits, which the backlog still holds until XACK).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA temp_store=MEMORY")
    cur.close()


def make_engine(settings: Settings, **kwargs: Any) -> AsyncEngine:
    """An async engine for ``DATABASE_URL`` (one per process; dispose it when done)."""
    url = async_url(settings.database_url)
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        connect_args["timeout"] = 5
        if settings.db_schema:
            _check_schema_name(settings.db_schema)
            connect_args["server_settings"] = {"search_path": settings.db_schema}
    engine = create_async_engine(url, connect_args=connect_args, pool_pre_ping=True, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def _check_schema_name(name: str) -> None:
    if not _SCHEMA_NAME.match(name):
        raise ConfigError(f"SLUICE_DB_SCHEMA {name!r} is not a plain SQL identifier")


def is_postgres(engine: AsyncEngine) -> bool:
    """Whether ``engine`` talks to Postgres (else SQLite)."""
    return engine.dialect.name == "postgresql"


# --- Schema -------------------------------------------------------------------------------


def _alembic_config(connection: Connection) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def _head_revision() -> str:
    from alembic.script import ScriptDirectory

    cfg = _alembic_config(None)  # type: ignore[arg-type]
    head = ScriptDirectory.from_config(cfg).get_current_head()
    if head is None:
        raise HistoryError("no migrations shipped in core/migrations")
    return head


def _current_revision(connection: Connection) -> tuple[str | None, bool]:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect

    rev = MigrationContext.configure(connection).get_current_revision()
    has_messages = inspect(connection).has_table("messages")
    return rev, has_messages


def _upgrade_sync(connection: Connection, revision: str = "head") -> None:
    from alembic import command

    if connection.dialect.name == "postgresql":
        # Workers starting together on an empty database: one migrates, the others wait.
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(728377001)")
    command.upgrade(_alembic_config(connection), revision)


async def _create_pg_schema(engine: AsyncEngine, settings: Settings) -> None:
    if is_postgres(engine) and settings.db_schema:
        _check_schema_name(settings.db_schema)
        try:
            async with engine.begin() as conn:
                await conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{settings.db_schema}"')
        except SQLAlchemyError:
            # Two processes creating it at once: one of them gets a unique violation.
            async with engine.connect() as conn:
                found = await conn.exec_driver_sql(
                    "SELECT 1 FROM pg_namespace WHERE nspname = $1", (settings.db_schema,)
                )
                if found.first() is None:
                    raise


async def upgrade(
    settings: Settings, engine: AsyncEngine | None = None, *, revision: str = "head"
) -> str:
    """Apply the migrations up to ``revision`` (``sluice db upgrade``: all of them);
    returns the revision now current."""
    own = engine is None
    eng = engine or make_engine(settings)
    try:
        await _create_pg_schema(eng, settings)
        async with eng.begin() as conn:
            await conn.run_sync(_upgrade_sync, revision)
        async with eng.connect() as conn:
            rev, _ = await conn.run_sync(_current_revision)
        return rev or ""
    finally:
        if own:
            await eng.dispose()


async def schema_status(engine: AsyncEngine) -> tuple[str | None, str, bool]:
    """``(current revision, head revision, messages table exists)``."""
    async with engine.connect() as conn:
        rev, has_messages = await conn.run_sync(_current_revision)
    return rev, _head_revision(), has_messages


async def ensure_schema(settings: Settings, engine: AsyncEngine | None = None) -> None:
    """Create the schema on an empty database; refuse an older one.

    Raises:
        ConfigError: the database holds an older (or unknown) schema; the message
            names ``sluice db upgrade``.
    """
    own = engine is None
    eng = engine or make_engine(settings)
    try:
        await _create_pg_schema(eng, settings)
        await _ensure_schema(settings, eng)
    finally:
        if own:
            await eng.dispose()


async def _ensure_schema(settings: Settings, eng: AsyncEngine) -> None:
    # Several workers may start at once on an empty database: on SQLite the creation is
    # not one transaction, so a half-made schema is waited for (briefly) before it is
    # called old. Postgres serialises creators with an advisory lock.
    deadline = time.monotonic() + SCHEMA_WAIT_S
    while True:
        rev, head, has_messages = await schema_status(eng)
        if rev == head:
            return
        if rev is None and not has_messages:
            try:
                await upgrade(settings, eng)
                logger.info("created the history schema (revision %s)", head)
            except SQLAlchemyError:
                if time.monotonic() > deadline:
                    raise
                logger.info("another process is creating the history schema; waiting")
            continue
        if rev is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # being created by another process right now
            continue
        raise ConfigError(
            f"the database schema is at revision {rev or 'unknown (no alembic_version)'}, "
            f"this Sluice needs {head}: {UPGRADE_HINT}"
        )


async def ensure_schema_at_startup(settings: Settings, engine: AsyncEngine | None = None) -> None:
    """:func:`ensure_schema` for ``sluice worker``/``sluice dev``: an older schema stops
    them (:class:`ConfigError`), an unreachable database does not (chat goes on; the
    flush checks again when it runs)."""
    try:
        await ensure_schema(settings, engine)
    except (SQLAlchemyError, OSError) as e:
        logger.warning(
            "database unreachable at startup (%s); history stays in Redis until it is back", e
        )


# --- Writes and reads -------------------------------------------------------------------

_PG_TYPES: dict[str, str] = {
    "message_id": "text",
    "platform": "text",
    "tenant": "text",
    "channel": "text",
    "thread": "text",
    "conversation_id": "text",
    "user": "text",
    "role": "text",
    "text": "text",
    "text_encoding": "text",
    "ts": "float8",
    "model": "text",
    "tokens_in": "int4",
    "tokens_out": "int4",
    "latency_ms": "int4",
    "lane": "text",
    "cached": "bool",
    "tool": "text",
    "files": "text",
}
_PG_INSERT = (
    "INSERT INTO messages ({cols}) SELECT * FROM unnest({params}) "
    "ON CONFLICT (platform, tenant, message_id) DO NOTHING"
).format(
    cols=", ".join(f'"{c}"' for c in COLUMNS),
    params=", ".join(f"${i + 1}::{_PG_TYPES[c]}[]" for i, c in enumerate(COLUMNS)),
)


RecordValues = Sequence[Any]
"""A record as a sequence of values in :data:`RECORD_FIELDS` order (the backlog's form)."""

_TEXT_AT = RECORD_FIELDS.index("text")
_KEY_AT = (
    RECORD_FIELDS.index("platform"),
    RECORD_FIELDS.index("tenant"),
    RECORD_FIELDS.index("message_id"),
)
_SQLITE_INSERT = (
    "INSERT INTO messages ({cols}) VALUES ({qs}) "
    "ON CONFLICT (platform, tenant, message_id) DO NOTHING"
).format(cols=", ".join(f'"{c}"' for c in COLUMNS), qs=", ".join("?" for _ in COLUMNS))


def record_values(rec: Record) -> list[Any]:
    """A :class:`Record` as values in :data:`RECORD_FIELDS` order, normalised."""
    values: list[Any] = [rec.get(f) for f in RECORD_FIELDS]
    for f in ("tokens_in", "tokens_out", "latency_ms"):
        values[RECORD_FIELDS.index(f)] = int(rec.get(f) or 0)  # type: ignore[call-overload]
    values[RECORD_FIELDS.index("cached")] = bool(rec.get("cached"))
    values[RECORD_FIELDS.index("lane")] = rec.get("lane") or "default"
    values[RECORD_FIELDS.index("ts")] = float(rec["ts"])
    return values


def dedupe(records: Iterable[Record]) -> list[Record]:
    """Records with repeated identities dropped (the first one kept)."""
    seen: set[tuple[str, str, str]] = set()
    out: list[Record] = []
    for rec in records:
        key = record_key(rec)
        if key not in seen:
            seen.add(key)
            out.append(rec)
    return out


def _columns(rows: Sequence[RecordValues]) -> list[list[Any]]:
    """Rows (deduplicated) turned into one list per column of :data:`COLUMNS`."""
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for row in rows:
        key = (row[_KEY_AT[0]], row[_KEY_AT[1]], row[_KEY_AT[2]])
        if key not in seen:
            seen.add(key)
            unique.append(row)
    cols = [list(c) for c in zip(*unique, strict=True)]
    if not cols:
        return []
    texts = cols[_TEXT_AT]
    encodings: list[str | None] = [None] * len(texts)
    for i, text in enumerate(texts):
        if "\x00" in text:  # rare: Postgres TEXT cannot hold NUL
            texts[i], encodings[i] = encode_text(text)
    cols.insert(_TEXT_AT + 1, encodings)
    return cols


async def insert_batch(
    engine: AsyncEngine,
    records: Sequence[Record],
    *,
    before_commit: Callable[[], Awaitable[None]] | None = None,
    fence: int | None = None,
) -> int:
    """Insert ``records`` in ONE transaction, skipping those already stored.

    See :func:`insert_values`; returns the number of rows actually inserted.
    """
    return await insert_values(
        engine, [record_values(r) for r in records], before_commit=before_commit, fence=fence
    )


async def insert_values(
    engine: AsyncEngine,
    rows: Sequence[RecordValues],
    *,
    before_commit: Callable[[], Awaitable[None]] | None = None,
    fence: int | None = None,
) -> int:
    """Insert rows (values in :data:`RECORD_FIELDS` order) in ONE transaction.

    Postgres gets a single ``INSERT ... SELECT FROM unnest(arrays) ON CONFLICT DO
    NOTHING`` (17 array parameters, whatever the batch size); SQLite an
    ``executemany`` of ``INSERT ... ON CONFLICT DO NOTHING`` in one transaction.
    Returns the number of rows actually inserted. ``before_commit`` is awaited inside
    the transaction, after the insert (the crash tests pause there).

    ``fence``: the purge epoch (:func:`fence_epoch`) read before these rows were read
    from Redis. It is compared last, inside the transaction (Postgres: ``FOR SHARE``,
    so a purge's increment waits for this commit and its delete then sees these rows;
    SQLite: under the write lock the insert took). When a purge came in between, the
    transaction rolls back and :class:`FlushFenced` is raised.

    Raises:
        FlushFenced: a purge ran since ``fence`` was read; nothing was written.
        HistoryError: the insert failed (Postgres).
    """
    cols = _columns(rows)
    if not cols:
        return 0
    if is_postgres(engine):
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            try:
                async with driver.transaction():
                    status: str = await driver.execute(_PG_INSERT, *cols)
                    if before_commit is not None:
                        await before_commit()
                    if fence is not None:
                        _check_fence(await driver.fetch(_FENCE_SELECT + " FOR SHARE"), fence)
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                raise HistoryError(f"inserting {len(cols[0])} messages failed: {e}") from e
        metrics.DB_TRANSACTIONS.inc()
        return int(status.rsplit(" ", 1)[-1])
    tuples = list(zip(*cols, strict=True))
    async with engine.begin() as conn:
        result = await conn.exec_driver_sql(_SQLITE_INSERT, tuples)
        if before_commit is not None:
            await before_commit()
        if fence is not None:
            _check_fence((await conn.exec_driver_sql(_FENCE_SELECT)).all(), fence)
    metrics.DB_TRANSACTIONS.inc()
    return int(result.rowcount or 0)


def _check_fence(rows: Sequence[Any], fence: int) -> None:
    if not rows:
        raise HistoryError(_NO_FENCE)
    if int(rows[0][0]) != fence:
        raise FlushFenced(
            f"a purge ran since this flush started (purge epoch {fence} -> {int(rows[0][0])})"
        )


async def fence_epoch(engine: AsyncEngine) -> int:
    """The current purge epoch; a flush reads it before it reads the backlog.

    Raises:
        HistoryError: the fence row is missing (the schema predates migration 0003).
    """
    async with engine.connect() as conn:
        rows = (await conn.exec_driver_sql(_FENCE_SELECT)).all()
    if not rows:
        raise HistoryError(_NO_FENCE)
    return int(rows[0][0])


async def insert_one_naive(engine: AsyncEngine, record: Record) -> None:
    """One message, one transaction: the naive design, for the benchmark only."""
    row = _to_row(record)
    if is_postgres(engine):
        stmt: Any = pg_insert(_table).values(**row)
    else:
        stmt = sqlite_insert(_table).values(**row)
    stmt = stmt.on_conflict_do_nothing(index_elements=["platform", "tenant", "message_id"])
    async with engine.begin() as conn:
        await conn.execute(stmt)
    metrics.DB_TRANSACTIONS.inc()


_c: Any = _table.c


async def conversation_tail(engine: AsyncEngine, conversation_id: str, n: int) -> list[Record]:
    """The last ``n`` stored messages of a conversation, oldest first."""
    stmt = (
        select(_table)
        .where(_c.conversation_id == conversation_id)
        .order_by(_c.ts.desc(), _c.id.desc())
        .limit(n)
    )
    async with engine.connect() as conn:
        result = await conn.execute(stmt)
        rows = result.fetchall()
    return [row_to_record(r) for r in reversed(rows)]


def _of_user(user: str) -> Any:
    """A user's rows, and the tool-call rows of their messages stored without a user.

    Tool-call turns (``<message_id>:step<n>``, ``<message_id>:tool:<call id>``) carry
    their user since tool turns were given one; older ones that reached SQL from a hot
    window (at the backlog bound) have none. They belong to the user whose message id
    begins theirs, in the same conversation.
    """
    parent = _table.alias("parent")
    p: Any = parent.c
    legacy_tool_row = (
        _c.user.is_(None)
        & _c.tool.is_not(None)
        & exists().where(
            p.conversation_id == _c.conversation_id,
            p.platform == _c.platform,
            p.tenant == _c.tenant,
            p.user == user,
            p.role == "user",
            func.substr(_c.message_id, 1, func.length(p.message_id) + 1) == p.message_id + ":",
        )
    )
    return (_c.user == user) | legacy_tool_row


def _who(user: str | None, tenant: str | None) -> Any:
    if user is None and tenant is None:
        raise ValueError("give a user, a tenant, or both")
    conds = []
    if user is not None:
        conds.append(_of_user(user))
    if tenant is not None:
        conds.append(_c.tenant == tenant)
    return conds[0] if len(conds) == 1 else conds[0] & conds[1]


async def iter_records(
    engine: AsyncEngine,
    *,
    user: str | None = None,
    tenant: str | None = None,
    chunk: int = 1000,
) -> AsyncIterator[Record]:
    """Every stored message of a user and/or tenant, oldest first (keyset-paged)."""
    last_id = 0
    while True:
        stmt = (
            select(_table).where(_who(user, tenant), _c.id > last_id).order_by(_c.id).limit(chunk)
        )
        async with engine.connect() as conn:
            rows = (await conn.execute(stmt)).fetchall()
        if not rows:
            return
        for r in rows:
            yield row_to_record(r)
        last_id = rows[-1]._mapping["id"]


async def user_message_keys(
    engine: AsyncEngine, *, user: str | None, tenant: str | None, since_ts: float
) -> set[tuple[str, str, str]]:
    """``(platform, tenant, message_id)`` of a user's and/or tenant's own messages
    (not answers) since ``since_ts``: what their reply jobs were keyed by."""
    stmt = (
        select(_c.platform, _c.tenant, _c.message_id)
        .where(_who(user, tenant), _c.role == "user", _c.ts >= since_ts)
        .distinct()
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return {(r[0], r[1], r[2]) for r in rows}


async def web_sessions(engine: AsyncEngine, *, user: str | None, tenant: str | None) -> set[str]:
    """The web chat sessions (a web message's channel) in which a user and/or tenant
    has stored messages."""
    stmt = select(_c.channel).where(_who(user, tenant), _c.platform == "web").distinct()
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return {r[0] for r in rows}


async def tenants_of_user(engine: AsyncEngine, user: str) -> set[str]:
    """Every tenant in which ``user`` has stored messages."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(_c.tenant).where(_c.user == user).distinct())).all()
    return {r[0] for r in rows}


async def delete_records(
    engine: AsyncEngine, *, user: str | None = None, tenant: str | None = None
) -> int:
    """Delete every stored message of a user and/or tenant (with the tool-call rows of
    their messages); returns how many.

    The same transaction first increments the purge epoch (``history_fence``), so a
    flush that read the backlog before this purge cannot commit afterwards (see
    :func:`insert_values`).

    Raises:
        HistoryError: the schema has no purge fence (``sluice db upgrade``).
    """
    cond = _who(user, tenant)
    async with engine.begin() as conn:
        bumped = await conn.exec_driver_sql(_FENCE_BUMP)
        if not bumped.rowcount:
            raise HistoryError(_NO_FENCE)
        result = await conn.execute(delete(_table).where(cond))
    return int(result.rowcount or 0)


async def delete_older_than(
    engine: AsyncEngine, days: int, *, chunk: int = 10_000, max_s: float | None = None
) -> int:
    """Retention: delete messages older than ``days`` days, in chunks, for at most
    ``max_s`` seconds; returns how many."""
    cutoff = time.time() - days * 86400
    deadline = None if max_s is None else time.monotonic() + max_s
    total = 0
    while deadline is None or time.monotonic() < deadline:
        ids = select(_c.id).where(_c.ts < cutoff).limit(chunk).scalar_subquery()
        async with engine.begin() as conn:
            result = await conn.execute(delete(_table).where(_c.id.in_(ids)))
        n = int(result.rowcount or 0)
        total += n
        if n < chunk:
            break
    return total


async def count_rows(engine: AsyncEngine) -> tuple[int, int]:
    """``(rows, distinct identities)`` in ``messages``: equal unless something is twice."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(func.count()).select_from(_table))).scalar_one()
        distinct = (
            await conn.execute(
                select(func.count()).select_from(
                    select(_c.platform, _c.tenant, _c.message_id).distinct().subquery()
                )
            )
        ).scalar_one()
    return int(rows), int(distinct)


class UsageRow(TypedDict):
    """Messages and tokens of one user in one tenant on one UTC day.

    ``messages`` counts the user's messages, ``answers`` the final answers (not the
    tool-call steps in between); tokens add up every model call, steps included.
    """

    day: str
    tenant: str
    user: str | None
    messages: int
    answers: int
    tokens_in: int
    tokens_out: int


async def usage(
    engine: AsyncEngine,
    *,
    days: int = 7,
    tenant: str | None = None,
    user: str | None = None,
) -> list[UsageRow]:
    """Tokens and messages per user and tenant per UTC day, newest day first."""
    if is_postgres(engine):
        day = func.to_char(func.timezone("UTC", func.to_timestamp(_c.ts)), "YYYY-MM-DD")
    else:
        day = func.date(_c.ts, "unixepoch")
    conds = [_c.ts >= time.time() - days * 86400]
    if tenant is not None:
        conds.append(_c.tenant == tenant)
    if user is not None:
        conds.append(_c.user == user)
    stmt = (
        select(
            day.label("day"),
            _c.tenant,
            _c.user,
            func.sum(case((_c.role == "user", 1), else_=0)).label("messages"),
            func.sum(case(((_c.role == "assistant") & _c.tool.is_(None), 1), else_=0)).label(
                "answers"
            ),
            func.sum(_c.tokens_in).label("tokens_in"),
            func.sum(_c.tokens_out).label("tokens_out"),
        )
        .where(*conds)
        .group_by(day, _c.tenant, _c.user)
        .order_by(day.desc(), _c.tenant, _c.user)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return [
        UsageRow(
            day=str(r.day),
            tenant=r.tenant,
            user=r.user,
            messages=int(r.messages or 0),
            answers=int(r.answers or 0),
            tokens_in=int(r.tokens_in or 0),
            tokens_out=int(r.tokens_out or 0),
        )
        for r in rows
    ]

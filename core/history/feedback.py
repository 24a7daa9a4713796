"""Feedback on answers: one 👍/👎 vote per user per answer, in SQL next to history.

The platform adapters turn a button click into a :class:`core.messages.Feedback`
(:func:`parse_vote` checks the ids the platform sends back: they came from a message
anyone in the channel can click, so they are treated as hostile) and enqueue the
``feedback`` job; a worker records it with :func:`record` (a user's second vote on
an answer replaces the first) and then runs the bot's ``@bot.on_feedback`` hooks.
``sluice usage`` counts votes per user per day (:func:`vote_counts`) and ``sluice
history export`` lists a user's or tenant's votes (:func:`votes_of`).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, TypedDict

from arq.connections import ArqRedis
from redis.exceptions import RedisError
from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    UniqueConstraint,
    delete,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from core.errors import HistoryError, InputError, QueueError
from core.messages import Feedback, Vote
from core.settings import Settings
from core.traffic.queue import default_reply_queue

logger = logging.getLogger(__name__)

FEEDBACK_JOB = "feedback"
# Platform ids: Slack "C0123:1700000000.000100" (channel:ts), Discord snowflakes.
# No ':' beyond the Slack form, no spaces or markup; bounded length.
_MESSAGE_ID = re.compile(r"[A-Za-z0-9]{1,32}:\d{1,12}\.\d{1,9}|\d{1,20}")
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_VOTES: dict[str, int] = {"up": 1, "down": -1}
_NAMES: dict[int, Vote] = {1: "up", -1: "down"}

_metadata = MetaData()
feedback_table = Table(
    "feedback",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("platform", String(32), nullable=False),
    Column("tenant", String(255), nullable=False),
    Column("channel", String(255), nullable=False),
    Column("message_id", String(255), nullable=False),
    Column("user", String(255), nullable=False),
    Column("vote", SmallInteger, nullable=False),
    Column("ts", Float, nullable=False),
    UniqueConstraint("platform", "tenant", "message_id", "user", name="uq_feedback_vote"),
)
_c: Any = feedback_table.c


def parse_vote(
    *, platform: str, tenant: str, channel: str, user: str, vote: str, message_id: str
) -> Feedback:
    """A vote from a button click, with every id checked.

    ``message_id`` comes back from the button (any member of the channel can click
    it, and a crafted request can carry anything); on Slack it must also belong to
    ``channel``, the channel the click came from.

    Raises:
        InputError: an id or the vote is malformed.
    """
    if vote not in _VOTES:
        raise InputError("a vote is 'up' or 'down'")
    for name, value in (("tenant", tenant), ("channel", channel), ("user", user)):
        if not _ID.fullmatch(value):
            raise InputError(f"malformed {name} id")
    if not _MESSAGE_ID.fullmatch(message_id):
        raise InputError("malformed message id")
    if ":" in message_id and message_id.split(":", 1)[0] != channel:
        raise InputError("the message is not in this channel")
    return Feedback(
        platform=platform,
        tenant=tenant,
        channel=channel,
        message_id=message_id,
        user=user,
        vote=vote,
    )


async def enqueue(redis: ArqRedis, settings: Settings, fb: Feedback) -> None:
    """Queue the ``feedback`` job that records ``fb`` (adapters call this after the ack).

    Raises:
        QueueError: Redis is unreachable.
    """
    try:
        await redis.enqueue_job(
            FEEDBACK_JOB, fb.model_dump(mode="json"), _queue_name=default_reply_queue(settings)
        )
    except (RedisError, OSError) as e:
        raise QueueError(f"cannot enqueue feedback: {e}") from e


async def record(engine: AsyncEngine, fb: Feedback) -> Vote | None:
    """Store ``fb``, replacing the user's earlier vote on the same answer; returns the
    earlier vote (``None``: the first).

    Raises:
        HistoryError: the database failed.
    """
    key = (
        (_c.platform == fb.platform)
        & (_c.tenant == fb.tenant)
        & (_c.message_id == fb.message_id)
        & (_c.user == fb.user)
    )
    values = {
        "platform": fb.platform,
        "tenant": fb.tenant,
        "channel": fb.channel,
        "message_id": fb.message_id,
        "user": fb.user,
        "vote": _VOTES[fb.vote],
        "ts": fb.ts,
    }
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    stmt = insert(feedback_table).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["platform", "tenant", "message_id", "user"],
        set_={"vote": stmt.excluded.vote, "ts": stmt.excluded.ts},
    )
    try:
        async with engine.begin() as conn:
            before = (await conn.execute(select(_c.vote).where(key))).scalar_one_or_none()
            await conn.execute(stmt)
    except SQLAlchemyError as e:
        raise HistoryError(f"cannot record feedback: {e}") from e
    return None if before is None else _NAMES.get(int(before))


class VoteRow(TypedDict):
    """A stored vote, as ``sluice history export`` writes it."""

    kind: str
    platform: str
    tenant: str
    channel: str
    message_id: str
    user: str
    vote: Vote
    ts: float


def _who(user: str | None, tenant: str | None) -> Any:
    conds = []
    if user is not None:
        conds.append(_c.user == user)
    if tenant is not None:
        conds.append(_c.tenant == tenant)
    if not conds:
        raise ValueError("give a user, a tenant, or both")
    return conds[0] if len(conds) == 1 else conds[0] & conds[1]


async def votes_of(
    engine: AsyncEngine, *, user: str | None = None, tenant: str | None = None
) -> list[VoteRow]:
    """Every vote a user cast and/or every vote in a tenant, oldest first."""
    stmt = select(feedback_table).where(_who(user, tenant)).order_by(_c.ts, _c.id)
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return [
        VoteRow(
            kind="feedback",
            platform=r.platform,
            tenant=r.tenant,
            channel=r.channel,
            message_id=r.message_id,
            user=r.user,
            vote=_NAMES.get(int(r.vote), "up"),
            ts=float(r.ts),
        )
        for r in rows
    ]


async def delete_votes(
    engine: AsyncEngine, *, user: str | None = None, tenant: str | None = None
) -> int:
    """Delete a user's and/or a tenant's votes (``sluice history purge``); how many."""
    async with engine.begin() as conn:
        result = await conn.execute(delete(feedback_table).where(_who(user, tenant)))
    return int(result.rowcount or 0)


async def vote_counts(
    engine: AsyncEngine,
    *,
    days: int = 7,
    tenant: str | None = None,
    user: str | None = None,
) -> dict[tuple[str, str, str], tuple[int, int]]:
    """``{(day, tenant, user): (👍, 👎)}`` of the votes cast in the last ``days`` days."""
    if engine.dialect.name == "postgresql":
        day = func.to_char(func.timezone("UTC", func.to_timestamp(_c.ts)), "YYYY-MM-DD")
    else:
        day = func.date(_c.ts, "unixepoch")
    conds = [_c.ts >= time.time() - days * 86400]
    if tenant is not None:
        conds.append(_c.tenant == tenant)
    if user is not None:
        conds.append(_c.user == user)
    up = func.sum(func.coalesce((_c.vote > 0).cast(Integer), 0))
    down = func.sum(func.coalesce((_c.vote < 0).cast(Integer), 0))
    stmt = (
        select(day.label("day"), _c.tenant, _c.user, up.label("up"), down.label("down"))
        .where(*conds)
        .group_by(day, _c.tenant, _c.user)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return {(str(r.day), r.tenant, r.user): (int(r.up or 0), int(r.down or 0)) for r in rows}

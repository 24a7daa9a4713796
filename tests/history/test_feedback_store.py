"""Feedback votes in SQL (SQLite and Postgres): one vote per user per answer, the vote
can be changed, and votes show in usage, in export and go with a purge."""

from __future__ import annotations

import time

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from core.errors import InputError
from core.history.admin import export_records, purge
from core.history.feedback import parse_vote, record, vote_counts, votes_of
from core.infra.redis import Keys
from sluice.history_cli import with_votes


def _vote(user: str, vote: str, message_id: str = "C1:100.000100", tenant: str = "T1"):
    return parse_vote(
        platform="slack", tenant=tenant, channel="C1", user=user, vote=vote, message_id=message_id
    )


async def test_a_user_has_one_vote_per_answer_and_can_change_it(engine: AsyncEngine) -> None:
    assert await record(engine, _vote("U1", "up")) is None
    assert await record(engine, _vote("U1", "up")) == "up"  # the same vote again
    assert await record(engine, _vote("U1", "down")) == "up"  # changed
    assert await record(engine, _vote("U2", "up")) is None  # another user
    votes = await votes_of(engine, tenant="T1")
    assert sorted((v["user"], v["vote"]) for v in votes) == [("U1", "down"), ("U2", "up")]
    assert {v["kind"] for v in votes} == {"feedback"}
    today = time.strftime("%Y-%m-%d", time.gmtime())
    counts = await vote_counts(engine, days=1)
    assert counts == {(today, "T1", "U1"): (0, 1), (today, "T1", "U2"): (1, 0)}


async def test_usage_rows_get_votes_and_a_voter_without_messages_gets_a_row() -> None:
    rows = [
        {
            "day": "2026-12-04",
            "tenant": "T1",
            "user": "U1",
            "messages": 3,
            "answers": 3,
            "tokens_in": 10,
            "tokens_out": 20,
        }
    ]
    out = with_votes(rows, {("2026-12-04", "T1", "U1"): (2, 1), ("2026-12-04", "T1", "U9"): (0, 1)})
    assert [(r["user"], r["messages"], r["up"], r["down"]) for r in out] == [
        ("U1", 3, 2, 1),
        ("U9", 0, 0, 1),
    ]


async def test_export_lists_votes_and_purge_deletes_them(
    engine: AsyncEngine, rds: Redis, keys: Keys
) -> None:
    await record(engine, _vote("U1", "up"))
    await record(engine, _vote("U2", "down"))
    exported = [r async for r in export_records(rds, keys, engine, user="U1")]
    assert [(r["kind"], r["user"], r["vote"], r["message_id"]) for r in exported] == [
        ("feedback", "U1", "up", "C1:100.000100")
    ]
    result = await purge(rds, keys, engine, user="U1")
    assert result.feedback_votes == 1
    assert [v["user"] for v in await votes_of(engine, tenant="T1")] == ["U2"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("message_id", "C2:100.000100"),  # another channel's message
        ("message_id", "<!here>"),
        ("message_id", "C1:100.1; DROP TABLE feedback"),
        ("message_id", "1" * 300),
        ("message_id", ""),
        ("user", "U1\nU2"),
        ("user", "x" * 65),
        ("tenant", "T1:evil"),
        ("vote", "sideways"),
    ],
)
def test_hostile_ids_from_a_click_are_refused(field: str, value: str) -> None:
    args = {
        "platform": "slack",
        "tenant": "T1",
        "channel": "C1",
        "user": "U1",
        "vote": "up",
        "message_id": "C1:100.000100",
        field: value,
    }
    with pytest.raises(InputError):
        parse_vote(**args)


def test_discord_snowflakes_are_accepted() -> None:
    fb = parse_vote(
        platform="discord",
        tenant="300000000000000001",
        channel="300000000000000002",
        user="300000000000000003",
        vote="down",
        message_id="300000000000000004",
    )
    assert (fb.vote, fb.message_id) == ("down", "300000000000000004")

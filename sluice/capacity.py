"""``sluice capacity``: worker counts for each hour of the week, from stored history.

Arithmetic, per hour of the week (Monday 00:00 UTC is hour 0):

- ``messages``: user messages in that hour; with several weeks of history, the
  busiest of them (``stat="peak"``) or their mean (``stat="mean"``);
- ``peak_rate`` = ``messages / 3600 * burst`` messages per second (``burst``: how
  much busier the busiest minutes are than the hour's average, default 2);
- ``needed`` = ``max(min_workers, ceil(peak_rate / per_worker_rate))``;
- ``workers`` = the most ``needed`` of this hour and the next ``lead_hours`` hours,
  so workers are running before the rush starts.

The queue-depth signal for an autoscaler: a worker clears ``per_worker_rate``
messages a second, so a backlog above ``per_worker_rate * target_wait_s`` per
worker means replies wait longer than ``target_wait_s``: add workers.

History sources: the SQL ``messages`` table (``DATABASE_URL``, written by the history
flush), or a JSON-lines file with a ``ts`` (epoch seconds) and optional ``role`` per
line, such as ``sluice history export`` writes.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.settings import Settings

HOURS_PER_WEEK = 168
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def hour_of_week(ts: float) -> int:
    """0..167: Monday 00:00-00:59 UTC is 0."""
    d = dt.datetime.fromtimestamp(ts, dt.UTC)
    return d.weekday() * 24 + d.hour


def hourly_counts(epoch_hours: dict[int, int], stat: str = "peak") -> list[float]:
    """Messages per hour of the week from counts per epoch hour (``ts // 3600``).

    ``stat`` ``peak``: the busiest week's count; ``mean``: the mean over the weeks
    the history covers (hours with no messages count as 0).
    """
    per_slot: dict[int, list[int]] = defaultdict(list)
    if epoch_hours:
        first, last = min(epoch_hours), max(epoch_hours)
        for h in range(first, last + 1):
            per_slot[hour_of_week(h * 3600)].append(epoch_hours.get(h, 0))
    out: list[float] = []
    for slot in range(HOURS_PER_WEEK):
        values = per_slot.get(slot, [])
        if not values:
            out.append(0.0)
        elif stat == "mean":
            out.append(sum(values) / len(values))
        else:
            out.append(float(max(values)))
    return out


@dataclass(frozen=True)
class Plan:
    """Workers to run per hour of the week, and the autoscaler's signal."""

    messages: list[float]
    needed: list[int]
    workers: list[int]
    per_worker_rate: float
    burst: float
    lead_hours: int
    min_workers: int
    target_wait_s: float

    @property
    def depth_per_worker(self) -> float:
        """Scale out when the queue holds more than this many jobs per worker."""
        return self.per_worker_rate * self.target_wait_s

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "per_worker_rate": self.per_worker_rate,
            "burst": self.burst,
            "lead_hours": self.lead_hours,
            "min_workers": self.min_workers,
            "target_wait_s": self.target_wait_s,
            "depth_per_worker": self.depth_per_worker,
            "hours": [
                {
                    "hour_of_week": h,
                    "day": DAYS[h // 24],
                    "hour": h % 24,
                    "messages": self.messages[h],
                    "needed": self.needed[h],
                    "workers": self.workers[h],
                }
                for h in range(HOURS_PER_WEEK)
            ],
        }


def make_plan(
    messages: list[float],
    *,
    per_worker_rate: float,
    burst: float = 2.0,
    lead_hours: int = 1,
    min_workers: int = 1,
    target_wait_s: float = 5.0,
) -> Plan:
    """The plan for ``messages`` per hour of the week (see the module docstring)."""
    if per_worker_rate <= 0:
        raise ValueError("per-worker throughput must be positive")
    needed = [
        max(min_workers, math.ceil(m / 3600 * burst / per_worker_rate - 1e-9)) for m in messages
    ]
    workers = [
        max(needed[(h + k) % HOURS_PER_WEEK] for k in range(lead_hours + 1))
        for h in range(HOURS_PER_WEEK)
    ]
    return Plan(
        messages, needed, workers, per_worker_rate, burst, lead_hours, min_workers, target_wait_s
    )


# --------------------------------------------------------------------------- sources


def epoch_hours_from_timestamps(stamps: Iterable[float]) -> dict[int, int]:
    """Counts per epoch hour."""
    out: dict[int, int] = defaultdict(int)
    for ts in stamps:
        out[int(ts) // 3600] += 1
    return dict(out)


def read_jsonl(path: Path, since_ts: float | None = None) -> dict[int, int]:
    """Counts per epoch hour of the user messages in a JSON-lines file."""

    def stamps() -> Iterable[float]:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                if row.get("role", "user") != "user":
                    continue
                ts = float(row["ts"])
                if since_ts is None or ts >= since_ts:
                    yield ts

    return epoch_hours_from_timestamps(stamps())


async def read_sql(settings: Settings, since_ts: float | None = None) -> dict[int, int]:
    """Counts per epoch hour of user messages in the ``messages`` table.

    Connects the way the history store does (``core.history.store.make_engine``: the async
    driver, ``SLUICE_DB_SCHEMA`` on Postgres).
    """
    from sqlalchemy import text

    from core.history.store import make_engine

    engine = make_engine(settings)
    # CAST(... AS INTEGER) / 3600 is integer division on SQLite and Postgres alike.
    query = text(
        "SELECT CAST(ts AS INTEGER) / 3600 AS h, COUNT(*) FROM messages "
        "WHERE role = 'user' AND ts >= :since GROUP BY h"
    )
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(query, {"since": since_ts or 0.0})).all()
    finally:
        await engine.dispose()
    return {int(h): int(n) for h, n in rows}


def per_worker_rate_from_bench(path: Path) -> float:
    """Answered messages per second per worker, from a ``sluice bench`` JSON report."""
    report = json.loads(path.read_text("utf-8"))
    s = report["designs"]["sluice"]
    rate = float(s["answered_per_s"]) / max(1, int(s["workers"]))
    if rate <= 0:
        raise ValueError(f"{path}: no answered messages to measure throughput from")
    return rate


def render_plan(plan: Plan) -> Any:
    """A week grid of worker counts and the autoscaler signal (rich renderables)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    grid = Table(
        title="Workers to run, per hour of the week (UTC)",
        box=box.SIMPLE_HEAD,
        padding=(0, 0),
        pad_edge=False,
    )
    grid.add_column("day", min_width=3)
    for h in range(24):
        grid.add_column(f"{h:02d}", justify="right", min_width=2)
    for d, day in enumerate(DAYS):
        grid.add_row(day, *(str(plan.workers[d * 24 + h]) for h in range(24)))
    busiest = max(range(HOURS_PER_WEEK), key=lambda h: plan.messages[h])
    notes = Text(
        f"per-worker throughput {plan.per_worker_rate:.2f} msg/s, burst x{plan.burst:g}, "
        f"lead {plan.lead_hours} h, at least {plan.min_workers}.\n"
        f"busiest hour: {DAYS[busiest // 24]} {busiest % 24:02d}:00 with "
        f"{plan.messages[busiest]:,.0f} messages -> {plan.needed[busiest]} workers.\n"
        f"autoscaler signal: scale out when sluice_queue_depth > "
        f"{plan.depth_per_worker:.1f} x workers (replies would wait > {plan.target_wait_s:g} s)."
    )
    return Group(grid, notes)


# --------------------------------------------------------------------------- sizing


@dataclass(frozen=True)
class MessageCosts:
    """What one message costs the shared engine and the workers, as measured by
    ``sluice bench`` (the numbers and their commands are in ``docs/benchmarks.md``,
    "Event-driven waiting"). The one source of these constants: ``docs/deploy.md``'s
    capacity table and ``sluice capacity --model`` are computed from them."""

    worker_cpu_ms: float
    """Worker process CPU (user + system) per answered message."""
    redis_commands: float
    """Redis commands per message (``INFO commandstats``, Lua scripts' own included)."""
    redis_cpu_us: float
    """Redis server CPU per message (``INFO cpu``)."""
    sql_rows: float = 2.0
    """Rows the history flush writes per message (the user's turn and the answer)."""
    postgres_rows_per_s: float = 58_400.0
    """One Postgres's rows per second in the flush's batches (``docs/deploy.md``)."""
    core_share: float = 0.7
    """How much of a core (a worker process's, or Redis's one main thread) to plan on."""


@dataclass(frozen=True)
class Shape:
    """A load's shape: launch day is 1,000 users sending 2,180 messages in a minute (10
    of them 10x), 30% repeated questions, against a provider allowing 600 requests a
    minute."""

    messages_per_user_per_s: float = 2180 / 1000 / 60
    cache_hit_ratio: float = 0.3
    provider_rpm: float = 600.0


# Measured on 2026-12-05 (docs/benchmarks.md, "Event-driven waiting"), on the busy
# 2-core machine: worker CPU from one worker at --rpm 0 (1,200 messages, CPU-bound);
# Redis commands and CPU from launch-day at --scale 0.3 (2 workers, a Valkey of its own).
MEASURED = MessageCosts(worker_cpu_ms=11.2, redis_commands=408.0, redis_cpu_us=6620.0)
LAUNCH_DAY = Shape()


@dataclass(frozen=True)
class Sizing:
    """What ``users`` in ``shape`` need, and which limit binds first."""

    users: int
    messages_per_s: float
    llm_calls_per_min: float
    workers: int
    redis_commands_per_s: float
    redis_cores: float
    postgres_rows_per_s: float
    postgres_share: float
    provider_share: float
    first_limit: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(vars(self))


def size_for(users: int, costs: MessageCosts = MEASURED, shape: Shape = LAUNCH_DAY) -> Sizing:
    """Workers, Redis and Postgres for ``users`` in ``shape`` at ``costs``.

    Each limit's share of what it can give: the provider's quota (LLM calls a minute
    over ``provider_rpm``), one Redis (its main thread's CPU over ``core_share`` of a
    core) and one Postgres (flushed rows over ``postgres_rows_per_s``). The largest
    share is the limit that comes first; over 1 it is already passed. Workers scale
    out (``ceil(messages/s x CPU per message / core_share)``), so they are not a limit.
    """
    rate = users * shape.messages_per_user_per_s
    calls_per_min = rate * (1 - shape.cache_hit_ratio) * 60
    redis_cores = rate * costs.redis_cpu_us / 1e6
    rows = rate * costs.sql_rows
    shares = {
        "provider": calls_per_min / shape.provider_rpm,
        "redis": redis_cores / costs.core_share,
        "postgres": rows / costs.postgres_rows_per_s,
    }
    return Sizing(
        users=users,
        messages_per_s=rate,
        llm_calls_per_min=calls_per_min,
        workers=max(1, math.ceil(rate * costs.worker_cpu_ms / 1000 / costs.core_share - 1e-9)),
        redis_commands_per_s=rate * costs.redis_commands,
        redis_cores=redis_cores,
        postgres_rows_per_s=rows,
        postgres_share=shares["postgres"],
        provider_share=shares["provider"],
        first_limit=max(shares, key=lambda k: shares[k]),
    )


def users_at_limit(costs: MessageCosts = MEASURED, shape: Shape = LAUNCH_DAY) -> dict[str, int]:
    """How many users in ``shape`` each shared limit carries on its own (one Redis,
    one Postgres, the provider's quota)."""
    per_user = shape.messages_per_user_per_s
    return {
        "provider": int(shape.provider_rpm / 60 / (1 - shape.cache_hit_ratio) / per_user),
        "redis": int(costs.core_share / (per_user * costs.redis_cpu_us / 1e6)),
        "postgres": int(costs.postgres_rows_per_s / (per_user * costs.sql_rows)),
    }


MODEL_USERS = (10_000, 100_000, 1_000_000)


def model_markdown(costs: MessageCosts = MEASURED, shape: Shape = LAUNCH_DAY) -> str:
    """The capacity table of ``docs/deploy.md`` (a test checks the page holds it)."""
    lines = [
        "| users | messages/s | LLM calls/min needed | workers | Redis commands/s "
        "| Redis CPU (cores) | Postgres rows/s | first limit |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for users in MODEL_USERS:
        z = size_for(users, costs, shape)
        lines.append(
            f"| {users:,} | {z.messages_per_s:,.0f} | {z.llm_calls_per_min:,.0f} "
            f"| {z.workers:,} | {z.redis_commands_per_s:,.0f} | {z.redis_cores:.2f} "
            f"| {z.postgres_rows_per_s:,.0f} | {z.first_limit} |"
        )
    limits = users_at_limit(costs, shape)
    lines.append("")
    lines.append(
        f"One of each carries, on its own: the provider's {shape.provider_rpm:,.0f} "
        f"requests/min **{limits['provider']:,} users**, one Redis "
        f"**{limits['redis']:,} users**, one Postgres **{limits['postgres']:,} users**."
    )
    return "\n".join(lines) + "\n"

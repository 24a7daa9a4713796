"""``sluice capacity`` on generated weeks of history: the plan's arithmetic."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from sluice.capacity import hour_of_week, hourly_counts, make_plan
from sluice.cli import main


def _monday(weeks_ago: int) -> float:
    now = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    monday = now - dt.timedelta(days=now.weekday(), hours=now.hour)
    return (monday - dt.timedelta(weeks=weeks_ago)).timestamp()


def _volume(h: int, week: int) -> int:
    """Messages in hour-of-week ``h``: busy weekday afternoons, quiet nights and weekends."""
    day, hour = divmod(h, 24)
    base = 5 if day >= 5 else (400 if 13 <= hour <= 16 else 60)
    return base + week * 10  # the second week is a little busier


def _history(weeks: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for week in range(weeks):
        start = _monday(weeks - week)
        for h in range(168):
            n = _volume(h, week)
            for i in range(n):
                ts = start + h * 3600 + (i * 3599) / max(1, n)
                rows.append({"ts": ts, "role": "user"})
                rows.append({"ts": ts + 1, "role": "assistant"})  # answers are not demand
    return rows


@pytest.fixture
def history_file(tmp_path: Path) -> Path:
    path = tmp_path / "history.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _history(2)) + "\n")
    return path


def _plan(args: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    result = CliRunner().invoke(main, ["capacity", *args, "--json"], env=env)
    assert result.exit_code == 0, result.output
    plan: dict[str, object] = json.loads(result.output)
    return plan


def test_plan_is_ceil_of_peak_rate_over_per_worker_rate_run_an_hour_ahead(history_file):
    plan = _plan(["--from-file", str(history_file), "--per-worker", "0.05", "--burst", "2"])
    hours = plan["hours"]
    assert isinstance(hours, list) and len(hours) == 168
    needed = []
    for row in hours:
        h = row["hour_of_week"]
        assert row["messages"] == _volume(h, 1)  # peak: the busier second week
        want = max(1, math.ceil(row["messages"] * 2 / 3600 / 0.05))
        assert row["needed"] == want, row
        needed.append(want)
    for h, row in enumerate(hours):
        assert row["workers"] == max(needed[h], needed[(h + 1) % 168])
    monday_14 = hours[14]
    assert (monday_14["day"], monday_14["hour"]) == ("Mon", 14)
    assert monday_14["messages"] == 410 and monday_14["needed"] == math.ceil(410 * 2 / 180)
    # Workers are up at 12:00 for the rush that starts at 13:00.
    assert hours[12]["needed"] == 1 and hours[12]["workers"] == hours[13]["needed"] == 5
    assert plan["depth_per_worker"] == pytest.approx(0.05 * 5.0)


def test_mean_of_the_weeks_instead_of_the_busiest(history_file):
    plan = _plan(["--from-file", str(history_file), "--per-worker", "0.05", "--stat", "mean"])
    hours = plan["hours"]
    assert isinstance(hours, list)
    assert hours[14]["messages"] == pytest.approx((400 + 410) / 2)


def test_plan_from_the_stored_history_table_matches_the_file(tmp_path):
    import asyncio

    from core.history.store import ensure_schema, insert_batch, make_engine
    from core.settings import Settings

    url = f"sqlite:///{tmp_path}/history.db"
    rows = _history(1)
    history_file = tmp_path / "one-week.jsonl"
    history_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    async def store() -> None:
        settings = Settings(_env_file=None, database_url=url)
        engine = make_engine(settings)
        try:
            await ensure_schema(settings, engine)
            records = [
                {
                    "message_id": f"m{i}",
                    "platform": "slack",
                    "tenant": "T1",
                    "channel": "C1",
                    "thread": None,
                    "conversation_id": "slack:T1:C1:-",
                    "user": "U1",
                    "role": r["role"],
                    "text": "hello",
                    "ts": r["ts"],
                    "model": None,
                    "tokens_in": 0,
                    "tokens_out": 0,
                    "latency_ms": 0,
                    "lane": "default",
                    "cached": False,
                    "tool": None,
                }
                for i, r in enumerate(rows)
            ]
            for start in range(0, len(records), 5000):
                await insert_batch(engine, records[start : start + 5000])  # type: ignore[arg-type]
        finally:
            await engine.dispose()

    asyncio.run(store())
    from_sql = _plan(["--per-worker", "0.05"], env={"DATABASE_URL": url})
    from_file = _plan(["--from-file", str(history_file), "--per-worker", "0.05"])
    assert from_sql["hours"] == from_file["hours"]


def test_per_worker_rate_comes_from_a_bench_report(history_file, tmp_path):
    report = tmp_path / "launch-day.json"
    report.write_text(json.dumps({"designs": {"sluice": {"answered_per_s": 10.0, "workers": 4}}}))
    plan = _plan(["--from-file", str(history_file), "--bench", str(report)])
    assert plan["per_worker_rate"] == 2.5


def test_screen_shows_the_week_grid_and_the_autoscaler_signal(history_file):
    result = CliRunner().invoke(
        main, ["capacity", "--from-file", str(history_file), "--per-worker", "0.05"]
    )
    assert result.exit_code == 0, result.output
    assert "Mon" in result.output and "Sun" in result.output
    assert "sluice_queue_depth" in result.output


def test_empty_history_plans_the_minimum_everywhere():
    plan = make_plan(hourly_counts({}), per_worker_rate=1.0, min_workers=2)
    assert set(plan.workers) == {2}
    assert hour_of_week(dt.datetime(2026, 11, 2, 0, 30, tzinfo=dt.UTC).timestamp()) == 0
    assert hour_of_week(dt.datetime(2026, 11, 8, 23, 59, tzinfo=dt.UTC).timestamp()) == 167


def test_the_capacity_model_in_the_deploy_guide_is_computed_from_the_measured_costs():
    """docs/deploy.md's table is exactly what ``sluice capacity --model`` prints, from
    the one set of measured constants (``sluice.capacity.MEASURED``)."""
    from sluice.capacity import model_markdown

    page = (Path(__file__).parents[2] / "docs" / "deploy.md").read_text("utf-8")
    table = model_markdown()
    assert table in page, "regenerate the table: sluice capacity --model"
    result = CliRunner().invoke(main, ["capacity", "--model"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == table.strip()


def test_capacity_model_arithmetic_and_the_first_limit():
    from sluice.capacity import LAUNCH_DAY, MessageCosts, Shape, size_for, users_at_limit

    costs = MessageCosts(worker_cpu_ms=10.0, redis_commands=100.0, redis_cpu_us=200.0)
    z = size_for(30_000, costs, LAUNCH_DAY)
    rate = 30_000 * 2180 / 1000 / 60
    assert z.messages_per_s == pytest.approx(rate)
    assert z.workers == math.ceil(rate * 10 / 1000 / 0.7)
    assert z.redis_commands_per_s == pytest.approx(rate * 100)
    assert z.redis_cores == pytest.approx(rate * 200e-6)
    assert z.postgres_rows_per_s == pytest.approx(rate * 2)
    assert z.llm_calls_per_min == pytest.approx(rate * 0.7 * 60)
    # At 600 requests a minute the provider is long past its quota: it binds first.
    assert z.first_limit == "provider" and z.provider_share > 1
    # With a quota sized far beyond the load, Redis is next.
    roomy = Shape(provider_rpm=1e9)
    assert size_for(30_000, costs, roomy).first_limit == "redis"
    limits = users_at_limit(costs, roomy)
    assert size_for(limits["redis"], costs, roomy).redis_cores <= 0.7 + 1e-9
    assert size_for(limits["redis"] + 100, costs, roomy).redis_cores > 0.7
    json_out = CliRunner().invoke(main, ["capacity", "--model", "--json"])
    assert json_out.exit_code == 0 and json.loads(json_out.output)["sizes"][0]["users"] == 10_000

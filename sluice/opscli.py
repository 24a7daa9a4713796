"""The ``sluice status`` and ``sluice capacity`` commands."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import click


def _fail(e: Exception) -> None:
    click.secho(f"error: {e}", fg="red", err=True)
    sys.exit(2)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the sections as JSON.")
@click.option("--watch", is_flag=True, help="A live screen, refreshed until Ctrl+C.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between two refreshes of --watch.",
)
def status(as_json: bool, watch: bool, interval: float) -> None:
    """Queue depth and oldest wait per lane, live workers, adapters, LLM budget, cache, history."""
    from redis.exceptions import RedisError
    from rich.console import Console

    from core.errors import ConfigError
    from core.settings import get_settings
    from sluice.status import collect_from_settings, render
    from sluice.status import watch as watch_screen

    settings = get_settings()
    if watch and as_json:
        _fail(click.UsageError("--watch and --json do not go together"))
    if watch:
        try:
            asyncio.run(watch_screen(settings, interval_s=interval))
        except (ConfigError, RedisError, OSError) as e:
            _fail(e)
        except KeyboardInterrupt:
            pass
        return
    try:
        sections = asyncio.run(collect_from_settings(settings))
    except (ConfigError, RedisError, OSError) as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps({k: [list(r) for r in v] for k, v in sections.items()}, indent=1))
    else:
        Console().print(render(sections, settings))


@click.command("capacity")
@click.option(
    "--from-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON lines with `ts` (and `role`) instead of DATABASE_URL.",
)
@click.option(
    "--weeks", type=int, default=4, show_default=True, help="How many weeks of history to read."
)
@click.option(
    "--stat",
    type=click.Choice(["peak", "mean"]),
    default="peak",
    show_default=True,
    help="Per hour of the week: the busiest week, or the mean of the weeks.",
)
@click.option(
    "--per-worker",
    type=float,
    default=None,
    help="Messages per second one worker answers (measured by `sluice bench`).",
)
@click.option(
    "--bench",
    "bench_json",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Take --per-worker from a `sluice bench` JSON report.",
)
@click.option(
    "--burst",
    type=float,
    default=2.0,
    show_default=True,
    help="Busiest minute's rate over the hour's average.",
)
@click.option(
    "--lead-hours",
    type=int,
    default=1,
    show_default=True,
    help="Run the next hours' workers this early.",
)
@click.option("--min-workers", type=int, default=1, show_default=True)
@click.option(
    "--target-wait",
    type=float,
    default=5.0,
    show_default=True,
    help="Longest acceptable queue wait (seconds) for the autoscaler signal.",
)
@click.option(
    "--model",
    is_flag=True,
    help="Instead of a plan from history: workers, Redis and Postgres for 10k, 100k and "
    "1M users in launch day's shape, from the measured cost of a message.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def capacity(
    from_file: Path | None,
    weeks: int,
    stat: str,
    per_worker: float | None,
    bench_json: Path | None,
    burst: float,
    lead_hours: int,
    min_workers: int,
    target_wait: float,
    model: bool,
    as_json: bool,
) -> None:
    """Worker counts to run per hour of the week, from history and measured throughput;
    or, with --model, what 10k, 100k and 1M users need and which limit comes first."""
    from rich.console import Console

    from core.settings import get_settings
    from sluice.capacity import (
        hourly_counts,
        make_plan,
        per_worker_rate_from_bench,
        read_jsonl,
        read_sql,
        render_plan,
    )

    if model:
        from sluice.capacity import MODEL_USERS, model_markdown, size_for, users_at_limit

        if as_json:
            click.echo(
                json.dumps(
                    {
                        "sizes": [size_for(u).as_dict() for u in MODEL_USERS],
                        "users_at_limit": users_at_limit(),
                    },
                    indent=1,
                )
            )
        else:
            click.echo(model_markdown())
        return
    if per_worker is not None:
        rate = per_worker
    elif bench_json is not None:
        rate = per_worker_rate_from_bench(bench_json)
    else:
        raise click.UsageError("give --per-worker RATE or --bench REPORT.json")
    since = time.time() - weeks * 7 * 86400
    if from_file is not None:
        counts = read_jsonl(from_file, since_ts=None)
    else:
        counts = asyncio.run(read_sql(get_settings(), since_ts=since))
    plan = make_plan(
        hourly_counts(counts, stat),
        per_worker_rate=rate,
        burst=burst,
        lead_hours=lead_hours,
        min_workers=min_workers,
        target_wait_s=target_wait,
    )
    if as_json:
        click.echo(json.dumps(plan.as_dict(), indent=1))
    else:
        Console().print(render_plan(plan))

"""The ``sluice bench`` command."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from sluice.bench.scenarios import SCENARIOS


@click.command("bench")
@click.option(
    "--scenario",
    type=click.Choice(sorted(SCENARIOS)),
    default="launch-day",
    show_default=True,
    help="launch-day: 1000 users x 2 messages in 60 s (10 at 10x, 30% repeats), provider "
    "600 rpm; steady: half the provider's limit for 2 min; 10x: ten times launch-day's "
    "users; flush: the history flush benchmark; serializer: JSON vs msgpack on the job "
    "payload; lanes: score ordering vs one queue per lane (SLUICE_LANE_QUEUES), same load "
    "and worker slots; launch-day-pool: launch-day against two simulators of half the rpm each "
    "(SLUICE_PROVIDERS); launch-day-pool-kill: the same, the second simulator killed 20 s in.",
)
@click.option(
    "--providers",
    type=click.IntRange(1, 16),
    default=None,
    help="Simulators in the provider pool, sharing the provider limits equally.",
)
@click.option(
    "--kill-provider-at",
    type=float,
    default=None,
    help="Kill the pool's last simulator this many seconds into the run.",
)
@click.option(
    "--scale",
    type=float,
    default=1.0,
    show_default=True,
    help="Multiply users, heavy users and provider limits (0.1 = a tenth).",
)
@click.option("--users", type=int, default=None, help="Override the number of users.")
@click.option("--messages", type=int, default=None, help="Override messages per user.")
@click.option("--duration", type=float, default=None, help="Seconds over which messages are sent.")
@click.option("--repeat-ratio", type=float, default=None, help="Share of repeated questions.")
@click.option("--heavy-users", type=int, default=None, help="Users who send 10x as much.")
@click.option("--rpm", type=int, default=None, help="Provider requests per minute (0: unlimited).")
@click.option("--tpm", type=int, default=None, help="Provider tokens per minute.")
@click.option("--first-token-ms", type=float, default=None, help="Simulated time to first token.")
@click.option("--tokens", type=int, default=None, help="Tokens per simulated answer.")
@click.option("--token-ms", type=float, default=None, help="Simulated time between tokens.")
@click.option(
    "--drain-timeout",
    type=float,
    default=None,
    help="Seconds to wait for replies after the last message is sent.",
)
@click.option("--workers", type=int, default=2, show_default=True, help="Sluice worker processes.")
@click.option(
    "--set",
    "sluice_env",
    multiple=True,
    metavar="NAME=VALUE",
    help="A setting for Sluice's processes, e.g. SLUICE_WORKER_POLL_DELAY_S=0.2 (repeatable).",
)
@click.option(
    "--design",
    "designs",
    type=click.Choice(["sluice", "naive"]),
    multiple=True,
    help="Run only this design (repeatable; default both).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("bench-out"),
    show_default=True,
    help="Directory for <scenario>.json, <scenario>.html and logs.",
)
@click.option("--seed", type=int, default=None, help="Seed of the schedule.")
@click.option(
    "--postgres",
    default=None,
    help="--scenario flush: also measure this Postgres (else SQLite only).",
)
def bench(
    scenario: str,
    scale: float,
    users: int | None,
    messages: int | None,
    duration: float | None,
    repeat_ratio: float | None,
    heavy_users: int | None,
    rpm: int | None,
    tpm: int | None,
    first_token_ms: float | None,
    tokens: int | None,
    token_ms: float | None,
    drain_timeout: float | None,
    workers: int,
    designs: tuple[str, ...],
    out: Path,
    seed: int | None,
    postgres: str | None,
    sluice_env: tuple[str, ...],
    providers: int | None,
    kill_provider_at: float | None,
) -> None:
    """Load-test the whole pipeline against the simulator, beside the naive design.

    Sluice: the web chat adapter, the arq queue on Redis (REDIS_URL, else an embedded
    Valkey), WORKERS `sluice worker` processes and the simulator. Naive: one server
    that calls the LLM in its handler and commits once per message. Same schedule,
    one after the other; a table on screen, JSON and an HTML chart in --out.
    """
    from rich.console import Console

    from core.settings import get_settings
    from sluice.bench import report
    from sluice.bench.procs import Proc, raise_fd_limit, redis_server
    from sluice.bench.run import run_bench, run_flush

    console = Console()
    argv = sys.argv[sys.argv.index("bench") + 1 :] if "bench" in sys.argv else []
    command = "sluice " + shlex.join(["bench", *argv])
    settings = get_settings()
    if scenario == "serializer":
        from rich.table import Table

        from sluice.bench.serializer import run_serializer_bench

        numbers = run_serializer_bench()
        table = Table(title="reply job payload: JSON vs msgpack (best of 5)")
        for col in ("format", "bytes", "serialize µs", "deserialize µs"):
            table.add_column(col)
        for name, row in numbers.items():
            table.add_row(
                name, str(row["bytes"]), str(row["serialize_us"]), str(row["deserialize_us"])
            )
        console.print(table)
        out.mkdir(parents=True, exist_ok=True)
        (out / "serializer.json").write_text(json.dumps(numbers, indent=1), "utf-8")
        return
    if scenario == "lanes":
        from sluice.bench.lanes import run_lanes
        from sluice.bench.run import base_env

        with redis_server(settings.redis_url) as (redis_url, _pid, desc):
            console.print(f"redis: {desc}")
            (out / "logs-lanes").mkdir(parents=True, exist_ok=True)
            rows = asyncio.run(run_lanes(redis_url, base_env(), out / "logs-lanes"))
        console.print(report.lanes_table(rows))
        (out / "lanes.json").write_text(json.dumps(rows, indent=1), "utf-8")
        return
    if scenario == "flush":
        with redis_server(settings.redis_url) as (redis_url, _pid, desc):
            console.print(f"redis: {desc}")
            try:
                result = asyncio.run(run_flush(redis_url, postgres, 10_000))
            except RuntimeError as e:
                raise click.ClickException(str(e)) from e
        out.mkdir(parents=True, exist_ok=True)
        (out / "flush.json").write_text(json.dumps(result, indent=1), "utf-8")
        console.print_json(data=result)
        return

    sc = SCENARIOS[scenario].scaled(scale)
    overrides: dict[str, Any] = {
        "users": users,
        "messages_per_user": messages,
        "duration_s": duration,
        "repeat_ratio": repeat_ratio,
        "heavy_users": heavy_users,
        "tpm": tpm,
        "first_token_ms": first_token_ms,
        "tokens": tokens,
        "token_ms": token_ms,
        "drain_timeout_s": drain_timeout,
        "seed": seed,
        "providers": providers,
        "kill_provider_at_s": kill_provider_at,
    }
    sc = replace(sc, **{k: v for k, v in overrides.items() if v is not None})
    if rpm is not None:
        sc = replace(sc, rpm=rpm or None)
    if sc.kill_provider_at_s is not None and sc.providers < 2:
        raise click.BadParameter(
            "killing a provider needs a pool of two or more (--providers)",
            param_hint="--kill-provider-at",
        )
    if sc.heavy_users > sc.users:
        sc = replace(sc, heavy_users=sc.users)
    extra_env = _settings_env(sluice_env)
    raise_fd_limit()
    with redis_server(settings.redis_url) as (redis_url, redis_pid, desc):
        console.print(
            f"[bold]sluice bench {sc.name}[/]: {sc.total_messages:,} messages from "
            f"{sc.users:,} users over {sc.duration_s:.0f} s; redis: {desc}; workers: {workers}"
        )
        started: list[Proc] = []
        try:
            result = asyncio.run(
                run_bench(
                    sc,
                    workers=workers,
                    designs=designs or ("sluice", "naive"),
                    redis_url=redis_url,
                    redis_pid=redis_pid,
                    out_dir=out,
                    command=command,
                    console=console,
                    sluice_env=extra_env,
                    started=started,
                )
            )
        finally:
            # Normally stopped already; after Ctrl+C, whatever is left.
            for proc in reversed(started):
                proc.stop()
    console.print(report.table(result))
    json_path, html_path = report.write(result, out)
    console.print(f"wrote {json_path} and {html_path}")
    for name, ok in result["consistent"].items():
        if not ok:
            console.print(f"[red]{name}: replies do not add up to messages sent[/]")


def _settings_env(items: tuple[str, ...]) -> dict[str, str]:
    """``--set NAME=VALUE`` options as environment variables."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--set")
        out[name] = value
    return out

"""``sluice history``, ``sluice db`` and ``sluice usage``: history data management.

Named in ``LAZY_COMMANDS`` in ``sluice/cli.py``, which imports this module only when
one of these commands runs.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import click

from core.errors import ConfigError
from core.infra.redis import client
from core.settings import get_settings


def _fail(e: Exception) -> None:
    click.secho(f"error: {e}", fg="red", err=True)
    sys.exit(2)


def _who(user: str | None, tenant: str | None) -> None:
    if user is None and tenant is None:
        raise click.UsageError("give --user ID, --tenant ID, or both")


@click.group()
def history() -> None:
    """Stored messages: export, purge, flush now."""


@history.command("export")
@click.option("--user", default=None, help="User id (in every tenant unless --tenant is given).")
@click.option("--tenant", default=None, help="Tenant id (Slack team, Discord guild, `web`).")
@click.option(
    "--output",
    "-o",
    type=click.File("w", encoding="utf-8"),
    default="-",
    help="File to write (default stdout).",
)
def export_cmd(user: str | None, tenant: str | None, output: Any) -> None:
    """Everything stored about a user or tenant, as JSON lines (SQL, backlog, hot windows)."""
    _who(user, tenant)
    from core.history.admin import export_records, open_clients

    async def run() -> int:
        redis, keys, engine = open_clients(get_settings())
        n = 0
        try:
            async for rec in export_records(redis, keys, engine, user=user, tenant=tenant):
                output.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
        finally:
            await redis.aclose()
            await engine.dispose()
        return n

    try:
        n = asyncio.run(run())
    except ConfigError as e:
        _fail(e)
    click.echo(f"exported {n} messages", err=True)


@history.command("purge")
@click.option("--user", default=None, help="User id (in every tenant unless --tenant is given).")
@click.option("--tenant", default=None, help="Tenant id.")
@click.option(
    "--yes", is_flag=True, help="Do not ask for confirmation (required without a terminal)."
)
def purge_cmd(user: str | None, tenant: str | None, yes: bool) -> None:
    """Delete a user's or tenant's messages everywhere: SQL, Redis (backlog, hot windows,
    queued and running reply jobs, web outboxes, unreadable backlog entries) and cache.

    For a user, the cache of every tenant they wrote in is cleared (cache entries
    cannot be attributed to one user). Without a terminal, --yes is required.
    """
    _who(user, tenant)
    who = " in ".join(
        x for x in (f"user {user}" if user else "", f"tenant {tenant}" if tenant else "") if x
    )
    if not yes:
        if not sys.stdin.isatty():
            # No one to ask (a script, a pipe, cron): never read an answer from stdin.
            click.secho(
                f"error: purge deletes every stored message of {who} and cannot ask for "
                "confirmation without a terminal; pass --yes to confirm",
                fg="red",
                err=True,
            )
            sys.exit(2)
        click.confirm(f"Delete every stored message of {who}?", abort=True)
    from redis.exceptions import RedisError
    from sqlalchemy.exc import SQLAlchemyError

    from core.errors import HistoryError
    from core.history.admin import open_clients, purge
    from core.history.store import ensure_schema
    from core.traffic.queue import notice_queue_name, reply_queues

    async def run() -> Any:
        settings = get_settings()
        redis, keys, engine = open_clients(settings)
        try:
            # An older schema has no purge fence: stop with the upgrade command.
            await ensure_schema(settings, engine)
            return await purge(
                redis,
                keys,
                engine,
                user=user,
                tenant=tenant,
                queues=[*reply_queues(settings), notice_queue_name(settings)],
            )
        finally:
            await redis.aclose()
            await engine.dispose()

    try:
        r = asyncio.run(run())
    except (ConfigError, HistoryError, TimeoutError) as e:
        _fail(e)
    except (SQLAlchemyError, RedisError, OSError) as e:
        # E.g. SQLite locked by a flush stalled inside its transaction. Each step is
        # whole (the SQL delete is one transaction), so running it again finishes it.
        _fail(HistoryError(f"purge stopped part way ({type(e).__name__}: {e}); run it again"))
    click.echo(
        f"purged {who}: {r.sql_rows} SQL rows, {r.backlog_entries} backlog entries, "
        f"{r.hot_turns} hot-window turns, {r.cache_keys} cache keys, "
        f"{r.job_traces} reply-job keys, {r.jobs_queued} queued jobs, "
        f"{r.jobs_running} running jobs, {r.web_outboxes} web outboxes, "
        f"{r.bad_entries} unreadable backlog entries, {r.feedback_votes} feedback votes, "
        f"{r.thread_contexts} cached threads, {r.notice_refreshes} notice refreshes "
        f"(tenants: {', '.join(sorted(r.tenants)) or '-'})"
    )


@history.command("flush")
def flush_cmd() -> None:
    """Move the whole Redis backlog to SQL now (waits for a running flush)."""
    from workers.flush import flush_all

    try:
        result = asyncio.run(flush_all(get_settings()))
    except ConfigError as e:
        _fail(e)
    click.echo(f"flush: {result}")
    if result.error:
        sys.exit(1)


@history.command("status")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def status_cmd(as_json: bool) -> None:
    """The write-behind backlog: length, oldest entry's age, last flush, errors."""
    import dataclasses

    from redis.asyncio import Redis

    from core.history.hot import backlog_status
    from core.infra.redis import Keys

    settings = get_settings()
    if not settings.redis_url and not settings.redis_sentinels:
        _fail(ConfigError("REDIS_URL is not set"))

    async def run() -> Any:
        redis: Redis = client(settings)
        try:
            return await backlog_status(
                redis, Keys(settings.key_prefix), settings.history_backlog_max
            )
        finally:
            await redis.aclose()

    st = asyncio.run(run())
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(st), "full": st.full}))
        return
    last = "never" if st.last_flush_ts is None else f"{time.time() - st.last_flush_ts:.0f}s ago"
    click.echo(
        f"backlog: {st.length:,} of {st.backlog_max:,} (oldest {st.oldest_age_s:.1f}s, "
        f"{st.pending:,} being written)\nlast flush: {last}"
        f"\nfailures in a row: {st.failures}{' - ' + st.last_error if st.last_error else ''}"
        f"\noverflow: {st.overflow_conversations:,} conversations waiting, "
        f"{st.overflowed_total:,} messages past the bound so far"
    )
    if st.full:
        click.secho("the backlog is FULL: is the database down?", fg="red", err=True)


@click.group()
def db() -> None:
    """The SQL database (DATABASE_URL)."""


@db.command("upgrade")
def upgrade_cmd() -> None:
    """Apply schema migrations (creates the tables on an empty database)."""
    from core.history.store import upgrade

    settings = get_settings()
    try:
        rev = asyncio.run(upgrade(settings))
    except ConfigError as e:
        _fail(e)
    click.echo(f"database at revision {rev}")


@click.command()
@click.option("--days", type=int, default=7, show_default=True, help="How many days back.")
@click.option("--tenant", default=None, help="Only this tenant.")
@click.option("--user", default=None, help="Only this user.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
def usage(days: int, tenant: str | None, user: str | None, as_json: bool) -> None:
    """Tokens and messages per user and tenant per day (UTC), from SQL."""
    from core.history.feedback import vote_counts
    from core.history.store import make_engine
    from core.history.store import usage as usage_rows

    async def run() -> list[dict[str, Any]]:
        engine = make_engine(get_settings())
        try:
            found = await usage_rows(engine, days=days, tenant=tenant, user=user)
            votes = await vote_counts(engine, days=days, tenant=tenant, user=user)
        finally:
            await engine.dispose()
        return with_votes([dict(r) for r in found], votes)

    try:
        rows = asyncio.run(run())
    except ConfigError as e:
        _fail(e)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Usage, last {days} days (UTC)")
    for col in ("day", "tenant", "user", "messages", "answers", "tokens in", "tokens out"):
        table.add_column(col, justify="right" if col[0] in "amt" and col != "tenant" else "left")
    table.add_column("👍", justify="right")
    table.add_column("👎", justify="right")
    for r in rows:
        table.add_row(
            r["day"],
            r["tenant"],
            r["user"] or "-",
            f"{r['messages']:,}",
            f"{r['answers']:,}",
            f"{r['tokens_in']:,}",
            f"{r['tokens_out']:,}",
            f"{r['up']:,}",
            f"{r['down']:,}",
        )
    Console().print(table)


def with_votes(
    rows: list[dict[str, Any]], votes: dict[tuple[str, str, str], tuple[int, int]]
) -> list[dict[str, Any]]:
    """Usage rows with each user's 👍/👎 votes of the day (``up``, ``down``); a user who
    only voted that day gets a row of their own. Newest day first, as ``usage``."""
    left = dict(votes)
    for r in rows:
        r["up"], r["down"] = left.pop((r["day"], r["tenant"], r["user"] or ""), (0, 0))
    for (day, tenant, user), (up, down) in left.items():
        rows.append(
            {
                "day": day,
                "tenant": tenant,
                "user": user,
                "messages": 0,
                "answers": 0,
                "tokens_in": 0,
                "tokens_out": 0,
                "up": up,
                "down": down,
            }
        )
    rows.sort(key=lambda r: (r["tenant"], r["user"] or ""))
    rows.sort(key=lambda r: r["day"], reverse=True)
    return rows

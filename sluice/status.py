"""``sluice status``: one screen of what the deployment is doing, read from Redis.

Sections come from probes: ``async probe(settings, redis) -> list[(name, value)]``,
listed in :data:`PROBES`. The queue, worker, adapter and history probes are here;
the LLM budget and cache probes are :mod:`core.traffic.control`'s, which owns that state.

Every row and error is masked with :func:`core.infra.logs.redact` (a flush error can quote a
``DATABASE_URL`` with its password), and so is the error that ends the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from rich.console import Console
from rich.live import Live
from rich.table import Table

from core.history.hot import backlog_status
from core.infra.heartbeat import live
from core.infra.logs import redact, register_secret, secret_values
from core.infra.metrics import lane_snapshot, queue_names
from core.infra.redis import Keys
from core.infra.signals import stop_on_signals
from core.settings import Settings
from core.traffic.control import budget_probe, cache_probe, providers_probe

Row = tuple[str, str]
Probe = Callable[[Settings, Redis], Awaitable[list[Row]]]


async def queue_probe(settings: Settings, redis: Redis) -> list[Row]:
    """Waiting and running jobs and the oldest wait, per lane."""
    lanes = await lane_snapshot(redis, queue_names(settings))
    return [
        (
            f"lane {lane}",
            f"{st.waiting} waiting, {st.running} running, oldest waiting {st.oldest_wait_s:.1f} s",
        )
        for lane, st in sorted(lanes.items())
    ]


def _alive_for(settings: Settings) -> float:
    return settings.health_check_interval_s * 3.0


async def workers_probe(settings: Settings, redis: Redis) -> list[Row]:
    """Workers that sent a heartbeat within three health-check intervals."""
    members = await live(redis, Keys(settings.key_prefix), _alive_for(settings))
    workers = sorted(m.split(":", 1)[1] for m in members if m.startswith("worker:"))
    health = await redis.get(f"{settings.queue_name}:health-check")
    rows: list[Row] = [("live workers", str(len(workers)))]
    if workers:
        rows.append(("", ", ".join(workers[:8]) + (" …" if len(workers) > 8 else "")))
    if health:
        text = health.decode() if isinstance(health, bytes) else str(health)
        rows.append(("last arq health check", text))
    return rows


async def adapters_probe(settings: Settings, redis: Redis) -> list[Row]:
    """Adapters seen within three heartbeat intervals, per platform."""
    members = await live(redis, Keys(settings.key_prefix), _alive_for(settings))
    per: dict[str, list[str]] = {}
    for member, _age in members.items():
        role, _, rest = member.partition(":")
        if role != "adapter":
            continue
        platform, _, ident = rest.partition(":")
        per.setdefault(platform, []).append(ident)
    if not per:
        return [("adapters seen", "none")]
    return [
        (platform, f"{len(ids)} seen ({', '.join(sorted(ids)[:4])})")
        for platform, ids in sorted(per.items())
    ]


async def history_probe(settings: Settings, redis: Redis) -> list[Row]:
    """The write-behind backlog and the last flush (``core.history.hot.backlog_status``)."""
    st = await backlog_status(redis, Keys(settings.key_prefix), settings.history_backlog_max)
    last = (
        f"{time.time() - st.last_flush_ts:.0f} s ago" if st.last_flush_ts is not None else "never"
    )
    rows: list[Row] = [
        ("backlog", f"{st.length:,} messages not yet in SQL, oldest {st.oldest_age_s:.0f} s"),
        ("last flush", last),
    ]
    if st.failures or st.last_error:
        rows.append(("flush failures", f"{st.failures} (last: {st.last_error or '-'})"))
    if st.overflow_conversations:
        rows.append(("over the bound", f"{st.overflow_conversations} conversations"))
    return rows


# Section -> probe.
PROBES: dict[str, Probe] = {
    "Queue": queue_probe,
    "Workers": workers_probe,
    "Adapters": adapters_probe,
    "LLM budget": budget_probe,
    "Providers": providers_probe,
    "Cache": cache_probe,
    "History": history_probe,
}


async def collect(settings: Settings, redis: Redis) -> dict[str, list[Row]]:
    """Every section's rows, secrets masked; a probe that fails shows its error."""
    register_secret(*secret_values(settings))
    out: dict[str, list[Row]] = {}
    for section, probe in PROBES.items():
        try:
            out[section] = await probe(settings, redis)
        except (RedisError, OSError) as e:
            out[section] = [("", f"error: {e}")]
        out[section] = [(redact(name), redact(value)) for name, value in out[section]]
    return out


def render(sections: dict[str, list[Row]], settings: Settings) -> Table:
    """The one-screen table."""
    t = Table(
        title=f"sluice status  (prefix {settings.key_prefix!r}, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC)",
        show_header=False,
    )
    t.add_column("section", style="bold")
    t.add_column("what")
    t.add_column("value")
    for section, rows in sections.items():
        for i, (name, value) in enumerate(rows):
            t.add_row(section if i == 0 else "", name, value)
        t.add_section()
    return t


def _connect(settings: Settings) -> Redis:
    """A client for ``settings`` (``REDIS_URL`` or the sentinels).

    Raises:
        ConfigError: with a clear message when ``REDIS_URL`` (or the sentinels) is unset.
    """
    from core.infra.redis import client

    return client(settings, socket_connect_timeout=2)


async def collect_from_settings(settings: Settings) -> dict[str, list[Row]]:
    """Connect to ``REDIS_URL`` and collect every section."""
    redis = _connect(settings)
    try:
        return await collect(settings, redis)
    except (RedisError, OSError) as e:
        # Printed by the command: masked, and without the chain that may quote the URL.
        register_secret(*secret_values(settings))
        raise RedisError(f"cannot read the status from Redis: {redact(str(e))}") from None
    finally:
        await redis.aclose()


async def watch(
    settings: Settings,
    *,
    interval_s: float,
    console: Console | None = None,
    refreshes: int | None = None,
) -> int:
    """``sluice status --watch``: redraw the screen every ``interval_s`` seconds.

    On a terminal the table is redrawn in place (:class:`rich.live.Live`); into a pipe or
    a file each refresh is printed after the last. Runs until cancelled (Ctrl+C), or for
    ``refreshes`` screens; returns how many were drawn. Redis going away shows as an
    error in each section, and the screen keeps refreshing until it is back.
    """
    console = console or Console()
    # Ctrl+C (or SIGTERM) sets an event rather than cancelling the task: a cancellation
    # that lands inside a Redis call can be lost there, and the screen went on.
    stop = stop_on_signals() if refreshes is None else asyncio.Event()
    redis = _connect(settings)
    drawn = 0
    try:
        with Live(console=console, auto_refresh=False) as live:
            while refreshes is None or drawn < refreshes:
                sections = await _unless_stopped(collect(settings, redis), stop)
                if sections is None:
                    break
                screen = render(sections, settings)
                if console.is_terminal:
                    live.update(screen, refresh=True)
                else:
                    console.print(screen)
                drawn += 1
                if refreshes is None or drawn < refreshes:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), interval_s)
                    if stop.is_set():
                        break
    finally:
        await redis.aclose()
    return drawn


async def _unless_stopped(
    work: Coroutine[Any, Any, dict[str, list[Row]]], stop: asyncio.Event
) -> dict[str, list[Row]] | None:
    """``work``'s result, or ``None`` (``work`` cancelled) once ``stop`` is set."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    return None

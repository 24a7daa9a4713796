"""Running one benchmark: start the processes, drive the users, collect the numbers."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sluice.bench import report
from sluice.bench.bot import BULK_USERS_ENV
from sluice.bench.drivers import NaiveUsers, SluiceUsers, session_id
from sluice.bench.procs import Proc, free_port, own_peak_rss_mb, peak_rss_mb, wait_http
from sluice.bench.scenarios import Planned, Scenario, plan

DESIGNS = ("sluice", "naive")
BENCH_BOT = "sluice.bench.bot:make_bot"
BENCH_AUTH = "sluice.bench.bot:bench_user"


def base_env() -> dict[str, str]:
    """This process's environment without Sluice, OpenAI, Slack or Discord settings."""
    prefixes = ("SLUICE_", "OPENAI_", "SLACK_", "DISCORD_")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(prefixes) and k not in ("REDIS_URL", "DATABASE_URL")
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Run:
    """The processes of one design, stopped together."""

    def __init__(self, log_dir: Path, started: list[Proc] | None = None) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        # Every process also goes to the caller's list, which stops whatever is left
        # even when an interrupt cuts this run's own clean-up short.
        self._started = started if started is not None else []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        """Start one process."""
        proc = Proc(name, args, env, self.log_dir)
        self.procs.append(proc)
        self._started.append(proc)
        return proc

    def memory(self) -> dict[str, float | None]:
        """Peak memory of every process still running, in MiB."""
        return {p.name: peak_rss_mb(p.pid) for p in self.procs}

    def stop(self) -> None:
        """Stop every process, newest first."""
        for proc in reversed(self.procs):
            proc.stop()


async def _sim(run: Run, sc: Scenario, name: str = "llm-sim", share: int = 1) -> tuple[str, Proc]:
    """One simulator with ``1/share`` of the scenario's provider limits."""
    port = free_port()
    args = [
        "sluice", "llm-sim", "--port", str(port),
        "--first-token-ms", str(sc.first_token_ms),
        "--token-ms", str(sc.token_ms),
        "--tokens", str(sc.tokens),
        "--seed", str(sc.seed),
    ]  # fmt: skip
    if sc.rpm:
        args += ["--rpm", str(max(1, sc.rpm // share))]
    if sc.tpm:
        args += ["--tpm", str(max(1, sc.tpm // share))]
    proc = run.start(name, args, base_env())
    url = f"http://127.0.0.1:{port}"
    await wait_http(f"{url}/healthz", proc)
    return url, proc


async def _get(url: str) -> Any:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.content_type == "application/json":
                return await resp.json()
            return await resp.text()


async def _scrape(urls: list[str]) -> list[report.Sample]:
    texts = []
    for url in urls:
        try:
            texts.append(str(await _get(url)))
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise RuntimeError(f"cannot scrape {url}: {e}") from e
    return report.parse_metrics(texts)


async def redis_calls(redis_url: str) -> int:
    """Commands the Redis server has run since it started (``INFO commandstats``)."""
    redis: Redis = Redis.from_url(redis_url)
    try:
        stats = await redis.info("commandstats")
    finally:
        await redis.aclose()
    return sum(int(v.get("calls", 0)) for v in stats.values() if isinstance(v, dict))


async def used_memory(redis_url: str) -> int:
    """The Redis server's ``used_memory`` in bytes."""
    redis: Redis = Redis.from_url(redis_url)
    try:
        info = await redis.info("memory")
    finally:
        await redis.aclose()
    return int(info["used_memory"])


@contextlib.asynccontextmanager
async def memory_watch(redis_url: str, every_s: float = 0.5) -> AsyncIterator[dict[str, int]]:
    """Redis ``used_memory`` before the run and its peak during it (``before``, ``peak``,
    ``after`` in bytes; on a shared Redis other clients' keys count too)."""
    out = {"before": await used_memory(redis_url)}
    out["peak"] = out["before"]

    async def sample() -> None:
        while True:
            out["peak"] = max(out["peak"], await used_memory(redis_url))
            await asyncio.sleep(every_s)

    task = asyncio.create_task(sample())
    try:
        yield out
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        out["after"] = await used_memory(redis_url)
        out["peak"] = max(out["peak"], out["after"])


async def _drop_prefix(redis_url: str, prefix: str) -> None:
    redis: Redis = Redis.from_url(redis_url)
    try:
        batch: list[Any] = []
        async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await redis.delete(*batch)
                batch = []
        if batch:
            await redis.delete(*batch)
    finally:
        await redis.aclose()


async def _traffic(redis_url: str, prefix: str, rpm: int | None) -> dict[str, Any]:
    """``core.traffic.control.snapshot()`` of one run's keys; quota use is measured against the
    provider's own limit (the scenario's rpm), not the budget's headroom."""
    from core.settings import get_settings
    from core.traffic.control import snapshot

    settings = get_settings().model_copy(
        update={"redis_url": redis_url, "key_prefix": prefix, "llm_rpm": rpm}
    )
    redis: Redis = Redis.from_url(redis_url)
    try:
        return await snapshot(redis, settings)
    finally:
        await redis.aclose()


POOL_COUNTERS = ("calls", "calls_in_backlog", "backlog_ms", "rate_limited", "failures")


def pool_entries(urls: list[str]) -> list[dict[str, Any]]:
    """``SLUICE_PROVIDERS`` for the bench's simulators (limits learned from their headers,
    as the one-provider bench does)."""
    return [
        {
            "name": f"sim{i}",
            "base_url": f"{url}/v1",
            "api_key": "sk-bench",
            "models": ["gpt-4o-mini", "sluice-sim"],
        }
        for i, url in enumerate(urls)
    ]


def pooled_quota_use(stats: list[dict[str, int]], rpm_each: int) -> float | None:
    """The pool's quota use while jobs waited: calls granted while others waited over what
    every provider's own limit allowed while it had a line; ``None`` without a backlog."""
    allowed = sum(rpm_each * st.get("backlog_ms", 0) / 60_000 for st in stats)
    if allowed <= 0:
        return None
    return sum(st.get("calls_in_backlog", 0) for st in stats) / allowed


async def _pool_traffic(redis_url: str, prefix: str, providers: str) -> list[dict[str, Any]]:
    """:func:`core.llm.pool.pool_snapshot` of one run's keys."""
    from core.llm.pool import pool_snapshot
    from core.settings import Settings, parse_providers

    settings = Settings(
        _env_file=None,
        redis_url=redis_url,
        key_prefix=prefix,
        providers=parse_providers(json.loads(providers), ""),
    )
    redis: Redis = Redis.from_url(redis_url)
    try:
        return await pool_snapshot(redis, settings)
    finally:
        await redis.aclose()


@contextlib.asynccontextmanager
async def _kill_later(
    sc: Scenario, sims: list[tuple[str, Proc]], killed: dict[str, Any], console: Console
) -> AsyncIterator[None]:
    """Kill the last simulator ``kill_provider_at_s`` into the run (SIGKILL, as a crash),
    keeping its counters from just before in ``killed``."""
    if sc.kill_provider_at_s is None:
        yield
        return
    url, proc = sims[-1]

    async def kill() -> None:
        await asyncio.sleep(sc.kill_provider_at_s or 0)
        killed[url] = await _get(f"{url}/_sim/stats")
        proc.kill()
        console.print(f"killed {proc.name} at {sc.kill_provider_at_s:.0f} s")

    task = asyncio.create_task(kill())
    try:
        yield
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def _progress(
    console: Console, label: str, users: SluiceUsers | NaiveUsers, total: int
) -> AsyncIterator[None]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=total)

        async def tick() -> None:
            while True:
                p = users.progress
                bar.update(
                    task,
                    completed=p.finished,
                    description=f"{label}: sent {p.sent:,}, replies",
                )
                await asyncio.sleep(0.25)

        ticker = asyncio.create_task(tick())
        try:
            yield
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            p = users.progress
            bar.update(task, completed=p.finished, description=f"{label}: sent {p.sent:,}, replies")


async def run_sluice(
    sc: Scenario,
    schedule: list[Planned],
    *,
    workers: int,
    redis_url: str,
    redis_pid: int | None,
    log_dir: Path,
    console: Console,
    sluice_env: dict[str, str] | None = None,
    started: list[Proc] | None = None,
) -> dict[str, Any]:
    """The whole pipeline: web adapter, arq queue on Redis, worker processes, simulator."""
    run_id = uuid.uuid4().hex[:8]
    prefix = f"bench{run_id}"
    run = Run(log_dir / "sluice", started)
    try:
        sims = [
            await _sim(run, sc, f"llm-sim-{i}" if sc.providers > 1 else "llm-sim", sc.providers)
            for i in range(sc.providers)
        ]
        sim_url = sims[0][0]
        env = {
            **base_env(),
            "REDIS_URL": redis_url,
            "DATABASE_URL": f"sqlite:///{run.log_dir / 'sluice.db'}",
            "OPENAI_API_KEY": "sk-bench",
            "OPENAI_BASE_URL": f"{sim_url}/v1",
            "SLUICE_KEY_PREFIX": prefix,
            "SLUICE_LOG_LEVEL": "WARNING",
            # Lane rules: billing questions high, the heavy users bulk. The bench's
            # sign-in hook names each simulated user, so their ids (web:<name>) are known
            # before their sessions exist.
            "SLUICE_APP": BENCH_BOT,
            "SLUICE_WEB_AUTH": BENCH_AUTH,
            BULK_USERS_ENV: ",".join("web:" + session_id(run_id, u) for u in range(sc.heavy_users)),
            # Every simulated user holds one reply stream (one Redis connection) from
            # this machine's address; a reconnect may hold a second one for a moment.
            "SLUICE_WEB_MAX_STREAMS_PER_IP": str(2 * sc.users + 64),
            "SLUICE_WEB_REDIS_MAX_CONNECTIONS": str(max(512, 2 * sc.users + 80)),
            **(sluice_env or {}),
        }
        if sc.providers > 1:
            env["SLUICE_PROVIDERS"] = json.dumps(pool_entries([url for url, _ in sims]))
        metric_urls = []
        starting = []
        for i in range(workers):
            port = free_port()
            proc = run.start(
                f"worker-{i}", ["sluice", "worker"], {**env, "SLUICE_METRICS_PORT": str(port)}
            )
            starting.append(wait_http(f"http://127.0.0.1:{port}/healthz", proc, timeout_s=60))
            metric_urls.append(f"http://127.0.0.1:{port}/metrics")
        web_port = free_port()
        web = run.start("web", ["sluice", "web", "--port", str(web_port)], env)
        base = f"http://127.0.0.1:{web_port}"
        starting.append(wait_http(f"{base}/healthz", web, timeout_s=60))
        await asyncio.gather(*starting)
        metric_urls.append(f"{base}/metrics")

        deadline = max(p.at_s for p in schedule) + sc.drain_timeout_s
        users = SluiceUsers(base, schedule, run_id, deadline)
        calls_before = await redis_calls(redis_url)
        killed: dict[str, Any] = {}
        async with (
            memory_watch(redis_url) as redis_memory,
            _progress(console, "sluice", users, len(schedule)),
            _kill_later(sc, sims, killed, console),
        ):
            obs = await users.run()
        calls = await redis_calls(redis_url) - calls_before
        traffic = await _traffic(redis_url, prefix, sc.rpm)
        samples = await _scrape(metric_urls)
        per_sim = [
            killed[url] if url in killed else await _get(f"{url}/_sim/stats") for url, _ in sims
        ]
        sim_stats = {k: sum(int(st.get(k, 0)) for st in per_sim) for k in per_sim[0]}
        mem = run.memory()
        memory: dict[str, float | None] = {"web adapter": mem.get("web")}
        worker_mem = [v for k, v in mem.items() if k.startswith("worker-") and v is not None]
        if worker_mem:
            memory[f"worker (max of {len(worker_mem)})"] = max(worker_mem)
        if redis_pid is not None:
            memory["redis"] = peak_rss_mb(redis_pid)
        summary = report.summarize(
            obs,
            samples=samples,
            platform="web",
            sim_stats=sim_stats,
            memory_mb=memory,
            workers=workers,
        )
        # Every client of this Redis counts, including the idle polling of workers and
        # SSE streams: exact on the embedded Valkey, an upper bound on a shared Redis.
        summary["traffic"] = traffic
        summary["quota_use_in_backlog"] = traffic["quota_use_in_backlog"]
        if sc.providers > 1:
            pool = await _pool_traffic(redis_url, prefix, env["SLUICE_PROVIDERS"])
            share = (sc.rpm or 0) // sc.providers
            summary["providers"] = {
                p["provider"]: {
                    "completions": int(st.get("completions", 0)),
                    "killed": url in killed,
                    **{k: p["stats"].get(k, 0) for k in POOL_COUNTERS},
                }
                for p, st, (url, _) in zip(pool, per_sim, sims, strict=True)
            }
            summary["quota_use_in_backlog"] = pooled_quota_use([p["stats"] for p in pool], share)
        summary["redis_commands"] = calls
        summary["redis_used_memory"] = redis_memory
        summary["redis_memory_growth_mb"] = (redis_memory["peak"] - redis_memory["before"]) / 2**20
        summary["redis_commands_per_message"] = calls / max(1, summary["sent"])
        return summary
    finally:
        run.stop()
        with contextlib.suppress(RedisError, OSError):
            await _drop_prefix(redis_url, prefix)


async def run_naive(
    sc: Scenario,
    schedule: list[Planned],
    *,
    log_dir: Path,
    console: Console,
    started: list[Proc] | None = None,
) -> dict[str, Any]:
    """The naive server: LLM in the handler, one commit per message, no cache, no limits."""
    run = Run(log_dir / "naive", started)
    try:
        sim_url, _ = await _sim(run, sc)
        port = free_port()
        server = run.start(
            "naive-server",
            [
                "sluice.bench.naive",
                "--port", str(port),
                "--llm-url", f"{sim_url}/v1",
                "--db", str(run.log_dir / "naive.db"),
            ],
            base_env(),
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        await wait_http(f"{base}/healthz", server)
        deadline = max(p.at_s for p in schedule) + sc.drain_timeout_s
        users = NaiveUsers(base, schedule, uuid.uuid4().hex[:8], deadline)
        async with _progress(console, "naive ", users, len(schedule)):
            obs = await users.run()
        samples = await _scrape([f"{base}/metrics"])
        sim_stats = await _get(f"{sim_url}/_sim/stats")
        return report.summarize(
            obs,
            samples=samples,
            platform="naive",
            sim_stats=sim_stats,
            memory_mb={"server": run.memory().get("naive-server")},
            workers=1,
        )
    finally:
        run.stop()


async def run_bench(
    sc: Scenario,
    *,
    workers: int,
    designs: tuple[str, ...],
    redis_url: str,
    redis_pid: int | None,
    out_dir: Path,
    command: str,
    console: Console,
    sluice_env: dict[str, str] | None = None,
    started: list[Proc] | None = None,
) -> dict[str, Any]:
    """Both designs, one after the other, under the same schedule; the report dict."""
    schedule = plan(sc)
    started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    results: dict[str, Any] = {}
    log_dir = out_dir / "logs"
    for design in designs:
        if design == "sluice":
            results[design] = await run_sluice(
                sc,
                schedule,
                workers=workers,
                redis_url=redis_url,
                redis_pid=redis_pid,
                log_dir=log_dir,
                console=console,
                sluice_env=sluice_env,
                started=started,
            )
        else:
            results[design] = await run_naive(
                sc, schedule, log_dir=log_dir, console=console, started=started
            )
    return {
        "scenario": sc.as_dict(),
        "command": command,
        "started_at": started_at,
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "sluice_settings": sluice_env or {},
        "bench_process_peak_mb": own_peak_rss_mb(),
        "designs": results,
        "consistent": {name: report.consistent(s) for name, s in results.items()},
    }


async def run_flush(redis_url: str, postgres_url: str | None, messages: int) -> Any:
    """The history flush benchmark (:func:`sluice.bench.flush.bench_flush`)."""
    from sluice.bench.flush import bench_flush

    return await bench_flush(redis_url, postgres_url=postgres_url, n=messages)

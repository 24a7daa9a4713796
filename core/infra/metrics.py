"""Prometheus metrics of every Sluice process, and the small server that exposes them.

Every process keeps its own metrics in prometheus-client's default registry.
Adapters mount ``GET /metrics`` on their own aiohttp app with :func:`metrics_routes`;
workers (and anything without an HTTP server) run :func:`start_metrics_server` on
``SLUICE_METRICS_PORT``, which also answers ``GET /healthz``.

The metric objects below are the contract: other modules import them and call
``.labels(...).inc()`` / ``.observe()`` / ``.set()``. Names as scraped:

=================================  =========  ==============  ===============================
name                               type       labels          recorded by
=================================  =========  ==============  ===============================
sluice_ack_seconds                 histogram  platform        adapters, per accepted event
sluice_queue_depth                 gauge      lane            refreshed at scrape time
sluice_queue_oldest_wait_seconds   gauge      lane            refreshed at scrape time
sluice_queue_wait_seconds          histogram  lane            reply job, when it starts
sluice_job_seconds                 histogram  platform, kind  reply job, when it ends
sluice_job_overhead_seconds        histogram  platform        reply job: queue wait + time
                                                              outside model calls (tool
                                                              runs and delivery included)
sluice_delivery_seconds            histogram  platform        time in responder calls
sluice_delivery_errors_total       counter    platform        reply job / responders
sluice_delivery_given_up_total     counter    platform        delivery: retries ran out
sluice_replies_total               counter    platform, kind  reply job (answer|notice|error)
sluice_llm_seconds                 histogram  outcome         every LLM call attempt
sluice_llm_first_token_seconds     histogram  -               successful LLM calls
sluice_llm_calls_total             counter    outcome         ok | rate_limited | error
sluice_llm_rate_limited_total      counter    -               provider 429 answers
sluice_llm_tokens_total            counter    direction       in | out
sluice_llm_budget_waits_total      counter    -               core.llm.budget, jobs in line
sluice_llm_budget_rpm_limit        gauge      -               workers: SLUICE_LLM_RPM (0: none)
sluice_llm_budget_tpm_limit        gauge      -               workers: SLUICE_LLM_TPM (0: none)
sluice_llm_breaker_open_seconds    gauge      -               workers, at scrape time: until
                                                              the breaker closes (0: closed)
sluice_llm_provider_calls_total    counter    provider,       core.llm.pool: each attempt on a
                                              outcome         pool provider (ok|rate_limited|error)
sluice_llm_provider_failovers_total counter   provider        core.llm.pool: a job left it for
                                                              the next provider or model
sluice_llm_provider_breaker_open_seconds gauge provider       workers, at scrape time (pool)
sluice_cache_hits_total            counter    -               core.traffic.cache
sluice_cache_misses_total          counter    -               core.traffic.cache
sluice_rate_limit_notices_total    counter    scope           core.traffic.ratelimit
sluice_history_backlog             gauge      -               workers, at scrape time, from
sluice_history_flush_lag_seconds   gauge      -               core.history.hot.backlog_status
sluice_history_flush_seconds       histogram  -               history flush
sluice_history_flushed_rows_total  counter    -               history flush
sluice_db_transactions_total       counter    -               anything that commits to SQL
=================================  =========  ==============  ===============================

Gauges that describe shared state (queue depth, history backlog) are computed when
scraped: register an async refresher with :func:`add_refresher`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.framework.routing import LANES
from core.infra.serializer import deserialize
from core.settings import Settings
from core.traffic.lanes import lane_queue_name

logger = logging.getLogger(__name__)

PLATFORMS = ("web", "slack", "discord")
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
)

ACK_SECONDS = Histogram(
    "sluice_ack_seconds",
    "Time from receiving a platform event to acknowledging it.",
    ["platform"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge("sluice_queue_depth", "Reply jobs queued or running, per lane.", ["lane"])
QUEUE_OLDEST_WAIT = Gauge(
    "sluice_queue_oldest_wait_seconds",
    "How long the oldest job not yet started has waited, per lane.",
    ["lane"],
)
QUEUE_WAIT_SECONDS = Histogram(
    "sluice_queue_wait_seconds",
    "Time a reply job waited in the queue before a worker started it.",
    ["lane"],
    buckets=LATENCY_BUCKETS,
)
JOB_SECONDS = Histogram(
    "sluice_job_seconds",
    "Duration of reply jobs, by platform and reply kind.",
    ["platform", "kind"],
    buckets=LATENCY_BUCKETS,
)
JOB_OVERHEAD_SECONDS = Histogram(
    "sluice_job_overhead_seconds",
    "Framework time of one reply: queue wait plus job time outside the model call.",
    ["platform"],
    buckets=LATENCY_BUCKETS,
)
DELIVERY_SECONDS = Histogram(
    "sluice_delivery_seconds",
    "Time spent in responder calls (begin, stream, finish) for one reply.",
    ["platform"],
    buckets=LATENCY_BUCKETS,
)
DELIVERY_ERRORS = Counter(
    "sluice_delivery_errors", "Replies that could not be delivered.", ["platform"]
)
DELIVERY_GIVEN_UP = Counter(
    "sluice_delivery_given_up",
    "Replies the platform never took after every delivery attempt (kept in history).",
    ["platform"],
)
REPLIES = Counter("sluice_replies", "Replies sent, by kind.", ["platform", "kind"])
LLM_SECONDS = Histogram(
    "sluice_llm_seconds",
    "Duration of one LLM call attempt, by outcome.",
    ["outcome"],
    buckets=LATENCY_BUCKETS,
)
LLM_FIRST_TOKEN_SECONDS = Histogram(
    "sluice_llm_first_token_seconds",
    "Time to the first streamed token of successful LLM calls.",
    buckets=LATENCY_BUCKETS,
)
LLM_CALLS = Counter("sluice_llm_calls", "LLM call attempts, by outcome.", ["outcome"])
LLM_RATE_LIMITED = Counter("sluice_llm_rate_limited", "Provider 429 (rate limit) answers.")
LLM_TOKENS = Counter(
    "sluice_llm_tokens", "Tokens used, prompt (in) and completion (out).", ["direction"]
)
LLM_BUDGET_WAITS = Counter(
    "sluice_llm_budget_waits", "Calls that waited for the shared LLM budget."
)
LLM_BUDGET_RPM_LIMIT = Gauge(
    "sluice_llm_budget_rpm_limit", "The shared LLM budget's requests per minute (0: no limit)."
)
LLM_BUDGET_TPM_LIMIT = Gauge(
    "sluice_llm_budget_tpm_limit", "The shared LLM budget's tokens per minute (0: no limit)."
)
LLM_BREAKER_OPEN_SECONDS = Gauge(
    "sluice_llm_breaker_open_seconds", "Seconds until the LLM circuit breaker closes (0: closed)."
)
LLM_PROVIDER_CALLS = Counter(
    "sluice_llm_provider_calls",
    "LLM call attempts on each provider of the pool, by outcome.",
    ["provider", "outcome"],
)
LLM_PROVIDER_FAILOVERS = Counter(
    "sluice_llm_provider_failovers",
    "Jobs that left a provider of the pool for the next provider or the fallback model.",
    ["provider"],
)
LLM_PROVIDER_BREAKER_OPEN_SECONDS = Gauge(
    "sluice_llm_provider_breaker_open_seconds",
    "Seconds until a pool provider's circuit breaker closes (0: closed).",
    ["provider"],
)
CACHE_HITS = Counter("sluice_cache_hits", "Answers served from the response cache.")
CACHE_MISSES = Counter("sluice_cache_misses", "Cache lookups that found nothing.")
RATE_LIMIT_NOTICES = Counter(
    "sluice_rate_limit_notices", "Rate-limit notices sent instead of answers.", ["scope"]
)
DOOR_REFUSALS = Counter(
    "sluice_door_refusals",
    "Messages refused at the door (adapters), by reason: busy (SLUICE_MAX_WAIT_S or "
    "SLUICE_MAX_QUEUED) or limit.",
    ["reason"],
)
HISTORY_BACKLOG = Gauge("sluice_history_backlog", "Turns in Redis not yet written to SQL.")
HISTORY_FLUSH_LAG = Gauge(
    "sluice_history_flush_lag_seconds", "Age of the oldest turn not yet written to SQL."
)
HISTORY_FLUSH_SECONDS = Histogram(
    "sluice_history_flush_seconds", "Duration of one history flush batch.", buckets=LATENCY_BUCKETS
)
HISTORY_FLUSHED_ROWS = Counter("sluice_history_flushed_rows", "Turns written to SQL.")
DB_TRANSACTIONS = Counter("sluice_db_transactions", "SQL transactions committed.")

# Label sets that exist from the start, so a scrape shows zeros rather than nothing.
for _p in PLATFORMS:
    DELIVERY_ERRORS.labels(_p)
    DELIVERY_GIVEN_UP.labels(_p)
for _o in ("ok", "rate_limited", "error"):
    LLM_CALLS.labels(_o)
for _d in ("in", "out"):
    LLM_TOKENS.labels(_d)
RATE_LIMIT_NOTICES.labels("user")
for _r in ("busy", "limit"):
    DOOR_REFUSALS.labels(_r)

Refresher = Callable[[], Awaitable[None]]
_refreshers: list[Refresher] = []


def add_refresher(refresher: Refresher) -> None:
    """Run ``refresher`` before every scrape (to set gauges of shared state)."""
    if refresher not in _refreshers:
        _refreshers.append(refresher)


def remove_refresher(refresher: Refresher) -> None:
    """Stop calling a refresher added with :func:`add_refresher`."""
    if refresher in _refreshers:
        _refreshers.remove(refresher)


async def _refresh() -> None:
    for refresher in list(_refreshers):
        try:
            await asyncio.wait_for(refresher(), timeout=2.0)
        except (RedisError, OSError, TimeoutError) as e:
            # A scrape must still answer when Redis is down; the gauges keep old values.
            logger.warning("metrics refresher %s failed: %s", refresher, e)


async def exposition() -> bytes:
    """The text exposition of this process's metrics, gauges refreshed first."""
    await _refresh()
    return generate_latest()


async def metrics_handler(request: web.Request) -> web.Response:
    """``GET /metrics``."""
    body = await exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_routes(
    app: web.Application, *, redis: Redis | None = None, settings: Settings | None = None
) -> None:
    """Mount ``GET /metrics`` on an adapter's aiohttp app.

    With ``redis`` and ``settings`` the queue gauges are refreshed at each scrape too,
    so the queue depth is known while no worker runs (an autoscaler starting from zero).
    """
    app.router.add_get("/metrics", metrics_handler)
    if redis is None or settings is None:
        return
    refresher = queue_refresher(redis, settings)

    async def refreshing(app: web.Application) -> AsyncIterator[None]:
        add_refresher(refresher)
        yield
        remove_refresher(refresher)

    app.cleanup_ctx.append(refreshing)


# --------------------------------------------------------------------------- queue gauges


@dataclass
class LaneStats:
    """Jobs of one lane in the queue(s)."""

    waiting: int = 0
    running: int = 0
    oldest_wait_s: float = 0.0

    @property
    def depth(self) -> int:
        """Queued or running."""
        return self.waiting + self.running


def queue_names(settings: Settings) -> list[str]:
    """The arq queues reply jobs go to: one, or one per lane (``SLUICE_LANE_QUEUES=per-lane``)."""
    names = [settings.queue_name]
    if settings.lane_queues == "per-lane":
        names += [lane_queue_name(settings, lane) for lane in LANES]
    return list(dict.fromkeys(names))


ARQ_JOB_PREFIX = "arq:job:"
ARQ_IN_PROGRESS_PREFIX = "arq:in-progress:"
_SAMPLE = 1000


async def lane_snapshot(redis: Redis, queues: list[str]) -> dict[str, LaneStats]:
    """Waiting and running jobs and the oldest wait, per lane, from the jobs themselves.

    A job's lane and enqueue time come from its payload, so this is right whatever
    score a lane's jobs are queued with. arq keeps a job in its queue until it ends,
    so running jobs are told apart by arq's in-progress key; jobs deferred to a later
    time and jobs other than ``reply`` (the history flush) are left out. The first
    1,000 jobs of each queue are read; beyond that, jobs count as waiting in lane ``?``.
    """
    out: dict[str, LaneStats] = {"default": LaneStats()}
    now_ms = time.time() * 1000
    for queue in queues:
        depth = int(await redis.zcard(queue))
        if depth == 0:
            continue
        members: list[Any] = await redis.zrange(queue, 0, _SAMPLE - 1, withscores=True)
        ids = [m.decode() if isinstance(m, bytes) else str(m) for m, _score in members]
        scores = [float(score) for _m, score in members]
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(ARQ_IN_PROGRESS_PREFIX + job_id)
                pipe.get(ARQ_JOB_PREFIX + job_id)
            found = await pipe.execute()
        for i in range(len(ids)):
            running, raw = found[2 * i], found[2 * i + 1]
            if not running and scores[i] > now_ms:
                continue  # deferred to a later time (a cron job, a delayed retry)
            lane, enqueued_ms = "default", now_ms
            if raw:
                try:
                    job = deserialize(raw)
                    if job.get("f") != "reply":
                        continue  # the history flush and other housekeeping jobs
                    payload = job["a"][0] if job.get("a") else {}
                    lane = str(payload.get("lane", "default"))
                    enqueued_ms = float(job.get("et", now_ms))
                except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                    lane = "?"
            stats = out.setdefault(lane, LaneStats())
            if running:
                stats.running += 1
            else:
                stats.waiting += 1
                stats.oldest_wait_s = max(stats.oldest_wait_s, (now_ms - enqueued_ms) / 1000)
        if depth > len(ids):
            out.setdefault("?", LaneStats()).waiting += depth - len(ids)
    return out


def queue_refresher(redis: Redis, settings: Settings) -> Refresher:
    """A refresher that sets the queue gauges of every lane from Redis."""

    async def refresh() -> None:
        lanes = await lane_snapshot(redis, queue_names(settings))
        for lane in set(lanes) | {"default"}:
            stats = lanes.get(lane, LaneStats())
            QUEUE_DEPTH.labels(lane).set(stats.depth)
            QUEUE_OLDEST_WAIT.labels(lane).set(stats.oldest_wait_s)

    return refresh


# --------------------------------------------------------------------------- job timing


class JobTiming:
    """Times one reply job: queue wait, delivery, the model, and what is left over.

    Overhead is what the framework adds to the model's own time: queue wait plus
    the job's time outside LLM calls (delivery inside the stream is framework time).
    """

    def __init__(self, platform: str, lane: str, enqueue_time: dt.datetime | None) -> None:
        self.platform = platform
        self.lane = lane
        self.started = time.monotonic()
        self.queue_wait_s = 0.0
        if enqueue_time is not None:
            self.queue_wait_s = max(0.0, (dt.datetime.now(dt.UTC) - enqueue_time).total_seconds())
        QUEUE_WAIT_SECONDS.labels(lane).observe(self.queue_wait_s)
        self.delivery_s = 0.0
        self.llm_s = 0.0
        self._delivery_in_llm_s = 0.0
        self._in_llm = False

    @asynccontextmanager
    async def delivering(self) -> AsyncIterator[None]:
        """Wrap a responder call."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            spent = time.monotonic() - t0
            self.delivery_s += spent
            if self._in_llm:
                self._delivery_in_llm_s += spent

    @asynccontextmanager
    async def calling_llm(self) -> AsyncIterator[None]:
        """Wrap the model call (with its retries)."""
        t0 = time.monotonic()
        self._in_llm = True
        try:
            yield
        finally:
            self._in_llm = False
            self.llm_s += time.monotonic() - t0

    @property
    def model_s(self) -> float:
        """Time spent waiting on the model, delivery during the stream excluded."""
        return max(0.0, self.llm_s - self._delivery_in_llm_s)

    def done(self, kind: str) -> float:
        """Record the job's metrics; returns its overhead in seconds."""
        total = time.monotonic() - self.started
        overhead = self.queue_wait_s + max(0.0, total - self.model_s)
        JOB_SECONDS.labels(self.platform, kind).observe(total)
        JOB_OVERHEAD_SECONDS.labels(self.platform).observe(overhead)
        DELIVERY_SECONDS.labels(self.platform).observe(self.delivery_s)
        REPLIES.labels(self.platform, kind).inc()
        return overhead


def record_llm_call(
    outcome: str,
    duration_s: float,
    *,
    first_token_s: float | None = None,
    tokens_in: int = 0,
    tokens_out: int = 0,
) -> None:
    """Record one LLM call attempt (``outcome``: ok | rate_limited | error)."""
    LLM_CALLS.labels(outcome).inc()
    LLM_SECONDS.labels(outcome).observe(duration_s)
    if outcome == "rate_limited":
        LLM_RATE_LIMITED.inc()
    if first_token_s is not None:
        LLM_FIRST_TOKEN_SECONDS.observe(first_token_s)
    if tokens_in:
        LLM_TOKENS.labels("in").inc(tokens_in)
    if tokens_out:
        LLM_TOKENS.labels("out").inc(tokens_out)


# --------------------------------------------------------------------------- server


HealthCheck = Callable[[], Awaitable[dict[str, Any]]]


def process_ident() -> str:
    """``host:pid`` of this process (names it in heartbeats and logs)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def create_metrics_app(health: HealthCheck | None = None) -> web.Application:
    """An app with ``GET /metrics`` and ``GET /healthz`` (``health`` raises or returns)."""

    async def healthz(request: web.Request) -> web.Response:
        if health is None:
            return web.json_response({"ok": True})
        try:
            detail = await asyncio.wait_for(health(), timeout=2.0)
        except (RedisError, OSError, TimeoutError) as e:
            return web.json_response({"ok": False, "error": str(e)}, status=503)
        ok = bool(detail.get("ok", True))
        return web.json_response(detail, status=200 if ok else 503)

    app = web.Application()
    metrics_routes(app)
    app.router.add_get("/healthz", healthz)
    return app


async def start_metrics_server(
    port: int, *, host: str = "127.0.0.1", health: HealthCheck | None = None
) -> tuple[web.AppRunner, int]:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port`` (0: a free port).

    Returns the runner (stop it with ``await runner.cleanup()``) and the bound port.
    """
    runner = web.AppRunner(create_metrics_app(health), access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = int(runner.addresses[0][1])
    logger.info("metrics on http://%s:%d/metrics", host, bound)
    return runner, bound

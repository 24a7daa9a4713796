"""arq worker settings: the ``reply`` job, shared clients in ``ctx``.

``sluice worker`` builds a worker from :func:`worker_settings`;
``workers.worker.WorkerSettings`` is the same thing for arq's own CLI.

Tuning, and why:

- ``max_jobs`` (``SLUICE_WORKER_MAX_JOBS``, default 100): a reply job spends nearly all
  its time waiting on the model and the platform, so one process can hold many at
  once; the shared LLM budget, not this number, limits calls to the provider.
- ``poll_delay`` (``SLUICE_WORKER_POLL_DELAY_S``, default 0.05 s): arq polls the
  queue when idle; 50 ms keeps queue wait far below the model's own latency at the
  cost of ~20 cheap Redis calls a second per idle worker.
- ``max_tries`` and ``job_timeout``: a job whose worker died is picked up again when
  its in-progress marker expires; responders are idempotent per job id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.cron import cron
from arq.utils import timestamp_ms
from arq.worker import Worker, func
from redis.exceptions import RedisError

from core.errors import ConfigError
from core.framework.bot import load_bot
from core.history.admin import finish_purged_job
from core.history.feedback import FEEDBACK_JOB
from core.history.hot import HotHistory, backlog_status
from core.history.store import ensure_schema_at_startup, make_engine
from core.infra import metrics
from core.infra.heartbeat import heartbeating
from core.infra.redis import Keys, connect_pool, redis_settings
from core.infra.scripts import Lua
from core.infra.serializer import deserialize, serialize
from core.llm.budget import LLMBudget
from core.llm.client import OpenAIProvider
from core.llm.pool import ProviderPool, pool_budgets
from core.responder import ResponderFactory
from core.settings import Settings
from core.traffic.choices import Choices
from core.traffic.control import BUSY_MAX_TRIES, Traffic
from core.traffic.lanes import lane_queue_name
from core.traffic.queue import reply_queues
from core.traffic.schedule import (
    BAND_SHIFT_MS,
    IN_TIME_BAND_MS,
    LATE_BAND_MS,
    SWEEP_BATCH,
    deadlines_key,
)
from core.traffic.wake import wake_workers
from workers import feedback, flush, jobs, notices, traffic_jobs
from workers.flush import Flusher
from workers.poll import START_DUE_LUA, BlockingPoll, running_key
from workers.reaper import (
    JOBS_TTL_S,
    OrphanSweep,
    hand_back_own,
    reaper_loop,
    track_finished,
)

logger = logging.getLogger(__name__)


def make_startup(settings: Settings, llm_base_url: str | None = None) -> Any:
    """An ``on_startup`` that creates the clients every job shares."""

    async def on_startup(ctx: dict[str, Any]) -> None:
        if (
            settings.slack_client_id
            and settings.slack_client_secret
            and not settings.encryption_key
        ):
            # Multi-workspace Slack: workers read each workspace's token, stored encrypted.
            raise ConfigError(
                "SLUICE_ENCRYPTION_KEY is not set: multi-workspace Slack (SLACK_CLIENT_ID and "
                "SLACK_CLIENT_SECRET) stores bot tokens encrypted, and workers need the same "
                "key as `sluice slack` to read them (`sluice slack genkey` makes one)."
            )
        ctx["settings"] = settings
        ctx["bot"] = load_bot(settings.app)
        await ctx["bot"].start_mcp()
        ctx["keys"] = Keys(settings.key_prefix)
        ctx["db"] = make_engine(settings)
        await ensure_schema_at_startup(settings, ctx["db"])
        redis = ctx["redis"]

        async def flush_soon() -> None:
            # One early flush per second at most, whatever the number of workers.
            await redis.enqueue_job(
                "flush_history", _job_id=f"flush_history:soon:{int(time.time())}"
            )

        ctx["history"] = HotHistory(
            ctx["redis"],
            ctx["keys"],
            max_turns=settings.history_max_turns,
            ttl_s=settings.history_ttl_s,
            backlog_max=settings.history_backlog_max,
            compress_min_bytes=settings.history_compress_min_bytes,
            engine=ctx["db"] if settings.history_sql_fallback else None,
            flush_threshold=settings.history_flush_threshold,
            on_threshold=flush_soon,
        )
        ctx["flusher"] = Flusher(ctx["redis"], settings, ctx["db"])
        ctx["llm"] = OpenAIProvider(settings, base_url=llm_base_url)
        ctx["pool"] = ProviderPool.from_settings(
            ctx["redis"], ctx["keys"], settings, default_base_url=llm_base_url
        )
        ctx["traffic"] = Traffic(ctx["redis"], settings, ctx["bot"], pool=ctx["pool"])
        ctx["choices"] = Choices(
            ctx["redis"],
            ctx["keys"],
            settings.allowed_models,
            ctx["bot"].model or settings.model,
        )
        ctx["responders"] = {}
        ctx["responders_lock"] = asyncio.Lock()
        await start_ops(ctx, settings)
        await notices.start_notice_worker(settings, ctx)
        logger.info(
            "worker ready: bot=%s model=%s", ctx["bot"].name, ctx["bot"].model or settings.model
        )

    return on_startup


async def on_shutdown(ctx: dict[str, Any]) -> None:
    """Close what :func:`make_startup` opened."""
    await notices.stop_notice_worker(ctx)
    factories: dict[str, ResponderFactory] = ctx.get("responders", {})
    for factory in factories.values():
        await factory.close()
    if "llm" in ctx:
        await ctx["llm"].close()
    if ctx.get("pool") is not None:
        await ctx["pool"].close()
    if "bot" in ctx:
        await ctx["bot"].stop_mcp()
    await stop_ops(ctx)
    if "db" in ctx:
        await ctx["db"].dispose()


async def start_ops(ctx: dict[str, Any], settings: Settings) -> None:
    """Heartbeat, queue gauges and (with ``SLUICE_METRICS_PORT``) the metrics server."""
    redis = ctx["redis"]
    keys: Keys = ctx["keys"]
    stack = contextlib.AsyncExitStack()
    ctx["ops_stack"] = stack
    # Jobs this worker claimed (SluiceWorker.start_due; a worker without a heartbeat
    # member claims nothing, and then no job checks its ownership).
    ctx["claimed_jobs"] = set()
    ctx["superseded_jobs"] = set()
    ctx["answered_jobs"] = set()
    member = await stack.enter_async_context(
        heartbeating(redis, keys, "worker", settings.health_check_interval_s)
    )
    # Before the first poll: jobs this process ran before it lost Redis go back now.
    running = [running_key(q) for q in {worker_queue(settings), *reply_queues(settings)}]
    await hand_back_own(redis, keys, member, running)
    ctx["worker_member"] = member
    reaper = asyncio.create_task(
        reaper_loop(
            redis,
            keys,
            # A live worker beats every interval: never take one missed beat for death.
            max(settings.worker_dead_after_s, 3 * settings.health_check_interval_s),
            settings.health_check_interval_s,
            running,
            OrphanSweep(redis, keys, member, ctx["claimed_jobs"], running),
        )
    )

    async def stop_reaper() -> None:
        reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaper

    stack.push_async_callback(stop_reaper)
    for refresher in (
        metrics.queue_refresher(redis, settings),
        _history_refresher(redis, keys, settings),
        _budget_refresher(redis, keys, settings),
    ):
        metrics.add_refresher(refresher)
        stack.callback(metrics.remove_refresher, refresher)
    if settings.metrics_port is not None:

        async def health() -> dict[str, Any]:
            await redis.ping()
            return {"ok": True, "role": "worker"}

        runner, port = await metrics.start_metrics_server(
            settings.metrics_port, host=settings.metrics_host, health=health
        )
        stack.push_async_callback(runner.cleanup)
        ctx["metrics_port"] = port


def _history_refresher(redis: Any, keys: Keys, settings: Settings) -> metrics.Refresher:
    """Backlog and flush lag gauges from the write-behind history, where it exists."""

    async def refresh() -> None:
        st = await backlog_status(redis, keys, settings.history_backlog_max)
        metrics.HISTORY_BACKLOG.set(st.length)
        metrics.HISTORY_FLUSH_LAG.set(st.oldest_age_s)

    return refresh


def _budget_refresher(redis: Any, keys: Keys, settings: Settings) -> metrics.Refresher:
    """The shared LLM budget's limits and the breaker, for alerts and the autoscaler."""
    budget = LLMBudget(redis, keys, settings)

    async def refresh() -> None:
        metrics.LLM_BUDGET_RPM_LIMIT.set(settings.llm_rpm or 0)
        metrics.LLM_BUDGET_TPM_LIMIT.set(settings.llm_tpm or 0)
        metrics.LLM_BREAKER_OPEN_SECONDS.set(await budget.breaker_open_for())
        # Each provider of the pool (SLUICE_PROVIDERS): its breaker, by name.
        for b in await pool_budgets(redis, keys, settings):
            if b.model is None:
                metrics.LLM_PROVIDER_BREAKER_OPEN_SECONDS.labels(b.provider).set(
                    await b.budget.breaker_open_for()
                )

    return refresh


async def stop_ops(ctx: dict[str, Any]) -> None:
    """Undo :func:`start_ops`."""
    stack: contextlib.AsyncExitStack | None = ctx.get("ops_stack")
    if stack is not None:
        await stack.aclose()


def _cron_times(interval_s: int) -> dict[str, Any]:
    """arq ``cron`` arguments for "every ``interval_s`` seconds" (rounded to fit an hour)."""
    if interval_s < 60:
        step = max(d for d in range(1, interval_s + 1) if 60 % d == 0)
        return {"second": set(range(0, 60, step))}
    minutes = max(1, min(60, interval_s // 60))
    step = max(d for d in range(1, minutes + 1) if 60 % d == 0)
    return {"minute": set(range(0, 60, step)), "second": 0}


def worker_queue(settings: Settings) -> str:
    """The queue this worker serves: the one queue, or its lane's with per-lane queues."""
    if settings.lane_queues != "per-lane":
        return settings.queue_name
    if len(settings.worker_lanes) != 1:
        raise ConfigError(
            "SLUICE_LANE_QUEUES=per-lane: an arq worker listens to one queue, so run one "
            "worker per lane, e.g. SLUICE_WORKER_LANES='[\"high\"]' for the high lane."
        )
    return lane_queue_name(settings, settings.worker_lanes[0])


def worker_settings(settings: Settings, *, llm_base_url: str | None = None) -> dict[str, Any]:
    """Keyword arguments for :class:`arq.worker.Worker`.

    Raises:
        BotDefinitionError: ``SLUICE_APP`` does not load; raised here so that a
            mistake in the bot stops the worker at start-up with its message.
    """
    load_bot(settings.app)
    return {
        "functions": [
            func(
                jobs.reply,
                name="reply",
                timeout=settings.job_timeout_s,
                # Busy conversations re-defer jobs (an arq try each); Sluice counts real
                # re-runs itself against SLUICE_JOB_MAX_TRIES (core.traffic.control).
                max_tries=BUSY_MAX_TRIES,
            ),
            # Served on the reserved queue (workers.notices); here for notices queued
            # by an older version on the reply queue.
            func(
                traffic_jobs.notify_queued,
                name="notify_queued",
                timeout=min(10, settings.job_timeout_s),
                max_tries=1,
            ),
            # History jobs time out with the reply job: arq keeps a killed worker's
            # job "in progress" for the longest timeout of ALL functions + 10 s, so a
            # longer timeout here would delay re-running a killed reply job.
            func(
                feedback.feedback,
                name=FEEDBACK_JOB,
                timeout=min(30, settings.job_timeout_s),
                max_tries=feedback.MAX_TRIES,
            ),
            func(
                flush.flush_history,
                name="flush_history",
                timeout=settings.job_timeout_s,
                max_tries=1,
            ),
        ],
        "cron_jobs": [
            cron(
                flush.flush_history,
                name="cron:flush_history",
                timeout=settings.job_timeout_s,
                max_tries=1,
                run_at_startup=True,
                **_cron_times(settings.history_flush_interval_s),
            ),
            cron(
                flush.apply_retention,
                name="cron:apply_retention",
                minute=17,
                second=0,
                timeout=settings.job_timeout_s,
                max_tries=1,
            ),
        ],
        "queue_name": worker_queue(settings),
        "redis_settings": redis_settings(settings),
        "on_startup": make_startup(settings, llm_base_url),
        "on_shutdown": on_shutdown,
        "max_jobs": settings.worker_max_jobs,
        "poll_delay": settings.worker_poll_delay_s,
        "idle_block_s": settings.worker_idle_block_s,
        "job_timeout": settings.job_timeout_s,
        "max_tries": settings.job_max_tries,
        # A short, fixed result lifetime: results are not read, but while one exists
        # arq refuses a second job with the same id.
        "keep_result": 3600,
        "health_check_interval": settings.health_check_interval_s,
        "handle_signals": True,
        "job_serializer": serialize,
        "job_deserializer": deserialize,
    }


# Share of a worker's slots that late reply jobs never take, so that a new message
# that can still be answered in time finds a slot at once (a flooder's late messages
# wait for their conversation in their slots).
IN_TIME_RESERVE = 0.2

# How far down the queue a poll looks past running jobs (they stay in arq's queue
# until they end, at the head when the queue is long).
SCAN_LIMIT = 20_000


class SluiceWorker(BlockingPoll):
    """An arq worker that starts the best-scored jobs that are not running yet, as many
    as it has free slots, and blocks while idle (:mod:`workers.poll`).

    arq reads up to ``queue_read_limit`` job ids by score and then checks each with a
    WATCH transaction, waiting for a slot for each in turn. Running jobs stay in the
    queue until they end, and under a backlog they are the best-scored ids, so that
    read is mostly running jobs: four round trips each per poll, and with more jobs
    running than ``queue_read_limit`` no queued job is seen at all. Instead one Lua
    call per poll (:data:`workers.poll.START_DUE_LUA`) starts the first due ids that
    are not running, only as many as fit (so a high-lane job enqueued meanwhile does
    not wait behind a stale batch), skipping running ones through an index.

    The same call first runs the deadline sweep (:mod:`core.traffic.schedule`), and late reply
    jobs never take the last :data:`IN_TIME_RESERVE` of the slots: a flooder's late
    messages cannot fill the worker while new messages that can still be answered in
    time arrive.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # arq's own read is not used (the poll is one Lua call): one id at most.
        kwargs.setdefault("queue_read_limit", 1)
        super().__init__(*args, **kwargs)
        self._due: tuple[Any, Lua] | None = None
        self._answered: set[str] = set()

    async def main(self) -> None:
        """arq's main loop, on a pool from :func:`core.infra.redis.connect_pool` (which also
        passes the sentinels' own password on)."""
        if self._pool is None and self.redis_settings is not None:
            self._pool = await connect_pool(
                self.redis_settings,
                job_serializer=self.job_serializer,
                job_deserializer=self.job_deserializer,
                default_queue_name=self.queue_name,
            )
        await super().main()

    async def _poll_iteration(self) -> None:
        """arq's poll iteration, with :meth:`start_due` instead of arq's read and start,
        then the idle wait (:class:`workers.poll.BlockingPoll`)."""
        self._picked = 0
        self._next_due_ms = None
        if self.allow_pick_jobs and self.job_counter < self.max_jobs:
            await self.start_due()
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        for job_id, t in list(self.tasks.items()):
            if t.done():
                del self.tasks[job_id]
                # arq's own loop does the same: errors in run_job surface here
                t.result()
        await self.heart_beat()
        if self.idle_block_s > 0 and not self.burst and self.allow_pick_jobs:
            await self._idle_wait()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Start the first due jobs that are not running (``job_ids`` is arq's read:
        nothing is done when it is empty)."""
        if job_ids:
            await self.start_due()

    async def start_due(self) -> int:
        """Start the first due jobs that are not running, as many as there are free
        slots; returns how many started.

        "Due" is judged by arq's own clock reading (:func:`arq.utils.timestamp_ms`, which
        rounds to the millisecond): arq scores a job it enqueues that way, and a
        truncated reading left a job enqueued in the same millisecond not due yet.
        """
        free = self.max_jobs - self.job_counter
        if free <= 0:
            return 0
        if self._due is None or self._due[0] is not self.pool:
            self._due = (self.pool, Lua(self.pool, START_DUE_LUA))
        keys: Keys | None = self.ctx.get("keys")
        member: str | None = self.ctx.get("worker_member")
        owned = keys is not None and member is not None
        now_ms = timestamp_ms()
        res: list[Any] = await self._due[1](
            [
                self.queue_name,
                deadlines_key(self.queue_name),
                running_key(self.queue_name),
                keys.worker_jobs(member) if keys is not None and member is not None else "",
            ],
            [
                now_ms,
                free,
                in_progress_key_prefix,
                SCAN_LIMIT,
                BAND_SHIFT_MS,
                SWEEP_BATCH,
                int(self.max_jobs * IN_TIME_RESERVE),
                now_ms - (IN_TIME_BAND_MS + LATE_BAND_MS) // 2,
                int(self.in_progress_timeout_s * 1000),
                member if member is not None and owned else "",
                keys.job_owner("") if keys is not None else "",
                keys.job_answered("") if keys is not None else "",
                JOBS_TTL_S,
            ],
        )
        next_due = int(float(res[-1]))
        self._next_due_ms = next_due if next_due >= 0 else None
        started = 0
        for i in range(0, len(res) - 1, 3):
            raw = res[i]
            job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            score = int(float(res[i + 1]))
            if owned:
                self.ctx["claimed_jobs"].add(job_id)
                if int(res[i + 2]):
                    self.ctx["answered_jobs"].add(job_id)
            await self.sem.acquire()
            self.job_counter += 1
            t = self.loop.create_task(self.run_job(job_id, score))
            t.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = t
            started += 1
        self._picked = started
        return started

    async def finish_job(self, job_id: str, *args: Any, **kwargs: Any) -> None:
        """arq's end of a job try, then forget that this worker runs it.

        A job whose message was purged while it ran ends for good, with no result kept
        (arq's result holds the message). A job superseded while this worker was cut
        off (handed back to the queue, see :mod:`workers.reaper`) is left as it is: its
        new owner, or the worker that starts it next, finishes it.
        """
        superseded: set[str] = self.ctx.get("superseded_jobs", set())
        if job_id in superseded:
            superseded.discard(job_id)
            logger.warning("job=%s was handed back meanwhile: leaving it to its new owner", job_id)
        elif await self._purged(job_id):
            await super().finish_job(job_id, True, None, None, False, None, None)
        else:
            await super().finish_job(job_id, *args, **kwargs)
        await self._forget(job_id)
        finished = args[0] if args else kwargs.get("finish", True)
        if not finished:
            # Tried again later (a re-defer, a retry): an idle worker, maybe this one,
            # blocks until it falls due instead of until its fallback.
            await wake_workers(self.pool, self.queue_name)

    async def finish_failed_job(self, job_id: str, *args: Any, **kwargs: Any) -> None:
        """arq's end of a job that cannot run, then forget that this worker runs it
        (no result kept if its message was purged)."""
        if await self._purged(job_id):
            await super().finish_failed_job(job_id, None)
        else:
            await super().finish_failed_job(job_id, *args, **kwargs)
        await self._forget(job_id)

    async def _purged(self, job_id: str) -> bool:
        keys: Keys | None = self.ctx.get("keys")
        if keys is None:
            return False
        try:
            return await finish_purged_job(self.pool, keys, job_id)
        except RedisError as e:
            # arq's own end of the job needs Redis too and reports it; go on with that.
            logger.warning("cannot check whether job=%s was purged: %s", job_id, e)
            return False

    async def _forget(self, job_id: str) -> None:
        self.ctx.get("claimed_jobs", set()).discard(job_id)
        member = self.ctx.get("worker_member")
        if member is not None:
            await track_finished(
                self.pool, self.ctx["keys"], member, job_id, running_key(self.queue_name)
            )
        else:
            await self.pool.zrem(running_key(self.queue_name), job_id)


def create_worker(settings: Settings, **overrides: Any) -> Worker:
    """An arq worker for ``settings`` (``overrides`` replace any keyword argument)."""
    kwargs = worker_settings(settings)
    kwargs.update(overrides)
    return SluiceWorker(**kwargs)

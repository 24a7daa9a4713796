"""The reserved path: a second arq loop in every worker process, for what must not wait.

Under a backlog every reply slot (``SLUICE_WORKER_MAX_JOBS``) is held by a job waiting in
the LLM budget's line, so a queued notice run as an ordinary job would wait with them
(measured: 107 s median on launch day). Instead, notices, door refusals and cached
answers at the door go to their own queue (:func:`core.traffic.queue.notice_queue_name`), served
by this loop with its own ``SLUICE_NOTICE_MAX_JOBS`` slots. It shares the process's
clients (``ctx``: Redis, responders, traffic, history), so it costs no extra
connections, and it runs wherever the reply worker runs (``sluice worker``, ``sluice
dev`` and ``arq workers.worker.WorkerSettings`` alike: it starts in ``on_startup``).

Why not let the adapter post the notice itself: the answer has to replace the notice,
and the notice's delivery state (Slack ts, Discord message id) is the responders'
business, which lives in workers; adapters stay verify-dedupe-enqueue-ack, and the
platforms' pacing stays in one place.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq.worker import func

from core.infra.redis import Keys
from core.infra.serializer import deserialize, serialize
from core.settings import Settings
from core.traffic.queue import notice_queue_name
from workers import traffic_jobs
from workers.poll import BlockingPoll
from workers.refresher import Refresher

logger = logging.getLogger(__name__)

NOTICE_JOB_TIMEOUT_S = 30


def notice_functions(settings: Settings) -> list[Any]:
    """The reserved path's jobs (one try each: a courtesy must not pile up)."""
    timeout = min(NOTICE_JOB_TIMEOUT_S, settings.job_timeout_s)
    return [
        func(traffic_jobs.door_check, name="door_check", timeout=timeout, max_tries=1),
        func(traffic_jobs.notify_queued, name="notify_queued", timeout=timeout, max_tries=1),
        func(traffic_jobs.door_refuse, name="door_refuse", timeout=timeout, max_tries=1),
    ]


def notice_worker(settings: Settings, ctx: dict[str, Any]) -> BlockingPoll:
    """The reserved loop over the process's pool and ``ctx`` (not started); idle, it
    blocks on its queue's wake list (:mod:`workers.poll`)."""
    return BlockingPoll(
        functions=notice_functions(settings),
        queue_name=notice_queue_name(settings),
        redis_pool=ctx["redis"],
        ctx=ctx,
        handle_signals=False,
        max_jobs=settings.notice_max_jobs,
        poll_delay=settings.worker_poll_delay_s,
        idle_block_s=settings.worker_idle_block_s,
        job_timeout=min(NOTICE_JOB_TIMEOUT_S, settings.job_timeout_s),
        max_tries=1,
        keep_result=60,
        health_check_interval=settings.health_check_interval_s,
        job_serializer=serialize,
        job_deserializer=deserialize,
    )


async def start_notice_worker(settings: Settings, ctx: dict[str, Any]) -> None:
    """Start the reserved loop, and the queued notices' refresher beside it
    (:mod:`workers.refresher`), in the background (kept in ``ctx``)."""
    worker = notice_worker(settings, ctx)
    task = asyncio.create_task(worker.main(), name="sluice-notice-worker")
    refresher = Refresher(settings, Keys(settings.key_prefix), ctx, traffic_jobs.refresh_notice)
    sweeper = asyncio.create_task(refresher.run(), name="sluice-notice-refresher")

    def crashed(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            logger.error("%s stopped", t.get_name(), exc_info=t.exception())

    task.add_done_callback(crashed)
    sweeper.add_done_callback(crashed)
    ctx["notice_worker"] = (worker, task)
    ctx["notice_refresher"] = sweeper
    logger.info(
        "reserved notice loop on %s with %d slots",
        notice_queue_name(settings),
        settings.notice_max_jobs,
    )


async def stop_notice_worker(ctx: dict[str, Any]) -> None:
    """Stop the reserved loop: running notices get a moment, then are cancelled. The
    shared pool stays open (the reply worker closes it). Refreshes being made are
    cancelled: claimed, they are due again one interval later, for any worker."""
    sweeper = ctx.pop("notice_refresher", None)
    if sweeper is not None:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
    entry = ctx.pop("notice_worker", None)
    if entry is None:
        return
    worker, task = entry
    worker.allow_pick_jobs = False
    running = [t for t in worker.tasks.values() if not t.done()]
    if running:
        await asyncio.wait(running, timeout=5)
    for t in worker.tasks.values():
        t.cancel()
    task.cancel()
    # The loop may have ended already (Redis went away: ``crashed`` logged it); its
    # error must not escape into the worker's shutdown, which then restarts it.
    await asyncio.gather(task, return_exceptions=True)
    for outcome in await asyncio.gather(*worker.tasks.values(), return_exceptions=True):
        if isinstance(outcome, Exception):
            logger.warning("a notice job ended with an error at shutdown: %s", outcome)

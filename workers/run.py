"""Running a worker process with a graceful stop.

On SIGTERM or SIGINT the worker stops taking jobs, lets the jobs it holds finish for
up to ``SLUICE_SHUTDOWN_GRACE_S``, then cancels what is left; arq puts a cancelled job
back on the queue at once, so another worker answers it (responders are idempotent
per job, so nothing is posted twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from arq.worker import Worker
from redis.exceptions import RedisError

from core.errors import NoPrimaryError
from core.infra.clock import skew_local_clock
from core.infra.signals import stop_on_signals
from core.settings import Settings
from workers.settings import create_worker

logger = logging.getLogger(__name__)


async def drain(worker: Worker, main_task: asyncio.Task[Any], grace_s: float) -> None:
    """Stop polling, wait up to ``grace_s`` for running jobs, hand back the rest, close."""
    main_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await main_task
    running = [t for t in worker.tasks.values() if not t.done()]
    if running:
        logger.info("stopping: waiting up to %.0fs for %d running job(s)", grace_s, len(running))
        _done, pending = await asyncio.wait(running, timeout=grace_s)
        if pending:
            logger.warning("stopping: handing %d unfinished job(s) back to the queue", len(pending))
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    await worker.close()
    logger.info(
        "worker stopped: %d complete, %d failed, %d retried",
        worker.jobs_complete,
        worker.jobs_failed,
        worker.jobs_retried,
    )


async def run_worker(settings: Settings, *, burst: bool = False) -> None:
    """Run one worker until SIGTERM/SIGINT (or an empty queue with ``burst``).

    When Redis goes away, arq's loop stops; this starts a fresh worker (new
    connections) with capped backoff until Redis answers again, so a Redis restart
    never needs a worker restart.
    """
    skew_local_clock(settings.test_clock_offset_s)
    stop = stop_on_signals()
    backoff_s = 1.0
    first = True
    while not stop.is_set():
        worker = create_worker(settings, handle_signals=False, burst=burst)
        main_task = asyncio.ensure_future(worker.async_run())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({main_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not main_task.done():
            logger.info("signal received: stopping gracefully")
            await drain(worker, main_task, settings.shutdown_grace_s)
            return
        stopper.cancel()
        error = main_task.exception()
        if error is None:
            await worker.close()  # burst mode: the queue is empty
            return
        if first and isinstance(error, NoPrimaryError):
            raise error  # wrong sentinels at start-up: a clear error, not a retry loop
        first = False
        if not isinstance(error, RedisError | OSError):
            raise error
        logger.warning("lost Redis (%s); reconnecting in %.0fs", error, backoff_s)
        await _abandon(worker, settings.shutdown_grace_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=backoff_s)
        backoff_s = min(backoff_s * 2, 10.0)


async def _abandon(worker: Worker, grace_s: float) -> None:
    """Let a dead worker's running jobs end, then release what it holds."""
    running = [t for t in worker.tasks.values() if not t.done()]
    if running:
        await asyncio.wait(running, timeout=grace_s)
    try:
        await worker.close()
    except (RedisError, OSError) as e:
        logger.info("closing the disconnected worker: %s", e)
        if worker.on_shutdown:
            await worker.on_shutdown(worker.ctx)

"""``arq workers.worker.WorkerSettings`` runs the same worker as ``sluice worker``."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis
from sqlalchemy.exc import OperationalError

from core.history.store import count_rows, make_engine
from core.infra.redis import Keys
from core.messages import IncomingMessage
from core.settings import Settings
from core.traffic.queue import accept_message, connect_queue
from sluice.bench.procs import Proc
from tests.helpers import ROOT, base_env, settings_env


async def test_arq_cli_worker_answers_flushes_history_beats_and_looks_past_running_jobs(
    settings: Settings, llm_sim: object, redis: Redis, tmp_path: Path
) -> None:
    """The arq entry used to copy 13 settings by hand: no crons (history never reached
    SQL), stock arq's poll and no heartbeat. Here 150 running jobs sit at the head of
    the queue, more than stock arq reads per poll (``max_jobs``, 100), so only Sluice's
    poll sees the message behind them; the answer must then reach SQL through the
    flush cron, and the worker must beat."""
    keys = Keys(settings.key_prefix)
    queue = await connect_queue(settings)
    running = [f"{settings.key_prefix}:running:{i}" for i in range(150)]
    old = int(time.time() * 1000) - 60_000
    await queue.zadd(settings.queue_name, {job: old + i for i, job in enumerate(running)})
    for job in running:
        await queue.set(in_progress_key_prefix + job, b"1", px=120_000)
    env = {
        **base_env(),
        **settings_env(settings),
        "SLUICE_HISTORY_FLUSH_INTERVAL_S": "1",
        "SLUICE_WORKER_MAX_JOBS": "100",
    }
    proc = Proc("arq", ["arq", "workers.worker.WorkerSettings"], env, tmp_path, cwd=ROOT)
    engine = make_engine(settings)
    try:
        msg = IncomingMessage(
            platform="web",
            tenant="web",
            channel=f"s{uuid.uuid4().hex[:12]}",
            user=f"u{uuid.uuid4().hex[:8]}",
            message_id=uuid.uuid4().hex,
            text="Hello through arq's own CLI",
        )
        assert await accept_message(queue, settings, msg)

        got = 0
        deadline = time.monotonic() + 60
        while got < 2:
            assert proc.popen.poll() is None, proc.output()[-3000:]
            assert time.monotonic() < deadline, f"{got} rows in SQL:\n{proc.output()[-3000:]}"
            await asyncio.sleep(0.2)
            try:
                got = (await count_rows(engine))[0]
            except OperationalError as e:  # the worker creates the schema at start-up
                assert "no such table" in str(e), e
        beats = await redis.zrange(keys.heartbeats(), 0, -1)
        assert any(m.startswith(b"worker:") for m in beats), beats
        assert "worker ready" in proc.output()
    finally:
        proc.stop()
        await engine.dispose()
        await queue.delete(settings.queue_name, *(in_progress_key_prefix + j for j in running))
        await queue.aclose()

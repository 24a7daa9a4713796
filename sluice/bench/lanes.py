"""``sluice bench --scenario lanes``: score ordering vs one queue per lane, measured.

The same load in both modes of ``SLUICE_LANE_QUEUES``: 120 messages in ~1 s (15 high,
21 bulk, 84 default), the simulator 80 ms to the first token and 4 tokens, the same 6
worker slots in all (``score``: one worker with 6 slots on the one queue ordered by
lane score; ``per-lane``: one worker with 2 slots per lane queue). The wait of a
message is the time from its acceptance (as an adapter accepts it) to its job's
``start`` event; the report gives the p95 wait per lane and the time until every
message was answered. docs/traffic.md has the numbers.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from core.framework.bot import Bot
from core.framework.routing import LaneRule
from core.infra.redis import Keys
from core.messages import IncomingMessage
from core.settings import Settings
from core.traffic.queue import accept_message, connect_queue
from sluice.bench.procs import Proc, free_port, wait_http

MODES = ("score", "per-lane")
LANES = ("high", "default", "bulk")
SLOTS = 6

bot = Bot(
    name="bench-lanes",
    lanes=[LaneRule("high", words=["billing"]), LaneRule("bulk", words=["digest"])],
)
"""The bot both modes run (``SLUICE_APP=sluice.bench.lanes:bot``)."""


def lane_of(i: int) -> str:
    """The lane of the ``i``-th message: 1 in 8 high, 1 in 5 of the rest bulk."""
    return "high" if i % 8 == 3 else "bulk" if i % 5 == 1 else "default"


def p95(values: list[float]) -> float | None:
    """The 95th percentile (nearest rank); ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, round(0.95 * len(ordered)) - 1)]


async def _done_events(redis: Redis, keys: Keys, sessions: list[str]) -> dict[str, dict[str, int]]:
    """Per message id: the Redis time (ms) of its ``start`` and ``done`` events."""
    out: dict[str, dict[str, int]] = {}
    for session in sessions:
        for entry_id, fields in await redis.xrange(keys.web_outbox(session)):
            event = json.loads(fields[b"data"])
            at_ms = int(entry_id.decode().split("-")[0])
            out.setdefault(event["message_id"], {}).setdefault(event["type"], at_ms)
    return out


async def run_mode(
    mode: str,
    *,
    redis_url: str,
    sim_url: str,
    env: dict[str, str],
    log_dir: Path,
    messages: int = 120,
    drain_timeout_s: float = 120.0,
) -> dict[str, Any]:
    """One mode under the load; returns the p95 wait per lane and the total time."""
    prefix = f"lanes{uuid.uuid4().hex[:10]}"
    settings = Settings(
        _env_file=None,
        redis_url=redis_url,
        key_prefix=prefix,
        app="sluice.bench.lanes:bot",
        lane_queues=mode,
        openai_api_key="sk-bench-0123456789",
        openai_base_url=f"{sim_url}/v1",
    )
    worker_env = {
        **env,
        "REDIS_URL": redis_url,
        "SLUICE_KEY_PREFIX": prefix,
        "SLUICE_APP": "sluice.bench.lanes:bot",
        "SLUICE_LANE_QUEUES": mode,
        "OPENAI_API_KEY": "sk-bench-0123456789",
        "OPENAI_BASE_URL": f"{sim_url}/v1",
        "SLUICE_STREAM_MIN_INTERVAL_S": "0",
        "SLUICE_WORKER_POLL_DELAY_S": "0.02",
    }
    if mode == "score":
        pools = [{"SLUICE_WORKER_MAX_JOBS": str(SLOTS)}]
    else:
        slots = str(SLOTS // len(LANES))
        pools = [
            {"SLUICE_WORKER_MAX_JOBS": slots, "SLUICE_WORKER_LANES": f'["{lane}"]'}
            for lane in LANES
        ]
    workers = [
        Proc(f"worker-{mode}-{i}", ["sluice", "worker"], {**worker_env, **pool}, log_dir)
        for i, pool in enumerate(pools)
    ]
    redis: Redis = Redis.from_url(redis_url)
    queue = await connect_queue(settings)
    try:
        for w in workers:
            deadline = time.monotonic() + 90
            while "worker ready" not in w.output():
                if not w.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"{w.name} did not start:\n{w.output()[-3000:]}")
                await asyncio.sleep(0.1)
        keys = Keys(prefix)
        accepted_ms: dict[str, float] = {}
        lane: dict[str, str] = {}
        sessions: list[str] = []
        started = time.monotonic()
        for i in range(messages):
            session = f"s{uuid.uuid4().hex[:12]}"
            word = {"high": "billing", "bulk": "digest", "default": "question"}[lane_of(i)]
            msg = IncomingMessage(
                platform="web",
                tenant="web",
                channel=session,
                user=session,
                message_id=uuid.uuid4().hex,
                text=f"{word} number {i}",
                ts=time.time(),
                is_dm=True,
            )
            accepted_ms[msg.message_id] = time.time() * 1000
            await accept_message(queue, settings, msg)
            lane[msg.message_id] = lane_of(i)
            sessions.append(session)
            await asyncio.sleep(0.005)
        deadline = time.monotonic() + drain_timeout_s
        while True:
            events = await _done_events(redis, keys, sessions)
            if all("done" in events.get(m, {}) for m in lane):
                break
            if time.monotonic() > deadline:
                left = sum("done" not in events.get(m, {}) for m in lane)
                raise RuntimeError(f"{mode}: {left} of {messages} not answered")
            await asyncio.sleep(0.2)
        total_s = time.monotonic() - started
    finally:
        await queue.aclose()
        await redis.aclose()
        for w in workers:
            w.stop()
    waits: dict[str, list[float]] = {name: [] for name in LANES}
    for message_id, name in lane.items():
        waits[name].append((events[message_id]["start"] - accepted_ms[message_id]) / 1000)
    return {
        "mode": mode,
        "workers": len(workers),
        "slots": SLOTS,
        "messages": {name: len(v) for name, v in waits.items()},
        "p95_wait_s": {name: p95(v) for name, v in waits.items()},
        "all_answered_s": round(total_s, 2),
    }


async def run_lanes(
    redis_url: str, env: dict[str, str], log_dir: Path, messages: int = 120
) -> list[dict[str, Any]]:
    """Both modes, one after the other, against one simulator (``log_dir`` exists)."""
    port = free_port()
    args = ["sluice", "llm-sim", "--port", str(port), "--first-token-ms", "80", "--tokens", "4"]
    sim = Proc("llm-sim", args, env, log_dir)
    try:
        sim_url = f"http://127.0.0.1:{port}"
        await wait_http(f"{sim_url}/_sim/stats", sim)
        return [
            await run_mode(
                mode,
                redis_url=redis_url,
                sim_url=sim_url,
                env=env,
                log_dir=log_dir,
                messages=messages,
            )
            for mode in MODES
        ]
    finally:
        sim.stop()

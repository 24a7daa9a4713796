"""Redis Sentinel: clear start-up errors, and a primary killed mid-load loses no
acknowledged message and answers none twice.

Real servers: Debian's ``redis-server`` as primary, replica and three sentinels on
loopback ports; real ``sluice worker`` and ``sluice web`` processes; the test itself
accepts messages through :func:`core.traffic.queue.accept_message`, as an adapter does, and
counts a message as acknowledged only when that call returned (with
``SLUICE_REDIS_WAIT_REPLICAS=1``, after a replica confirmed it).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.exceptions import RedisError

from core.errors import QueueError
from core.infra.redis import Keys, client
from core.messages import IncomingMessage
from core.settings import Settings
from core.traffic.queue import accept_message, connect_queue
from tests.helpers import Proc, base_env, free_port, settings_env
from tests.scale.servers import (
    MASTER,
    SentinelGroup,
    redis_server_binary,
    start_sentinel_group,
    start_servers,
)
from tests.webchat import open_session

pytestmark = pytest.mark.sentinel


@pytest.fixture
def redis_binary() -> str:
    """``redis-server``, or a visible skip (``SLUICE_TEST_REQUIRE_SENTINEL=1`` fails it)."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return binary


def _run_until_exit(args: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
    proc = Proc(args, env, log)
    try:
        code = proc.popen.wait(60)
    finally:
        proc.stop()
    return code, log.read_text("utf-8", errors="replace")


def _assert_clear_start_up_error(code: int, out: str) -> None:
    assert code == 2, out
    assert "names a reachable primary" in out, out
    assert "SLUICE_REDIS_SENTINELS" in out, out
    assert "Traceback" not in out, out


def test_sentinels_that_answer_nowhere_stop_every_process_with_a_clear_error(
    settings: Settings, tmp_path: Path
) -> None:
    dead = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    s = settings.model_copy(update={"redis_url": None, "redis_sentinels": dead})
    env = {**base_env(), **settings_env(s)}
    code, out = _run_until_exit(["worker"], env, tmp_path / "worker.log")
    _assert_clear_start_up_error(code, out)
    code, out = _run_until_exit(["web", "--port", "0"], env, tmp_path / "web.log")
    _assert_clear_start_up_error(code, out)
    slack_env = {**env, "SLACK_BOT_TOKEN": "xoxb-test", "SLACK_SIGNING_SECRET": "s" * 32}
    code, out = _run_until_exit(["slack", "--port", "0"], slack_env, tmp_path / "slack.log")
    _assert_clear_start_up_error(code, out)
    code, out = _run_until_exit(
        ["discord"], {**env, "DISCORD_TOKEN": "test-token"}, tmp_path / "discord.log"
    )
    _assert_clear_start_up_error(code, out)


def test_sentinel_naming_no_live_primary_or_an_unknown_master_is_a_clear_error(
    settings: Settings, tmp_path: Path, redis_binary: str
) -> None:
    with start_servers(tmp_path, redis_binary) as servers:
        # A sentinel that watches a primary that is not running.
        sentinel = servers.start(
            "lonely",
            f"sentinel monitor {MASTER} 127.0.0.1 {free_port()} 1\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n",
            sentinel=True,
        )
        addr = f"127.0.0.1:{sentinel.port}"
        for master in (MASTER, "no-such-master"):
            s = settings.model_copy(
                update={
                    "redis_url": None,
                    "redis_sentinels": addr,
                    "redis_sentinel_master": master,
                }
            )
            env = {**base_env(), **settings_env(s)}
            code, out = _run_until_exit(["worker"], env, tmp_path / f"worker-{master}.log")
            _assert_clear_start_up_error(code, out)
            assert repr(master) in out


async def _restart_after_promotion(group: SentinelGroup) -> None:
    """Once the sentinels name the replica as primary, start the killed server again
    (a supervisor's restart): it comes back as the new primary's replica, so that
    ``WAIT 1`` can be met again. Until then no ack is given."""
    deadline = time.monotonic() + 30
    while await asyncio.to_thread(group.primary_port) != group.replica.port:
        assert time.monotonic() < deadline, "the sentinels did not promote the replica"
        await asyncio.sleep(0.2)
    await asyncio.to_thread(group.primary.restart)


async def _deliver_until_acked(queue: Any, s: Settings, msg: IncomingMessage) -> int:
    """Deliver ``msg`` until the adapter call acks it, as a platform retries an
    unacked delivery; returns how often it was refused."""
    refused = 0
    deadline = time.monotonic() + 60
    while True:
        try:
            await accept_message(queue, s, msg)
            return refused
        except QueueError:
            refused += 1
            assert time.monotonic() < deadline, "no ack for 60 s after the failover"
            await asyncio.sleep(0.2)


async def _wait_answered(redis: Any, keys: Keys, sessions: list[str], ids: list[str]) -> None:
    """Wait until every message id has a ``done`` event (Redis errors: failover)."""
    deadline = time.monotonic() + 120
    missing = ids
    while missing:
        assert time.monotonic() < deadline, f"{len(missing)} acked message(s) never answered"
        await asyncio.sleep(0.2)
        try:
            counts = await _outbox_dones(redis, keys, sessions)
        except (RedisError, OSError):
            continue
        missing = [m for m in ids if counts.get(m, 0) == 0]


async def _post_until_accepted(base: str) -> tuple[str, str]:
    """Open a web session and POST a message in it; a 503 (a pooled connection to the
    dead primary) is delivered again, as a platform does; returns the session and the
    message id."""
    async with aiohttp.ClientSession() as http:
        session = await open_session(http, base)
        for _ in range(50):
            async with http.post(
                f"{base}/api/messages",
                json={"text": "after the failover"},
                headers=session.headers(),
            ) as resp:
                body = await resp.json()
                if resp.status == 202:
                    message_id: str = body["message_id"]
                    return str(session), message_id
                assert resp.status == 503, body
            await asyncio.sleep(0.2)
    raise AssertionError("the web adapter refused the message 50 times after the failover")


def _message(session: str, i: int) -> IncomingMessage:
    return IncomingMessage(
        platform="web",
        tenant="web",
        channel=session,
        user=session,
        message_id=uuid.uuid4().hex,
        text=f"question {i} from {session}",
        ts=time.time(),
        is_dm=True,
    )


async def _outbox_dones(redis: Any, keys: Keys, sessions: list[str]) -> dict[str, int]:
    """``done`` events per message id, read from the sessions' outboxes."""
    counts: dict[str, int] = {}
    for session in sessions:
        for _id, fields in await redis.xrange(keys.web_outbox(session)):
            event = json.loads(fields[b"data"])
            if event.get("type") == "done":
                counts[event["message_id"]] = counts.get(event["message_id"], 0) + 1
    return counts


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.timeout(240)
async def test_primary_killed_mid_load_loses_no_acked_message_and_answers_none_twice(
    settings: Settings, llm_sim: Any, tmp_path: Path, redis_binary: str
) -> None:
    llm_sim.configure(tokens=12, token_latency_s=0.02)
    with start_servers(tmp_path, redis_binary) as servers:
        group = start_sentinel_group(servers)
        s = settings.model_copy(
            update={
                "redis_url": None,
                "redis_sentinels": group.sentinel_list,
                "redis_wait_replicas": 1,
                "redis_wait_timeout_ms": 500,
            }
        )
        env = {**base_env(), **settings_env(s), "SLUICE_HEALTH_CHECK_INTERVAL_S": "1"}
        workers = [Proc(["worker"], env, tmp_path / f"worker-{i}.log") for i in range(2)]
        web_port = free_port()
        web = Proc(["web", "--port", str(web_port)], env, tmp_path / "web.log")
        try:
            for w in workers:
                w.wait_for_output("worker ready", timeout_s=60)
            web.wait_for_output(str(web_port), timeout_s=60)
            keys = Keys(s.key_prefix)
            queue = await connect_queue(s)
            sessions = [f"f{uuid.uuid4().hex[:10]}" for _ in range(10)]
            acked: list[IncomingMessage] = []
            refused = 0
            total = 90
            killed_at: float | None = None
            started = time.monotonic()
            for i in range(total):
                msg = _message(sessions[i % len(sessions)], i)
                if i == total // 3:
                    group.primary.kill(signal.SIGKILL)  # mid-load, no goodbye
                    killed_at = time.monotonic()
                    comeback = asyncio.create_task(_restart_after_promotion(group))
                refused += await _deliver_until_acked(queue, s, msg)
                acked.append(msg)
                pause = started + (i + 1) * 0.05 - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
            assert killed_at is not None
            # Sentinel promoted the replica (and the old primary came back as its replica).
            await comeback
            reader = client(s)
            await _wait_answered(reader, keys, sessions, [m.message_id for m in acked])
            # The web adapter process reconnected too: a message through its HTTP API.
            session, late = await _post_until_accepted(f"http://127.0.0.1:{web_port}")
            sessions.append(session)
            deadline = time.monotonic() + 60
            while (await _outbox_dones(reader, keys, [session])).get(late, 0) == 0:
                assert time.monotonic() < deadline, "the web adapter's message was not answered"
                await asyncio.sleep(0.2)
            assert all(w.alive() for w in workers) and web.alive()
            # A second reply could only come from a job still queued or running: wait
            # until the queue is empty (arq drops a job from it when the job ends).
            deadline = time.monotonic() + 60
            while left := [j for j in await reader.zrange(s.queue_name, 0, -1) if b":reply:" in j]:
                assert time.monotonic() < deadline, f"reply jobs left in the queue: {left}"
                await asyncio.sleep(0.2)
            counts = await _outbox_dones(reader, keys, sessions)
            twice = {m: n for m, n in counts.items() if n > 1}
            await reader.aclose()
            await queue.aclose()
        finally:
            for w in workers:
                w.stop()
            web.stop()
    assert len(acked) == total
    assert twice == {}, f"answered more than once: {twice}"
    assert refused > 0, "the failover was noticed by the adapter (acks held back)"
    for w in workers:
        # Each worker lost the dead primary, reconnected through the sentinels and
        # answered again.
        out = w.log_path.read_text("utf-8", errors="replace")
        assert "lost Redis" in out, out[-3000:]
        assert "job done" in out[out.index("lost Redis") :], out[-3000:]

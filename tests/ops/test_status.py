"""``sluice status`` reads the queue, workers and adapters from Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

from core.messages import IncomingMessage
from core.traffic.queue import connect_queue, enqueue_reply
from tests.helpers import ROOT, base_env, settings_env


def _status(settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice", "status", *args],
        env={**base_env(), **settings_env(settings), "COLUMNS": "160"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _json(settings) -> dict[str, list[list[str]]]:
    done = _status(settings, "--json")
    assert done.returncode == 0, done.stderr
    result: dict[str, list[list[str]]] = json.loads(done.stdout)
    return result


async def test_status_shows_a_backlog_while_workers_are_stopped_and_none_after_they_drain(
    settings, redis, worker_process
):
    queue = await connect_queue(settings)
    try:
        for i in range(7):
            msg = IncomingMessage(
                lane="bulk" if i >= 5 else "default",
                platform="web",
                tenant="web",
                channel=f"c{i}",
                user=f"u{i}",
                message_id=uuid.uuid4().hex,
                text=f"question {i}",
            )
            assert await enqueue_reply(queue, settings, msg)
    finally:
        await queue.aclose()
    await asyncio.sleep(1.1)

    before = await asyncio.to_thread(_json, settings)
    lane = dict(before["Queue"])["lane default"]
    assert lane.startswith("5 waiting, 0 running")
    assert dict(before["Queue"])["lane bulk"].startswith("2 waiting, 0 running")
    assert float(lane.rsplit("oldest waiting ", 1)[1].split()[0]) >= 1.0
    assert dict(before["Workers"])["live workers"] == "0"
    assert dict(before["LLM budget"])["calls / tokens"] == "0 / 0"
    assert dict(before["Cache"])["hit ratio"] == "n/a"
    assert dict(before["History"])["backlog"].startswith("0 messages")

    worker_process()
    for _ in range(300):
        if not await redis.zcard(settings.queue_name):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the worker did not drain the queue in 30 s")

    after = await asyncio.to_thread(_json, settings)
    assert dict(after["Queue"])["lane default"].startswith("0 waiting, 0 running")
    assert "lane bulk" not in dict(after["Queue"])
    assert dict(after["Workers"])["live workers"] == "1"
    calls = int(dict(after["LLM budget"])["calls / tokens"].split(" / ")[0])
    assert calls >= 1, "the drained jobs went through the shared budget"
    history = dict(after["History"])
    assert "not yet in SQL" in history["backlog"] and "last flush" in history

    screen = await asyncio.to_thread(_status, settings)
    assert screen.returncode == 0, screen.stderr
    for section in ("Queue", "Workers", "Adapters", "LLM budget", "Cache", "History"):
        assert section in screen.stdout


async def test_status_lists_a_running_web_adapter(settings):
    from tests.webchat import web_adapter

    async with web_adapter(settings):
        await asyncio.sleep(0.3)
        result = await asyncio.to_thread(_json, settings)
    web = dict(result["Adapters"])["web"]
    assert web.startswith("1 seen")


def test_status_without_redis_url_names_the_setting(settings):
    done = subprocess.run(
        [sys.executable, "-m", "sluice", "status"],
        env={**base_env()},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "REDIS_URL" in done.stderr


async def test_a_process_without_http_beats_and_serves_healthz_on_the_metrics_port(settings):
    import aiohttp

    from core.infra.heartbeat import process_ops
    from tests.helpers import free_port

    port = free_port()
    ops_settings = settings.model_copy(update={"metrics_port": port})
    async with process_ops(ops_settings, "adapter:discord"):
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert "sluice_queue_depth" in await resp.text()
        seen = await asyncio.to_thread(_json, settings)
    assert dict(seen["Adapters"])["discord"].startswith("1 seen")
    gone = await asyncio.to_thread(_json, settings)
    assert "discord" not in dict(gone["Adapters"]), "a clean stop removes the heartbeat"

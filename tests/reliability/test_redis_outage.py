"""Redis stopped and restarted: adapters refuse (so platforms redeliver), workers reconnect,
and messages accepted before the stop are answered once after it."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest

from tests.helpers import Proc, base_env, settings_env
from tests.webchat import ChatSession, web_adapter

pytestmark = pytest.mark.slow


async def test_accepted_messages_survive_a_redis_restart_and_new_ones_are_refused_meanwhile(
    valkey, valkey_settings, llm_sim, tmp_path
):
    settings = valkey_settings
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            # No worker yet: the message waits in the queue.
            accepted = await tab.send("queued before the outage")
            valkey.stop()
            during = {"text": "during", "id": uuid.uuid4().hex}
            cookie = tab.session.headers()
            async with http.post(f"{base}/api/messages", json=during, headers=cookie) as resp:
                assert resp.status == 503, "a refused message must not look accepted"
                assert "try again" in (await resp.json())["error"]
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 503
            valkey.start()
            env = {**base_env(), **settings_env(settings)}
            worker = Proc(["worker"], env, tmp_path / "worker.log")
            try:
                worker.wait_for_output("worker ready", timeout_s=90)
                done = await tab.reply(accepted, timeout_s=30)
                await asyncio.sleep(0.5)
                assert len([e for e in tab.events_for(accepted) if e["type"] == "done"]) == 1
                assert done["text"].startswith("Echo: queued before the outage")
                # The refused message, delivered again, is taken: it was never enqueued.
                async with http.post(f"{base}/api/messages", json=during, headers=cookie) as resp:
                    assert resp.status == 202
                    assert "duplicate" not in await resp.json()
                again = await tab.reply(during["id"], timeout_s=30)
                assert again["text"].startswith("Echo: during")
            finally:
                worker.stop()


async def test_a_running_worker_reconnects_after_redis_comes_back(
    valkey, valkey_settings, llm_sim, tmp_path
):
    settings = valkey_settings
    env = {**base_env(), **settings_env(settings)}
    worker = Proc(["worker"], env, tmp_path / "worker.log")
    try:
        worker.wait_for_output("worker ready", timeout_s=90)
        valkey.stop()
        await asyncio.sleep(3)
        valkey.start()
        async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
            async with ChatSession(http, base) as tab:
                done = await tab.reply(await tab.send("after the outage"), timeout_s=40)
        assert done["text"].startswith("Echo: after the outage")
        assert worker.popen.poll() is None, "the worker must survive the outage"
    finally:
        worker.stop()

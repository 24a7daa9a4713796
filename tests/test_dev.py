"""`sluice dev`: picks its parts, prints them, and answers in the web chat."""

from __future__ import annotations

import aiohttp
import redis as redis_sync

from sluice import dev
from tests.helpers import Proc, base_env, free_port, settings_env, wait_port
from tests.webchat import ChatSession


def test_dev_starts_an_embedded_valkey_when_no_redis_answers(settings, monkeypatch):
    monkeypatch.setattr(dev, "LOCAL_REDIS", ("127.0.0.1", free_port()))
    no_url = settings.model_copy(update={"redis_url": None})
    with dev.choose_redis(no_url) as (url, description):
        assert "embedded Valkey" in description
        client = redis_sync.Redis.from_url(url)
        try:
            assert client.ping()
        finally:
            client.close()


def test_dev_prefers_redis_url(settings):
    with dev.choose_redis(settings) as (url, description):
        assert url == settings.redis_url
        assert description == "REDIS_URL"


async def test_sluice_dev_serves_the_chat_with_the_simulator(settings, tmp_path):
    env = {**base_env(), **settings_env(settings)}
    # No key: dev must start its own simulator rather than use the test's.
    for key in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env.pop(key)
    port = free_port()
    proc = Proc(["dev", "--port", str(port)], env, tmp_path / "dev.log")
    try:
        proc.wait_for_output("Open http://", timeout_s=30)
        wait_port(port)
        out = proc.output()
        assert "the built-in LLM simulator" in out
        assert "redis:    REDIS_URL" in out
        async with aiohttp.ClientSession() as http:
            async with ChatSession(http, f"http://127.0.0.1:{port}") as tab:
                done = await tab.reply(await tab.send("hello dev"))
        assert done["text"].startswith("Echo: hello dev")
    finally:
        assert proc.stop() == 0

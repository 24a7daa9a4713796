"""An adapter restarted while messages arrive: every accepted message is answered once."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections import Counter

import aiohttp
import pytest

from core.infra.redis import Keys
from tests.helpers import Proc, base_env, free_port, settings_env, wait_jobs_done, wait_port
from tests.webchat import WebSession, open_session, with_web_secret

pytestmark = pytest.mark.slow


async def _send_with_redelivery(
    http: aiohttp.ClientSession, url: str, session: WebSession, text: str
) -> str:
    """Post like a platform does: the same id again until accepted (refused, reset, 5xx)."""
    body = {"text": text, "id": uuid.uuid4().hex}
    for _ in range(200):
        try:
            async with http.post(url, json=body, headers=session.headers()) as resp:
                if resp.status == 202:
                    message_id: str = (await resp.json())["message_id"]
                    return message_id
        except aiohttp.ClientError:
            pass  # the adapter is restarting: deliver again, as Slack would
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} was never accepted")


async def test_adapter_restart_loses_nothing_and_answers_each_message_once(
    settings, llm_sim, worker_process, redis, tmp_path
):
    # No streamed deltas: the session's outbox (500 events) then holds every answer.
    # One session sends all 60: above the default 20 a window, the door would refuse
    # them (with one notice), which is not what this test is about.
    limit = {"SLUICE_USER_REQUESTS_PER_WINDOW": "1000"}
    worker_process({"SLUICE_STREAM_MIN_INTERVAL_S": "60", **limit})
    port = free_port()
    # One web secret, so the restarted adapter takes the session the first one issued.
    env = {**base_env(), **settings_env(with_web_secret(settings)), **limit}
    url = f"http://127.0.0.1:{port}/api/messages"
    first = Proc(["web", "--port", str(port)], env, tmp_path / "web1.log")
    wait_port(port)
    async with aiohttp.ClientSession() as http:
        session = await open_session(http, f"http://127.0.0.1:{port}")
        sends = []
        for i in range(60):
            sends.append(
                asyncio.create_task(_send_with_redelivery(http, url, session, f"message {i}"))
            )
            await asyncio.sleep(0.02)
            if i == 20:
                first.kill(signal.SIGTERM)
                await asyncio.to_thread(first.popen.wait, 10)
                second = Proc(["web", "--port", str(port)], env, tmp_path / "web2.log")
        accepted = await asyncio.gather(*sends)
    try:
        assert len(set(accepted)) == 60
        key = Keys(settings.key_prefix).web_outbox(session)
        async with asyncio.timeout(60):
            while True:
                events = [json.loads(f[b"data"]) for _, f in await redis.xrange(key)]
                done = Counter(e["message_id"] for e in events if e["type"] == "done")
                if set(done) >= set(accepted):
                    break
                await asyncio.sleep(0.2)
        await wait_jobs_done(redis, settings, 60)  # a second answer would be out by now
        events = [json.loads(f[b"data"]) for _, f in await redis.xrange(key)]
        done = Counter(e["message_id"] for e in events if e["type"] == "done")
        assert set(done) == set(accepted)
        assert max(done.values()) == 1, "no message answered twice"
        shown = Counter(e["message_id"] for e in events if e["type"] == "user")
        assert sum(shown.values()) == 60, "a resend is never a second message"
    finally:
        first.stop()
        second.stop()

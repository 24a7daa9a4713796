"""Slack and Discord faults with real worker processes: a worker killed mid-reply, Redis
stopped under the Slack adapter, a reply target deleted meanwhile."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from core.infra.redis import Keys
from core.messages import IncomingMessage
from core.settings import Settings
from tests.discord.conftest import CHANNEL, GUILD
from tests.discord.conftest import running_adapter as discord_adapter
from tests.fakes.discord_fake import DiscordFake
from tests.fakes.slack_api import FakeSlackAPI
from tests.helpers import Proc, settings_env, wait_jobs_done
from tests.helpers import unique_slack_ts as _ts
from tests.helpers import wait_until as _until
from tests.slack.conftest import BOT_TOKEN, SIGNING_SECRET, mention, message

JOB_TIMEOUT_S = 5


def _final(fake: FakeSlackAPI, prefix: str) -> list:
    return [m for m in fake.replies() if m.text.startswith(prefix) and not m.streaming]


@pytest.mark.slow
async def test_slack_worker_sigkilled_mid_reply_answers_once_by_editing_its_message(
    slack_settings, adapter, worker_process, fake_slack, llm_sim, redis
):
    llm_sim.configure(tokens=30, token_latency_s=0.1)
    env = {**settings_env(slack_settings), "SLUICE_JOB_TIMEOUT_S": str(JOB_TIMEOUT_S)}
    first = worker_process(env)
    thread_ts, dm_ts = _ts(), _ts()
    async with adapter(slack_settings) as a:
        # A thread reply (native stream) and a top-level DM (posted, then edited).
        await a.send.event(mention("killed in a thread", thread_ts))
        await a.send.event(message("killed in a dm", dm_ts, channel="D7", channel_type="im"))
        await _until(
            lambda: (
                fake_slack.calls_of("chat.startStream")
                and [
                    c
                    for c in fake_slack.calls_of("chat.postMessage")
                    if c.params["channel"] == "D7"
                ]
            ),
            15,
            "both replies to start",
        )
        first.kill(signal.SIGKILL)
        worker_process(env)
        await fake_slack.wait_for(
            lambda: (
                _final(fake_slack, "Echo: killed in a thread")
                and _final(fake_slack, "Echo: killed in a dm")
            ),
            timeout_s=JOB_TIMEOUT_S + 10 + 20,
        )
        await wait_jobs_done(redis, slack_settings, 60)  # nothing can be posted after this
    assert len(fake_slack.replies("C1")) == 1, "one message in the thread"
    assert len(fake_slack.replies("D7")) == 1, "one message in the DM"
    dm_posts = [c for c in fake_slack.calls_of("chat.postMessage") if c.params["channel"] == "D7"]
    assert len(dm_posts) == 1, "the re-run edits the message the killed worker posted"
    assert len(fake_slack.calls_of("chat.startStream")) == 1
    assert llm_sim.stats()["completions"] == 4, "two killed attempts and two answers"


@pytest.mark.slow
async def test_redis_stopped_slack_gets_an_error_status_and_the_redelivery_is_answered_once(
    valkey, valkey_settings, fake_slack, adapter, worker_process, tmp_path
):
    settings = valkey_settings.model_copy(
        update={
            "slack_bot_token": SecretStr(BOT_TOKEN),
            "slack_signing_secret": SecretStr(SIGNING_SECRET),
            "slack_api_url": fake_slack.url,
            "slack_edit_interval_s": 0.3,
        }
    )
    event = mention("sent while redis was down", _ts())
    async with adapter(settings) as a:
        valkey.stop()
        status, _ = await a.send.event(event, event_id="EvOUT")
        assert status >= 500, "not acked: Slack must deliver it again"
        async with a.http.get(a.base + "/healthz") as resp:
            assert resp.status == 503
        valkey.start()
        env = {**settings_env(settings)}
        proc = Proc(["worker"], {**_base(), **env}, tmp_path / "worker.log")
        try:
            proc.wait_for_output("worker ready", timeout_s=90)
            for retry in (1, 2):  # Slack retries; only the first redelivery is taken
                status = await _deliver_until_accepted(a, event, retry)
                assert status == 200
            await fake_slack.wait_for(
                lambda: _final(fake_slack, "Echo: sent while redis was down"), timeout_s=30
            )
            await asyncio.sleep(1.0)
        finally:
            proc.stop()
    assert len(_final(fake_slack, "Echo: sent while redis was down")) == 1


def _base() -> dict[str, str]:
    from tests.helpers import base_env

    return base_env()


async def _deliver_until_accepted(a, event, retry: int) -> int:
    for _ in range(100):  # the adapter's Redis client reconnects on its own
        status, _ = await a.send.event(event, event_id="EvOUT", retry_num=retry)
        if status == 200:
            return status
        await asyncio.sleep(0.1)
    return status


@pytest.mark.parametrize("error", ["channel_not_found", "is_archived"])
async def test_slack_reply_target_gone_ends_the_job_logs_the_channel_and_keeps_history(
    slack_settings, adapter, worker_process, fake_slack, llm_sim, redis, error
):
    worker = worker_process(settings_env(slack_settings))
    for method in ("chat.startStream", "chat.postMessage"):
        fake_slack.fail(method, status=200, error=error, times=1, retry_after_s=None)
    gone_ts = _ts()
    async with adapter(slack_settings) as a:
        await a.send.event(mention("into the void", gone_ts, channel="CGONE"))
        await _until(lambda: "reply not delivered" in worker.output(), 20, "the failure log")
        # No crash loop: the worker answers the next message elsewhere.
        await a.send.event(mention("still here", _ts(), channel="C2"))
        await fake_slack.wait_for(lambda: _final(fake_slack, "Echo: still here"), timeout_s=20)
        await wait_jobs_done(redis, slack_settings, 60)  # nothing can be posted after this
    log = worker.output()
    assert "channel=CGONE" in log and error in log
    assert worker.popen.poll() is None
    assert fake_slack.replies("CGONE") == []
    tries = [c for c in fake_slack.calls if c.params.get("channel") == "CGONE"]
    assert len(tries) <= 2, "one attempt to open the reply, no retry loop"
    assert llm_sim.stats()["completions"] == 2, "the job is not re-run"
    gone = IncomingMessage(
        platform="slack", tenant="T1", channel="CGONE", thread=gone_ts, user="U1",
        message_id=f"CGONE:{gone_ts}", text="",
    )  # fmt: skip
    stored = b"".join(
        await redis.lrange(Keys(slack_settings.key_prefix).history(gone.conversation_id), 0, -1)
    )
    assert b"into the void" in stored and b"Echo: into the void" in stored
    assert "Traceback" not in log, "an expected refusal, not a crash"


@pytest.fixture
async def discord_settings_e2e(settings: Settings, fake: DiscordFake) -> Settings:
    return settings.model_copy(
        update={
            "discord_token": SecretStr(fake.token),
            "discord_api_url": fake.api_url,
            "discord_stream_interval_s": 0.3,
        }
    )


@pytest.mark.parametrize(("status", "code"), [(404, "10003"), (400, "50083")])
async def test_discord_channel_gone_or_thread_archived_ends_the_job_and_keeps_history(
    fake: DiscordFake,
    discord_settings_e2e: Settings,
    worker_process,
    redis: Redis,
    llm_sim,
    status: int,
    code: str,
):
    worker = worker_process(settings_env(discord_settings_e2e))
    fake.fail("POST", rf"/channels/{CHANNEL}/messages$", status, times=100)
    async with discord_adapter(discord_settings_e2e, fake):
        sent = await fake.send_user_message(
            CHANNEL, DiscordFake.user(610000000000000077, "zed"), "deleted meanwhile",
            mention_bot=True,
        )  # fmt: skip
        await _until(lambda: f"status={status}" in worker.output(), 20, "the refusal log")
        await wait_jobs_done(redis, discord_settings_e2e, 60)  # nothing can be posted after this
    log = worker.output()
    assert f"channel={CHANNEL}" in log and code in log
    assert worker.popen.poll() is None
    assert len(fake.calls_to("POST", "/channels/{channel_id}/messages")) <= 2
    assert llm_sim.stats()["completions"] == 1
    msg = IncomingMessage(
        platform="discord", tenant=GUILD, channel=CHANNEL, thread="user:610000000000000077",
        user="x",
        message_id=sent["id"], text="",
    )  # fmt: skip
    key = Keys(discord_settings_e2e.key_prefix).history(msg.conversation_id)
    await _until(lambda: True, 1, "")
    deadline = time.monotonic() + 10
    while True:
        stored = b"".join(await redis.lrange(key, 0, -1))
        if b"Echo: deleted meanwhile" in stored or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert b"deleted meanwhile" in stored and b"Echo: deleted meanwhile" in stored


@pytest.mark.slow
async def test_discord_worker_sigkilled_mid_reply_answers_once_by_editing_its_message(
    fake: DiscordFake, discord_settings_e2e: Settings, worker_process, llm_sim, redis: Redis
):
    llm_sim.configure(tokens=30, token_latency_s=0.1)
    env = {**settings_env(discord_settings_e2e), "SLUICE_JOB_TIMEOUT_S": str(JOB_TIMEOUT_S)}
    first = worker_process(env)
    async with discord_adapter(discord_settings_e2e, fake):
        sent = await fake.send_user_message(
            CHANNEL, DiscordFake.user(610000000000000088, "kim"), "killed on discord",
            mention_bot=True,
        )  # fmt: skip
        await _until(lambda: fake.bot_messages(CHANNEL), 15, "the reply to be posted")
        first.kill(signal.SIGKILL)
        worker_process(env)

        def final() -> list[dict]:
            return [
                m
                for m in fake.bot_messages(CHANNEL)
                if (m.get("message_reference") or {}).get("message_id") == sent["id"]
                and m["content"].startswith("Echo: killed on discord")
                and not m["content"].endswith("…")
            ]

        await _until(lambda: final() and llm_sim.stats()["completions"] >= 2, 40, "the re-run")
        await wait_jobs_done(redis, discord_settings_e2e, 60)  # nothing can be posted after this
    assert len(fake.bot_messages(CHANNEL)) == 1, "the re-run edits the killed worker's message"
    posts = fake.calls_to("POST", "/channels/{channel_id}/messages")
    # When the kill lands between Discord creating the message and the worker saving
    # its id, the re-run posts again with the same nonce and Discord hands back the
    # same message (enforce_nonce): still one message for the user.
    assert 1 <= len(posts) <= 2
    assert len({p.body["nonce"] for p in posts}) == 1, [p.body for p in posts]
    assert llm_sim.stats()["completions"] == 2

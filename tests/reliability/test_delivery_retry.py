"""A finished reply the platform keeps refusing (429/5xx past the responder's own retries)
is kept, recorded in history at once and delivered again later, once, without a second
LLM call; when the platform never recovers the job gives up with one error line."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from bots.slack.format import safe_markdown
from bots.slack.responder import SERVER_ERROR_RETRIES
from core.history.hot import unpack_turn
from core.infra.redis import Keys
from core.messages import IncomingMessage, Turn
from core.settings import Settings
from core.traffic.control import GAVE_UP
from tests.discord.conftest import CHANNEL, GUILD, OTHER_CHANNEL
from tests.discord.conftest import running_adapter as discord_adapter
from tests.fakes.discord_fake import DiscordFake
from tests.fakes.slack_api import FakeSlackAPI
from tests.helpers import Proc, settings_env, wait_jobs_done
from tests.helpers import unique_slack_ts as _ts
from tests.helpers import wait_until as _until
from tests.slack.conftest import mention, message
from workers.delivery import backoff_s

# Small delivery backoff so that the tests stay fast.
FAST_RETRY = {"SLUICE_DELIVERY_RETRY_BASE_S": "0.2", "SLUICE_DELIVERY_RETRY_MAX_S": "1"}


async def _answers(redis: Redis, settings: Settings, msg: IncomingMessage) -> list[Turn]:
    """The assistant turns of ``msg`` in its conversation's hot window."""
    key = Keys(settings.key_prefix).history(msg.conversation_id)
    turns = [unpack_turn(r) for r in await redis.lrange(key, 0, -1)]
    return [t for t in turns if t.message_id == f"{msg.message_id}:answer"]


async def _wait_answers(
    redis: Redis, settings: Settings, msg: IncomingMessage, timeout_s: float = 10
) -> list[Turn]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = await _answers(redis, settings, msg)
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


def _lines(worker: Proc, needle: str) -> list[str]:
    return [line for line in worker.output().splitlines() if needle in line]


def test_backoff_doubles_honours_retry_after_and_is_capped(settings: Settings) -> None:
    s = settings.model_copy(update={"delivery_retry_base_s": 2.0, "delivery_retry_max_s": 60.0})
    assert [backoff_s(s, n) for n in (1, 2, 3, 4, 5, 6, 7)] == [2, 4, 8, 16, 32, 60, 60]
    assert backoff_s(s, 1, retry_after_s=9.0) == 9.0
    assert backoff_s(s, 1, retry_after_s=600.0) == 60.0


# --- Slack -------------------------------------------------------------------------------


def _slack_msg(ts: str, channel: str = "C1") -> IncomingMessage:
    return IncomingMessage(
        platform="slack", tenant="T1", channel=channel, thread=ts, user="U1",
        message_id=f"{channel}:{ts}", text="",
    )  # fmt: skip


async def test_slack_final_delivery_failing_past_retries_is_delivered_once_later(
    slack_settings: Settings,
    adapter,
    worker_process,
    fake_slack: FakeSlackAPI,
    llm_sim,
    redis: Redis,
) -> None:
    worker = worker_process({**settings_env(slack_settings), **FAST_RETRY})
    # Two jobs' worth of 500s on the stream's end, more than the responder retries.
    fake_slack.fail(
        "chat.stopStream",
        status=500,
        error="internal_error",
        retry_after_s=None,
        times=2 * (SERVER_ERROR_RETRIES + 1),
    )
    ts = _ts()
    async with adapter(slack_settings) as a:
        await a.send.event(mention("deliver me later", ts))
        await fake_slack.wait_for(
            lambda: [m for m in fake_slack.replies("C1") if not m.streaming], timeout_s=40
        )
        await wait_jobs_done(redis, slack_settings, 60)  # no later try can add a reply now
        [reply] = fake_slack.replies("C1")
        started_streams = len(fake_slack.calls_of("chat.startStream"))
        # A follow-up in the thread sees the answer once in its context.
        await a.send.event(mention("and then?", _ts(), thread_ts=ts))
        await fake_slack.wait_for(
            lambda: [m for m in fake_slack.replies("C1") if m.text.startswith("Echo: and then")],
            timeout_s=20,
        )
    assert len(_lines(worker, "reply not delivered yet")) == 2, worker.output()[-3000:]
    [answer] = await _answers(redis, slack_settings, _slack_msg(ts))
    assert answer.text.startswith("Echo: deliver me later")
    context = llm_sim.requests()[-1]["messages"]
    assert [m["content"] for m in context if m["role"] == "assistant"] == [answer.text]
    assert reply.text == safe_markdown(answer.text), "the whole answer, in the streamed message"
    assert reply.thread_ts == ts
    assert started_streams == 1
    assert not fake_slack.calls_of("chat.postMessage"), "no second message"
    assert llm_sim.stats()["completions"] == 2, "one per message: none for the retries"
    assert not await redis.exists(Keys(slack_settings.key_prefix).undelivered(_job(ts)))
    log = worker.output()
    assert GAVE_UP not in reply.text and "Traceback" not in log


def _job(ts: str, channel: str = "C1") -> str:
    return f"reply:slack:T1:{channel}:{ts}"


async def test_slack_platform_that_never_recovers_gives_up_loudly_and_keeps_history(
    slack_settings: Settings,
    adapter,
    worker_process,
    fake_slack: FakeSlackAPI,
    llm_sim,
    redis: Redis,
) -> None:
    worker = worker_process(
        {**settings_env(slack_settings), **FAST_RETRY, "SLUICE_DELIVERY_MAX_TRIES": "2"}
    )
    fake_slack.fail(
        "chat.stopStream", status=503, error="service_unavailable", retry_after_s=None, times=1000
    )
    ts = _ts()
    async with adapter(slack_settings) as a:
        await a.send.event(mention("never delivered", ts))
        await _until(lambda: _lines(worker, "reply given up"), 80, "the give-up log")
        # The worker goes on: a DM (posted and edited, no stream) is answered.
        await a.send.event(message("still here", _ts(), channel="D7", channel_type="im"))
        await fake_slack.wait_for(
            lambda: [
                m
                for m in fake_slack.replies("D7")
                if m.text.startswith("Echo: still here") and not m.streaming
            ],
            timeout_s=20,
        )
        await wait_jobs_done(redis, slack_settings, 60)  # no later try can add a reply now
    [line] = _lines(worker, "reply given up")
    assert "after 2 delivery attempts" in line
    for part in ("platform=slack", "tenant=T1", "channel=C1", f"message=C1:{ts}", _job(ts)):
        assert part in line, line
    assert "never delivered" not in line, "no message text in the log"
    assert " ERROR " in line or "ERROR" in line
    assert len(_lines(worker, "reply not delivered yet")) == 1
    assert worker.popen.poll() is None
    [answer] = await _answers(redis, slack_settings, _slack_msg(ts))
    assert answer.text.startswith("Echo: never delivered")
    assert not await redis.exists(Keys(slack_settings.key_prefix).undelivered(_job(ts)))
    assert llm_sim.stats()["completions"] == 2, "one per message, none for the retries"
    assert len(fake_slack.replies("C1")) == 1, "no apology or duplicate posted"


# --- Discord -----------------------------------------------------------------------------


@pytest.fixture
def discord_e2e(settings: Settings, fake: DiscordFake) -> Settings:
    # One streamed post, then the final edit; one REST retry per call.
    return settings.model_copy(
        update={
            "discord_token": SecretStr(fake.token),
            "discord_api_url": fake.api_url,
            "discord_stream_interval_s": 600.0,
            "discord_retries": 1,
        }
    )


def _discord_msg(sent: dict, user_id: int) -> IncomingMessage:
    return IncomingMessage(
        platform="discord", tenant=GUILD, channel=str(sent["channel_id"]),
        thread=f"user:{user_id}", user=str(user_id), message_id=sent["id"], text="",
    )  # fmt: skip


def _edits_of(channel: str) -> str:
    return rf"/channels/{channel}/messages/\d+$"


async def test_discord_final_edit_failing_past_retries_completes_the_same_message_later(
    fake: DiscordFake, discord_e2e: Settings, worker_process, llm_sim, redis: Redis
) -> None:
    worker = worker_process({**settings_env(discord_e2e), **FAST_RETRY})
    # Two jobs' worth of 503s on the final edit, more than the REST client retries.
    fake.fail("PATCH", _edits_of(CHANNEL), 503, times=2 * (discord_e2e.discord_retries + 1))
    user_id = 610000000000000101
    async with discord_adapter(discord_e2e, fake):
        sent = await fake.send_user_message(
            CHANNEL, DiscordFake.user(user_id, "ann"), "deliver me later", mention_bot=True
        )
        msg = _discord_msg(sent, user_id)

        def done() -> bool:
            return any(
                m["content"].startswith("Echo: deliver me later") and m.get("edits", 0) >= 1
                for m in fake.bot_messages(CHANNEL)
            )

        await _until(done, 80, "the final edit")
        await wait_jobs_done(redis, discord_e2e, 60)  # no later try can add a reply now
    assert len(_lines(worker, "reply not delivered yet")) == 2, worker.output()[-3000:]
    [answer] = await _wait_answers(redis, discord_e2e, msg)
    [posted] = fake.bot_messages(CHANNEL)
    assert posted["content"] == answer.text, "the whole answer, in the message posted first"
    assert posted["message_reference"]["message_id"] == sent["id"]
    assert len(fake.calls_to("POST", "/channels/{channel_id}/messages")) == 1
    patches = [c.status for c in fake.calls_to("PATCH", "/channels/{channel_id}/messages")]
    assert patches == [503, 503, 503, 503, 200]
    assert llm_sim.stats()["completions"] == 1
    assert not await redis.exists(Keys(discord_e2e.key_prefix).undelivered(msg.job_id))


async def test_discord_platform_that_never_recovers_gives_up_loudly_and_keeps_history(
    fake: DiscordFake, discord_e2e: Settings, worker_process, llm_sim, redis: Redis
) -> None:
    worker = worker_process(
        {**settings_env(discord_e2e), **FAST_RETRY, "SLUICE_DELIVERY_MAX_TRIES": "3"}
    )
    fake.fail("PATCH", _edits_of(CHANNEL), 500, times=1000)
    user_id = 610000000000000102
    async with discord_adapter(discord_e2e, fake):
        sent = await fake.send_user_message(
            CHANNEL, DiscordFake.user(user_id, "bo"), "never delivered", mention_bot=True
        )
        await _until(lambda: _lines(worker, "reply given up"), 80, "the give-up log")
        # The worker goes on: a message in another channel is answered.
        await fake.send_user_message(
            OTHER_CHANNEL, DiscordFake.user(user_id, "bo"), "still here", mention_bot=True
        )
        await _until(
            lambda: any(
                m["content"].startswith("Echo: still here") and m.get("edits", 0) >= 1
                for m in fake.bot_messages(OTHER_CHANNEL)
            ),
            20,
            "the next answer",
        )
    msg = _discord_msg(sent, user_id)
    [line] = _lines(worker, "reply given up")
    assert "after 3 delivery attempts" in line
    for part in ("platform=discord", f"tenant={GUILD}", f"channel={CHANNEL}", msg.job_id):
        assert part in line, line
    assert re.search(rf"message={sent['id']}\b", line)
    assert "never delivered" not in line and discord_e2e.discord_token is not None
    assert discord_e2e.discord_token.get_secret_value() not in worker.output()
    assert len(_lines(worker, "reply not delivered yet")) == 2
    assert worker.popen.poll() is None
    [answer] = await _wait_answers(redis, discord_e2e, msg)
    assert answer.text.startswith("Echo: never delivered")
    assert not await redis.exists(Keys(discord_e2e.key_prefix).undelivered(msg.job_id))
    assert llm_sim.stats()["completions"] == 2
    assert len(fake.bot_messages(CHANNEL)) == 1, "no apology or duplicate posted"

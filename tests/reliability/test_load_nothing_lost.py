"""Load with nothing lost: 1000 users on Slack and 1000 on Discord at once, through
``sluice slack`` and ``sluice discord`` processes and two ``sluice worker`` processes.
Every message is answered exactly once; the counts come from the fakes' records.

The fakes' rate limits are roomy (this is about losing nothing, not about pacing:
``tests/discord/test_load.py`` and ``tests/slack/test_slack_e2e.py`` test the limits).
Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr

from tests.fakes.discord_fake import DiscordFake
from tests.fakes.slack_api import EventSender, FakeSlackAPI
from tests.helpers import Proc, base_env, free_port, settings_env, wait_jobs_done, wait_port
from tests.slack.conftest import BOT_TOKEN, SIGNING_SECRET, message

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

USERS = 1000
GUILD = "100000000000000001"
CHANNELS = [str(200000000000000100 + i) for i in range(20)]


async def _send_slack(port: int, run: str) -> list[int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as http:
        send = EventSender(http, f"http://127.0.0.1:{port}/slack/events", SIGNING_SECRET)

        async def one(i: int) -> int:
            ts = f"{1_700_000_000 + i}.{int(run, 16) % 10**6:06d}"
            ev = message(
                f"slack {i} {run}", ts, channel=f"D{run}{i}", user=f"U{i}", channel_type="im"
            )
            for _ in range(50):
                status, _ = await send.event(ev, event_id=f"Ev{run}{i}")
                if status == 200:
                    return status
                await asyncio.sleep(0.2)  # as Slack would redeliver
            return status

        return await asyncio.gather(*[one(i) for i in range(USERS)])


async def _send_discord(fake: DiscordFake, run: str) -> list[dict]:
    sent = []
    for i in range(USERS):
        user = DiscordFake.user(630000000000000000 + i, f"user{i}")
        channel = CHANNELS[i % len(CHANNELS)]
        sent.append(
            await fake.send_user_message(channel, user, f"discord {i} {run}", mention_bot=True)
        )
    return sent


async def test_a_thousand_users_on_slack_and_a_thousand_on_discord_are_each_answered_once(
    settings, llm_sim, redis, tmp_path: Path
):
    llm_sim.configure(tokens=3, first_token_latency_s=0.01, token_latency_s=0.005)
    run = settings.key_prefix[-6:]
    fake_slack = FakeSlackAPI()
    fake_slack.add_token(BOT_TOKEN, "T1", bot_user_id="UBOT")
    await fake_slack.start()
    discord = DiscordFake(global_limit=1000)
    await discord.__aenter__()
    discord.add_guild(GUILD, channels=CHANNELS)
    discord.limits.update(
        {
            "POST /channels/{channel_id}/messages": (1000, 1.0),
            "PATCH /channels/{channel_id}/messages/{message_id}": (1000, 1.0),
        }
    )
    s = settings.model_copy(
        update={
            "slack_bot_token": SecretStr(BOT_TOKEN),
            "slack_signing_secret": SecretStr(SIGNING_SECRET),
            "slack_api_url": fake_slack.url,
            "slack_edit_interval_s": 0.2,
            "discord_token": SecretStr(discord.token),
            "discord_api_url": discord.api_url,
            "discord_stream_interval_s": 30.0,
            "discord_typing": False,
            "discord_global_rps": 50,
            "worker_poll_delay_s": 0.05,
        }
    )
    env = {**base_env(), **settings_env(s)}
    slack_port = free_port()
    procs = [Proc(["worker"], env, tmp_path / f"worker-{n}.log") for n in range(2)]
    procs.append(Proc(["slack", "--port", str(slack_port)], env, tmp_path / "slack.log"))
    procs.append(Proc(["discord"], env, tmp_path / "discord.log"))
    try:
        for proc in procs[:2]:
            proc.wait_for_output("worker ready", timeout_s=60)
        wait_port(slack_port)
        await asyncio.to_thread(procs[3].wait_for_output, "discord connected as", 60)
        started = time.monotonic()
        statuses, sent = await asyncio.gather(
            _send_slack(slack_port, run), _send_discord(discord, run)
        )
        sent_s = time.monotonic() - started
        assert statuses == [200] * USERS

        slack_re = re.compile(rf"Echo: slack (\d+) {run}")

        def slack_answers() -> Counter:
            return Counter(
                m.group(1)
                for r in fake_slack.replies()
                if not r.streaming and (m := slack_re.match(r.text))
            )

        def discord_answers() -> Counter:
            return Counter(
                (b.get("message_reference") or {}).get("message_id")
                for b in discord.bot_messages()
                if b["content"].startswith("Echo: discord")
            )

        deadline = time.monotonic() + 150
        while len(slack_answers()) < USERS or len(discord_answers()) < USERS:
            assert time.monotonic() < deadline, (
                f"slack {len(slack_answers())}/{USERS}, discord {len(discord_answers())}/{USERS}"
            )
            await asyncio.sleep(0.5)
        all_answered_s = time.monotonic() - started
        # Every job has ended: a late duplicate would be in the fakes' records now.
        await wait_jobs_done(redis, s, 60)
    finally:
        for proc in procs:
            proc.stop()
        await fake_slack.stop()
        await discord.__aexit__(None, None, None)

    slack, disc = slack_answers(), discord_answers()
    assert sorted(slack) == sorted(str(i) for i in range(USERS))
    assert set(slack.values()) == {1}, "no Slack message answered twice"
    assert len(fake_slack.replies()) == USERS
    assert len(fake_slack.calls_of("chat.postMessage")) == USERS
    assert set(disc) == {m["id"] for m in sent}
    assert set(disc.values()) == {1}, "no Discord message answered twice"
    assert len(discord.bot_messages()) == USERS
    for proc in procs:
        assert "Traceback" not in proc.log_path.read_text(), proc.log_path.name
    numbers = {
        "users_per_platform": USERS,
        "seconds_to_send_all": round(sent_s, 1),
        "seconds_until_all_answered": round(all_answered_s, 1),
        "slack_calls": len(fake_slack.calls),
        "discord_rest_calls": len(discord.calls),
        "llm_completions": llm_sim.stats()["completions"],
    }
    print("load nothing lost:", json.dumps(numbers))
    assert numbers["llm_completions"] == 2 * USERS

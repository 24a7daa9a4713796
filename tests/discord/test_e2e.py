"""End to end: discord.py adapter -> Redis queue -> a separate ``sluice worker`` -> fake REST.

The LLM is the simulator (answers start with ``Echo: <text>``); Discord is the fake
gateway and REST API. Each conversation kind gets exactly one reply, streamed by edits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from core.infra.redis import Keys
from core.messages import IncomingMessage
from core.settings import Settings
from tests.discord.conftest import CHANNEL, DM_CHANNEL, GUILD, ROLE, THREAD, running_adapter
from tests.fakes.discord_fake import DiscordFake
from tests.helpers import Proc, wait_jobs_done

ALICE = DiscordFake.user(610000000000000001, "alice")


@pytest.fixture
async def e2e_settings(settings: Settings, fake: DiscordFake) -> AsyncIterator[Settings]:
    """The harness's settings (simulator, unique prefix) pointed at the fake Discord."""
    _current[:] = [fake]
    yield settings.model_copy(
        update={
            "discord_token": SecretStr(fake.token),
            "discord_api_url": fake.api_url,
            "discord_stream_interval_s": 0.3,
        }
    )


@pytest.fixture
def discord_worker(
    worker_process: Callable[..., Proc], e2e_settings: Settings
) -> Callable[..., Proc]:
    """Start a real ``sluice worker`` with the Discord settings."""
    from tests.helpers import settings_env

    def start(**extra: str) -> Proc:
        return worker_process({**settings_env(e2e_settings), **extra})

    return start


async def replies(fake: DiscordFake, channel: str, reply_to: str) -> list[dict[str, Any]]:
    return [
        m
        for m in fake.bot_messages(channel)
        if (m.get("message_reference") or {}).get("message_id") == reply_to
    ]


_current: list[DiscordFake] = []


async def settled(redis: Redis, settings: Settings, timeout_s: float = 20.0) -> None:
    """Wait until none of this test's jobs is queued or running (workers idle): after
    that no reply can still arrive."""
    await wait_jobs_done(redis, settings, timeout_s)


def _contents() -> list[str]:
    return [m["content"][:60] for f in _current for m in f.bot_messages()]


async def until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; bot messages: {_contents()}")
        await asyncio.sleep(0.05)


async def test_mention_reply_dm_thread_and_ask_each_get_one_streamed_reply(
    fake: DiscordFake, e2e_settings: Settings, discord_worker: Callable[..., Proc], redis: Redis
) -> None:
    discord_worker()
    adapter_settings = e2e_settings.model_copy(update={"discord_message_content": True})
    async with running_adapter(adapter_settings, fake):
        mention = await fake.send_user_message(CHANNEL, ALICE, "first question", mention_bot=True)
        await until(lambda: len(fake.bot_messages(CHANNEL)) == 1)
        [answer] = fake.bot_messages(CHANNEL)
        reply = await fake.send_user_message(CHANNEL, ALICE, "follow up", reply_to=answer)
        dm = await fake.dm_channel(DM_CHANNEL, ALICE)
        direct = await fake.send_user_message(dm, ALICE, "private question")
        in_thread = await fake.send_user_message(THREAD, ALICE, "thread question")
        inter = await fake.invoke_ask(CHANNEL, ALICE, "slash question")
        expected = [
            "first question",
            "follow up",
            "private question",
            "thread question",
            "slash question",
        ]
        await until(
            lambda: all(
                any(m["content"].startswith(f"Echo: {e}") for m in fake.bot_messages())
                for e in expected
            )
        )
        await settled(redis, e2e_settings)  # nothing else can arrive after this

    for channel, sent, text in [
        (CHANNEL, mention, "first question"),
        (CHANNEL, reply, "follow up"),
        (DM_CHANNEL, direct, "private question"),
        (THREAD, in_thread, "thread question"),
    ]:
        [got] = await replies(fake, channel, sent["id"])
        assert got["content"].startswith(f"Echo: {text}")
        assert len(got["edit_history"]) > 1, "streamed by edits"
    assert inter.callback_type == 5  # the fake, like Discord, refuses a callback after 3 s
    assert len(inter.original["edit_history"]) > 1
    assert inter.followups == []
    assert len(fake.bot_messages()) == 5  # 4 replies + the /ask response, nothing more


async def test_same_message_delivered_twice_gets_one_reply(
    fake: DiscordFake,
    e2e_settings: Settings,
    discord_worker: Callable[..., Proc],
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bots.discord.intake")
    discord_worker()

    def duplicates() -> int:
        line = f"discord duplicate message={sent['id']} "
        return sum(line in r.getMessage() for r in caplog.records)

    async with running_adapter(e2e_settings, fake):
        sent = await fake.send_user_message(CHANNEL, ALICE, "only once", mention_bot=True)
        await fake.dispatch("MESSAGE_CREATE", sent)
        await until(lambda: duplicates() == 1)
        await until(lambda: len(fake.bot_messages(CHANNEL)) == 1)
        await settled(redis, e2e_settings)
        await fake.dispatch("MESSAGE_CREATE", sent)  # a late replay after a resume
        await until(lambda: duplicates() == 2)
        await settled(redis, e2e_settings)
    assert len(fake.bot_messages(CHANNEL)) == 1


async def test_model_output_with_everyone_and_role_mentions_pings_nobody(
    fake: DiscordFake, e2e_settings: Settings, discord_worker: Callable[..., Proc], redis: Redis
) -> None:
    discord_worker()
    async with running_adapter(e2e_settings, fake):
        await fake.send_user_message(
            CHANNEL, ALICE, f"@everyone <@&{ROLE}> <@{ALICE['id']}>", mention_bot=True
        )
        await until(
            lambda: any(f"<@{ALICE['id']}>" in m["content"] for m in fake.bot_messages(CHANNEL))
        )
        await settled(redis, e2e_settings)
    [got] = fake.bot_messages(CHANNEL)
    assert f"<@&{ROLE}>" in got["content"]
    sends = [
        c
        for c in fake.calls
        if c.method in ("POST", "PATCH")
        and c.route.endswith(("/messages", "/messages/{message_id}"))
    ]
    assert sends and all(c.body["allowed_mentions"] == {"parse": []} for c in sends)


async def test_403_and_5xx_on_send_worker_logs_keeps_running_and_keeps_history(
    fake: DiscordFake, e2e_settings: Settings, discord_worker: Callable[..., Proc], redis: Redis
) -> None:
    worker = discord_worker()
    fake.fail("POST", rf"/channels/{CHANNEL}/messages$", 403, times=100)
    async with running_adapter(e2e_settings, fake):
        refused = await fake.send_user_message(
            CHANNEL, ALICE, "no permission here", mention_bot=True
        )
        await until(lambda: "status=403" in worker.output())
        assert len(fake.calls_to("POST", "/channels/{channel_id}/messages")) == 1  # no retry
        fake._faults.clear()
        fake.fail("POST", rf"/channels/{CHANNEL}/messages$", 503, times=2)
        ok = await fake.send_user_message(CHANNEL, ALICE, "after the outage", mention_bot=True)
        await until(
            lambda: any(
                m["content"].startswith("Echo: after the outage")
                for m in fake.bot_messages(CHANNEL)
            )
        )
        await settled(redis, e2e_settings)
    log = worker.output()
    assert f"channel={CHANNEL}" in log and "status=403" in log
    statuses = [c.status for c in fake.calls_to("POST", "/channels/{channel_id}/messages")]
    assert statuses.count(503) == 2 and statuses[-1] == 200
    assert worker.popen.poll() is None  # the worker keeps running
    msg = IncomingMessage(
        platform="discord",
        tenant=GUILD,
        channel=CHANNEL,
        thread=f"user:{ALICE['id']}",
        user="x",
        message_id=refused["id"],
        text="",
    )
    key = Keys(e2e_settings.key_prefix).history(msg.conversation_id)
    deadline = time.monotonic() + 10
    while True:  # the job stores history right after delivering
        stored = b"".join(await redis.lrange(key, 0, -1))
        if b"after the outage" in stored or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert b"no permission here" in stored and b"after the outage" in stored
    assert ok["id"].encode() in stored


async def test_existing_commands_bot_loads_the_extension_and_both_work(
    fake: DiscordFake,
    e2e_settings: Settings,
    discord_worker: Callable[..., Proc],
    monkeypatch: pytest.MonkeyPatch,
    redis: Redis,
) -> None:
    import discord
    import yarl
    from discord.ext import commands

    from core.settings import get_settings
    from tests.helpers import settings_env

    discord_worker()
    for key, value in settings_env(e2e_settings).items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    discord.http.Route.BASE = fake.api_url
    monkeypatch.setattr(
        discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url)
    )
    intents = discord.Intents.default()
    intents.message_content = True
    bot = commands.Bot(command_prefix="!", intents=intents)
    pings: list[str] = []

    @bot.command()
    async def ping(ctx: commands.Context[commands.Bot]) -> None:
        pings.append(ctx.author.name)
        await ctx.send("pong")

    async def setup_hook() -> None:
        await bot.load_extension("bots.discord.cog")

    bot.setup_hook = setup_hook  # type: ignore[method-assign]
    task = asyncio.create_task(bot.start(fake.token))
    try:
        await asyncio.wait_for(bot.wait_until_ready(), 10)
        assert "Sluice" in bot.cogs and bot.tree.get_command("ask") is not None
        await fake.send_user_message(CHANNEL, ALICE, "!ping")
        asked = await fake.send_user_message(
            CHANNEL, ALICE, "hello from a host bot", mention_bot=True
        )
        await until(
            lambda: any(
                m["content"].startswith("Echo: hello from a host bot")
                for m in fake.bot_messages(CHANNEL)
            )
        )
        await until(lambda: any(m["content"] == "pong" for m in fake.bot_messages(CHANNEL)))
        await settled(redis, e2e_settings)
    finally:
        await bot.close()
        await task
        get_settings.cache_clear()
    assert pings == ["alice"]
    contents = sorted(m["content"].split(":")[0] for m in fake.bot_messages(CHANNEL))
    assert contents == ["Echo", "pong"]  # "!ping" was not sent to the model
    assert len(await replies(fake, CHANNEL, asked["id"])) == 1


async def test_sluice_discord_and_sluice_worker_processes_answer_a_mention(
    fake: DiscordFake,
    e2e_settings: Settings,
    discord_worker: Callable[..., Proc],
    tmp_path: Any,
    redis: Redis,
) -> None:
    from tests.helpers import base_env, settings_env

    discord_worker()
    adapter = Proc(
        ["discord"], {**base_env(), **settings_env(e2e_settings)}, tmp_path / "discord.log"
    )
    try:
        await asyncio.to_thread(adapter.wait_for_output, "discord connected as")
        sent = await fake.send_user_message(CHANNEL, ALICE, "via processes", mention_bot=True)
        await until(
            lambda: any(
                m["content"].startswith("Echo: via processes") for m in fake.bot_messages(CHANNEL)
            )
        )
        await settled(redis, e2e_settings)
    finally:
        code = await asyncio.to_thread(adapter.stop)
    log = adapter.log_path.read_text()
    assert code == 0, log[-3000:]  # SIGTERM: a clean shutdown
    assert len(await replies(fake, CHANNEL, sent["id"])) == 1
    assert fake.token not in log


async def test_invite_url_reads_the_application_id_from_the_api(
    fake: DiscordFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from core.settings import get_settings
    from sluice.cli import main

    monkeypatch.setenv("DISCORD_TOKEN", fake.token)
    monkeypatch.setenv("DISCORD_API_URL", fake.api_url)
    get_settings.cache_clear()
    try:
        result = await asyncio.to_thread(CliRunner().invoke, main, ["discord", "--invite-url"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    url = result.output.strip()
    assert url.startswith("https://discord.com/oauth2/authorize?")
    assert f"client_id={fake.application_id}" in url
    assert "scope=bot+applications.commands" in url and "permissions=309237713920" in url

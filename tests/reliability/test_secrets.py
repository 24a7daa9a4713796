"""Secrets kept: with every token and key set to a distinctive value, a full run (web,
Slack and Discord answered, the model down for a while, a forged Slack request, a
delivery refused, a flush to SQL) leaves none of them in any process's output (logs,
tracebacks, library warnings: the whole stdout/stderr, not only what ``core.infra.logs``
filters), in any reply, in the SQL file, in Redis or in ``/metrics``.

OAuth tokens encrypted at rest: ``tests/slack/test_slack_installations.py``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr
from redis.asyncio import Redis

from core.history.store import count_rows, make_engine
from tests.discord.conftest import CHANNEL, GUILD
from tests.fakes.discord_fake import DiscordFake
from tests.fakes.slack_api import EventSender, FakeSlackAPI
from tests.helpers import Proc, base_env, free_port, settings_env, wait_port
from tests.helpers import wait_until as _until
from tests.slack.conftest import mention
from tests.webchat import ChatSession

pytestmark = pytest.mark.slow


def _secret(kind: str) -> str:
    return f"{kind}SECRET{uuid.uuid4().hex}"


async def _redis_dump(redis: Redis) -> bytes:
    """Every key name and value in Redis (strings, hashes, lists, sets, zsets, streams)."""
    out: list[bytes] = []
    async for key in redis.scan_iter(count=1000):
        out.append(key)
        kind = (await redis.type(key)).decode()
        if kind == "string":
            out.append(await redis.get(key) or b"")
        elif kind == "hash":
            for k, v in (await redis.hgetall(key)).items():
                out += [k, v]
        elif kind == "list":
            out += await redis.lrange(key, 0, -1)
        elif kind == "set":
            out += list(await redis.smembers(key))
        elif kind == "zset":
            out += [m for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for _, fields in await redis.xrange(key):
                for k, v in fields.items():
                    out += [k, v]
    return b"\n".join(out)


PG = "127.0.0.1:5432/test"


async def _sql_dump(s) -> bytes:
    """Every row of every table: the SQLite files' bytes, or the Postgres schema's rows."""
    if s.database_url.startswith("sqlite"):
        db_path = Path(s.database_url.removeprefix("sqlite:///"))
        return b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "*"))
    import asyncpg

    conn = await asyncpg.connect(f"postgresql://postgres@{PG}", timeout=5)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
            s.db_schema,
        )
        rows = []
        for t in tables:
            rows += await conn.fetch(f'SELECT * FROM "{s.db_schema}"."{t["table_name"]}"')
        return "\n".join(str(dict(r)) for r in rows).encode()
    finally:
        await conn.close()


async def _drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(f"postgresql://postgres@{PG}", timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_no_token_or_key_appears_in_logs_replies_sql_or_redis(
    settings, llm_sim, redis, tmp_path: Path, db
):
    from tests.history.conftest import postgres_reachable

    if db == "postgres" and not postgres_reachable():
        pytest.skip(f"Postgres not reachable at {PG}")
    secrets = {
        "OPENAI_API_KEY": "sk-" + _secret("openai"),
        "SLACK_BOT_TOKEN": "xoxb-" + _secret("slackbot"),
        "SLACK_SIGNING_SECRET": _secret("signing"),
        "SLACK_CLIENT_SECRET": _secret("client"),
        "DISCORD_TOKEN": _secret("discord"),
        "SLUICE_ENCRYPTION_KEY": Fernet.generate_key().decode(),
    }
    db_update: dict[str, str] = {}
    if db == "postgres":
        secrets["DATABASE_URL password"] = _secret("pgpass")
        db_update = {
            "database_url": f"postgresql://postgres:{secrets['DATABASE_URL password']}@{PG}",
            "db_schema": f"t_{uuid.uuid4().hex[:12]}",
        }
    fake_slack = FakeSlackAPI()
    fake_slack.add_token(secrets["SLACK_BOT_TOKEN"], "T1", bot_user_id="UBOT")
    await fake_slack.start()
    discord = DiscordFake(token=secrets["DISCORD_TOKEN"])
    await discord.__aenter__()
    discord.add_guild(GUILD, channels=[CHANNEL])
    s = settings.model_copy(
        update={
            "openai_api_key": SecretStr(secrets["OPENAI_API_KEY"]),
            "slack_bot_token": SecretStr(secrets["SLACK_BOT_TOKEN"]),
            "slack_signing_secret": SecretStr(secrets["SLACK_SIGNING_SECRET"]),
            "slack_client_secret": SecretStr(secrets["SLACK_CLIENT_SECRET"]),
            "slack_api_url": fake_slack.url,
            "discord_token": SecretStr(secrets["DISCORD_TOKEN"]),
            "discord_api_url": discord.api_url,
            "encryption_key": SecretStr(secrets["SLUICE_ENCRYPTION_KEY"]),
            "history_flush_interval_s": 1,
            "history_compress_min_bytes": 10_000_000,  # plain values, so a grep can see them
            "log_level": "DEBUG",
            **db_update,
        }
    )
    env = {**base_env(), **settings_env(s)}
    for name, value in secrets.items():
        assert value in env[name.split()[0]], name
    procs: list[Proc] = []
    try:
        metrics_port = free_port()
        worker = Proc(
            ["worker"], {**env, "SLUICE_METRICS_PORT": str(metrics_port)}, tmp_path / "worker.log"
        )
        procs.append(worker)
        slack_port, web_port = free_port(), free_port()
        procs.append(Proc(["slack", "--port", str(slack_port)], env, tmp_path / "slack.log"))
        procs.append(Proc(["web", "--port", str(web_port)], env, tmp_path / "web.log"))
        procs.append(Proc(["discord"], env, tmp_path / "discord.log"))
        worker.wait_for_output("worker ready", timeout_s=90)
        wait_port(slack_port)
        wait_port(web_port)
        await asyncio.to_thread(procs[-1].wait_for_output, "discord connected as")
        async with aiohttp.ClientSession() as http:
            # Slack: an answer, and a forged request.
            send = EventSender(
                http, f"http://127.0.0.1:{slack_port}/slack/events", secrets["SLACK_SIGNING_SECRET"]
            )
            assert (await send.event(mention("slack question", f"{int(time.time())}.1")))[0] == 200
            forged = EventSender(http, send.url, "wrong-secret")
            assert (await forged.event(mention("forged", f"{int(time.time())}.2")))[0] == 401
            # Discord: an answer, and a reply the channel refuses (403).
            await discord.send_user_message(
                CHANNEL, DiscordFake.user(610000000000000099, "ann"), "discord question",
                mention_bot=True,
            )  # fmt: skip
            # Web: an answer, then the model down (an apology), then the model back.
            async with ChatSession(http, f"http://127.0.0.1:{web_port}") as tab:
                web_done = await tab.reply(await tab.send("web question"), timeout_s=30)
                llm_sim.configure(mode="down")
                down = await tab.reply(await tab.send("while the model is down"), timeout_s=30)
                llm_sim.configure(mode="normal")
            discord.fail("POST", rf"/channels/{CHANNEL}/messages$", 403, times=5)
            await discord.send_user_message(
                CHANNEL, DiscordFake.user(610000000000000099, "ann"), "refused question",
                mention_bot=True,
            )  # fmt: skip
        await fake_slack.wait_for(
            lambda: [m for m in fake_slack.replies() if m.text.startswith("Echo: slack question")],
            20,
        )
        await _until(
            lambda: any(
                m["content"].startswith("Echo: discord question")
                for m in discord.bot_messages(CHANNEL)
            ),
            20,
            "the discord answer",
        )
        await _until(lambda: "status=403" in worker.output(), 20, "the refused delivery")
        assert web_done["kind"] == "answer" and down["kind"] == "error"
        metrics = b""
        async with aiohttp.ClientSession() as http:
            for url in (
                f"http://127.0.0.1:{metrics_port}/metrics",
                f"http://127.0.0.1:{slack_port}/metrics",
                f"http://127.0.0.1:{web_port}/metrics",
            ):
                async with http.get(url) as resp:
                    assert resp.status == 200, url
                    metrics += await resp.read()
        assert b"sluice_" in metrics
        engine = make_engine(s)
        try:
            deadline = time.monotonic() + 30
            while (await count_rows(engine))[0] < 8:
                assert time.monotonic() < deadline, "history not flushed to SQL"
                await asyncio.sleep(0.3)
        finally:
            await engine.dispose()
    finally:
        for proc in procs:
            proc.stop()
        await fake_slack.stop()
        await discord.__aexit__(None, None, None)

    places: dict[str, bytes] = {
        proc.log_path.name: proc.log_path.read_bytes() for proc in procs
    }  # fmt: skip
    places["slack replies"] = "\n".join(
        str(c.params) for c in fake_slack.calls if c.method != "auth.test"
    ).encode()
    places["discord replies"] = "\n".join(
        str(c.body) for c in discord.calls if c.body is not None
    ).encode()
    places["web replies"] = str(tab.events).encode()
    try:
        places["sql"] = await _sql_dump(s)
    finally:
        if db == "postgres":
            await _drop_schema(s.db_schema)
    places["redis"] = await _redis_dump(redis)
    places["metrics"] = metrics
    assert b"slack question" in places["sql"] and b"web question" in places["redis"]
    leaks = [
        f"{name} in {where}"
        for name, value in secrets.items()
        for where, blob in places.items()
        if value.encode() in blob
    ]
    assert not leaks, leaks

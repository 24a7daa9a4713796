"""No secret in any trace: a full conversation with known secrets everywhere, then a
grep of everything that lasts or is shown for each of them.

Set up with distinctive values: the OpenAI key, Slack's signing and client secrets,
the encryption key, the Discord bot token, a password on Redis (an ACL user created
for the test), a password in ``DATABASE_URL`` (Postgres, which ``sluice dev`` prints),
a workspace token issued by the OAuth install, the Discord ``/ask`` interaction
tokens, and a tool that fails with a DSN password and an API key in its exception.

Processes: ``sluice dev`` (web chat, worker, flush, the Slack adapter) and ``sluice
discord``, at DEBUG. Then none of the secrets may appear in: any process's output
(all of stdout and stderr), ``sluice status`` and ``sluice status --json``, any key
name or value in Redis under the test's prefix (arq's jobs and results included), the
history rows in SQL, the model's requests, or anything sent to a user (web events,
Slack and Discord calls). Unit-level checks: ``test_redaction.py``,
``test_tool_errors.py``, ``test_interaction_tokens.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr
from redis.asyncio import Redis

from core.history.store import count_rows, make_engine
from core.settings import Settings
from tests.discord.conftest import CHANNEL, GUILD
from tests.fakes.discord_fake import DiscordFake
from tests.fakes.slack_api import EventSender, FakeSlackAPI
from tests.helpers import ROOT, Proc, base_env, free_port, settings_env, wait_port, wait_until
from tests.reliability.test_secrets import PG, _drop_schema, _sql_dump
from tests.reliability.test_tool_errors import BOT, _prefix_dump
from tests.slack.conftest import mention
from tests.webchat import ChatSession

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

TEAM = f"TS{uuid.uuid4().hex[:8].upper()}"
ANN = DiscordFake.user(610000000000000077, "ann")


def _secret(kind: str) -> str:
    return f"{kind}SECRET{uuid.uuid4().hex}"


def _with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port or 6379}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _status(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "sluice", "status", *args],
        env={**env, "COLUMNS": "200"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


async def _install(http: aiohttp.ClientSession, base: str, fake: FakeSlackAPI) -> str:
    """The OAuth install of workspace ``TEAM``; returns the bot token Slack issued."""
    async with http.get(base + "/slack/install", allow_redirects=False) as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
        cookie = resp.headers["Set-Cookie"].split(";")[0]
    found = re.search(r"state=([^&]+)", location)
    assert found is not None
    fake.add_oauth_code("code-secret-test", TEAM, bot_user_id="UBOT")
    async with http.get(
        base + f"/slack/oauth_redirect?code=code-secret-test&state={found.group(1)}",
        headers={"Cookie": cookie},
    ) as resp:
        assert resp.status == 200, await resp.text()
    return [t for t, info in fake.tokens.items() if info.team_id == TEAM][-1]


async def _forget_installation() -> None:
    import asyncpg

    conn = await asyncpg.connect(f"postgresql://postgres@{PG}", timeout=5)
    try:
        if await conn.fetchval("SELECT to_regclass('slack_installations')") is not None:
            await conn.execute("DELETE FROM slack_installations WHERE team_id = $1", TEAM)
    finally:
        await conn.close()


async def _wait_for_sql_rows(s: Settings, rows: int, timeout_s: float = 60) -> None:
    engine = make_engine(s)
    try:
        deadline = time.monotonic() + timeout_s
        while (await count_rows(engine))[0] < rows:
            assert time.monotonic() < deadline, "history not flushed to SQL"
            await asyncio.sleep(0.3)
    finally:
        await engine.dispose()


async def test_no_secret_in_logs_status_redis_sql_model_requests_or_replies(
    settings: Settings, llm_sim, redis: Redis, tmp_path: Path
):
    from tests.history.conftest import postgres_reachable

    if not postgres_reachable():
        pytest.skip(f"Postgres not reachable at {PG}")
    secrets = {
        "OPENAI_API_KEY": "sk-" + _secret("openai"),
        "SLACK_SIGNING_SECRET": _secret("signing"),
        "SLACK_CLIENT_SECRET": _secret("client"),
        "SLUICE_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "DISCORD_TOKEN": _secret("discord"),
        "REDIS_URL password": _secret("redispw"),
        "DATABASE_URL password": _secret("pgpw"),
        "tool DSN password": _secret("toolpw"),
        "tool API key": _secret("toolkey"),
    }
    redis_user = f"sluice_test_{uuid.uuid4().hex[:10]}"
    await redis.execute_command(
        "ACL", "SETUSER", redis_user, "on", f">{secrets['REDIS_URL password']}",
        "~*", "&*", "+@all",
    )  # fmt: skip
    fake_slack = FakeSlackAPI(
        client_id="cid-secret-test", client_secret=secrets["SLACK_CLIENT_SECRET"]
    )
    await fake_slack.start()
    discord = DiscordFake(token=secrets["DISCORD_TOKEN"])
    await discord.__aenter__()
    discord.add_guild(GUILD, channels=[CHANNEL])
    web_port, slack_port = free_port(), free_port()
    s = settings.model_copy(
        update={
            "redis_url": _with_user(
                settings.redis_url or "", redis_user, secrets["REDIS_URL password"]
            ),
            "database_url": f"postgresql://postgres:{secrets['DATABASE_URL password']}@{PG}",
            "db_schema": f"t_{uuid.uuid4().hex[:12]}",
            "openai_api_key": SecretStr(secrets["OPENAI_API_KEY"]),
            "slack_signing_secret": SecretStr(secrets["SLACK_SIGNING_SECRET"]),
            "slack_client_id": fake_slack.client_id,
            "slack_client_secret": SecretStr(secrets["SLACK_CLIENT_SECRET"]),
            "slack_api_url": fake_slack.url,
            "slack_port": slack_port,
            "encryption_key": SecretStr(secrets["SLUICE_ENCRYPTION_KEY"]),
            "discord_token": SecretStr(secrets["DISCORD_TOKEN"]),
            "discord_api_url": discord.api_url,
            "history_flush_interval_s": 1,
            "history_compress_min_bytes": 10_000_000,  # plain values, so a grep can see them
            "log_level": "DEBUG",
        }
    )
    dsn = f"postgresql://orders:{secrets['tool DSN password']}@db-primary.internal:5432/orders"
    env = {
        **base_env(),
        **settings_env(s),
        "SLUICE_APP": BOT,
        "TEST_ORDERS_DSN": dsn,
        "TEST_ORDERS_API_KEY": secrets["tool API key"],
    }
    procs: list[Proc] = []
    statuses: dict[str, str] = {}
    interactions = []
    try:
        dev = Proc(["dev", "--port", str(web_port)], env, tmp_path / "dev.log")
        procs.append(dev)
        adapter = Proc(["discord"], env, tmp_path / "discord.log")
        procs.append(adapter)
        dev.wait_for_output("Open http://", timeout_s=60)
        assert "database: postgresql://postgres:***@" in dev.output()  # the banner, masked
        await asyncio.to_thread(adapter.wait_for_output, "discord connected as", 60)
        wait_port(slack_port)
        async with aiohttp.ClientSession() as http:
            slack_base = f"http://127.0.0.1:{slack_port}"
            secrets["workspace token"] = await _install(http, slack_base, fake_slack)
            send = EventSender(http, slack_base + "/slack/events", secrets["SLACK_SIGNING_SECRET"])
            question = 'slack order? [[tool:order_status {"order": "S-1"}]]'
            status, _ = await send.event(mention(question, f"{int(time.time())}.1"), team_id=TEAM)
            assert status == 200
            forged = EventSender(http, send.url, "wrong-secret")
            forged_status, _ = await forged.event(
                mention("forged", f"{int(time.time())}.2"), team_id=TEAM
            )
            assert forged_status == 401
            interactions.append(
                await discord.invoke_ask(
                    CHANNEL, ANN, 'discord order? [[tool:order_status {"order": "D-1"}]]'
                )
            )
            await discord.send_user_message(CHANNEL, ANN, "discord question", mention_bot=True)
            async with ChatSession(http, f"http://127.0.0.1:{web_port}") as tab:
                web_done = await tab.reply(
                    await tab.send('web order? [[tool:order_status {"order": "W-1"}]]'),
                    timeout_s=60,
                )
                # Every platform's answer is out before the model goes down (a job still
                # waiting in line would get the apology instead).
                await fake_slack.wait_for(
                    lambda: [
                        m for m in fake_slack.replies() if m.text.startswith("Echo: slack order?")
                    ],
                    60,
                )
                inter = interactions[0]
                await wait_until(
                    lambda: (
                        inter.original is not None
                        and str(inter.original.get("content", "")).startswith(
                            "Echo: discord order?"
                        )
                    ),
                    60,
                    "the /ask answer",
                )
                await wait_until(
                    lambda: any(
                        m["content"].startswith("Echo: discord question")
                        for m in discord.bot_messages(CHANNEL)
                    ),
                    60,
                    "the discord answer",
                )
                llm_sim.configure(mode="down")
                down = await tab.reply(await tab.send("while the model is down"), timeout_s=60)
                llm_sim.configure(mode="normal")
        assert web_done["kind"] == "answer" and down["kind"] == "error"
        [slack_reply] = [m for m in fake_slack.replies() if m.text.startswith("Echo: slack order?")]
        assert slack_reply.token == secrets["workspace token"]  # answered with the installed token
        secrets["interaction token"] = inter.token
        # The three failing tool calls are in the log, as masked tracebacks.
        await wait_until(lambda: dev.output().count("tool order_status raised") >= 3, 30, "logs")
        assert "postgresql://orders:***@db-primary.internal:5432/orders" in dev.output()
        await _wait_for_sql_rows(s, 9)  # the flusher wrote the history (tool turns too)
        statuses["sluice status"] = await asyncio.to_thread(_status, env)
        statuses["sluice status --json"] = await asyncio.to_thread(_status, env, "--json")
        assert "Queue" in statuses["sluice status --json"]
    finally:
        for proc in procs:
            proc.stop()
        await fake_slack.stop()
        await discord.__aexit__(None, None, None)
        await redis.execute_command("ACL", "DELUSER", redis_user)

    places: dict[str, bytes] = {p.log_path.name: p.log_path.read_bytes() for p in procs}
    places.update({name: out.encode() for name, out in statuses.items()})
    places["redis"] = await _prefix_dump(redis, s.key_prefix)
    try:
        places["sql history"] = await _sql_dump(s)
    finally:
        await _drop_schema(s.db_schema)
        await _forget_installation()
    places["model requests"] = json.dumps(llm_sim.requests()).encode()
    places["web replies"] = json.dumps(tab.events).encode()
    # What Slack shows users (oauth.v2.access carries the client secret to Slack, as it must).
    assert fake_slack.calls_of("oauth.v2.access")
    places["slack calls"] = "\n".join(
        str(c.params) for c in fake_slack.calls if c.method not in ("auth.test", "oauth.v2.access")
    ).encode()
    places["discord calls"] = "\n".join(
        f"{c.route} {c.body}" for c in discord.calls if c.body is not None
    ).encode()
    # The grep can see what it looks for: each place holds this run's traffic.
    assert b"order_status" in places["redis"] and b"web order?" in places["model requests"]
    assert b"arq:result:" in places["redis"]  # arq's job results are in the grep
    assert b"Echo: discord order?" in places["discord calls"]
    leaks = [
        f"{name} in {where}"
        for name, value in secrets.items()
        for where, blob in places.items()
        if value.encode() in blob
    ]
    assert not leaks, leaks

"""Multi-workspace installs: a key is required, keys rotate, plain-text rows are refused,
and unauthenticated ``GET /slack/install`` requests cannot fill Redis."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
import time

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr
from redis.asyncio import Redis
from slack_sdk.oauth.installation_store import Installation

from bots.slack.app import build_app
from bots.slack.installations import (
    InstallRefused,
    RedisOAuthStateStore,
    SQLInstallationStore,
    reencrypt,
)
from core.errors import ConfigError
from core.infra.redis import Keys
from core.settings import Settings
from tests.helpers import base_env, settings_env
from tests.slack.conftest import BOT_USER, mention, queued_messages


def new_key() -> str:
    return Fernet.generate_key().decode()


def keyed(settings: Settings, *keys: str) -> Settings:
    return settings.model_copy(update={"encryption_key": SecretStr(",".join(keys))})


def installation(team: str, token: str) -> Installation:
    return Installation(
        team_id=team, bot_token=token, bot_id="B1", bot_user_id=BOT_USER, user_id="U1"
    )


def stored_token(settings: Settings, team: str) -> str:
    with sqlite3.connect(settings.database_url.removeprefix("sqlite:///")) as conn:
        [(token,)] = conn.execute(
            "select bot_token from slack_installations where team_id = ?", (team,)
        ).fetchall()
    return str(token)


def run_sluice(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``sluice ARGS`` in a subprocess with the settings' environment."""
    env = {**base_env(), **settings_env(settings)}
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- an encryption key is required in multi-workspace mode ------------------------------


async def test_multi_workspace_without_an_encryption_key_refuses_to_start(oauth_settings):
    no_key = oauth_settings.model_copy(update={"encryption_key": None})
    with pytest.raises(ConfigError) as e:
        await build_app(no_key)
    message = str(e.value)
    assert "SLUICE_ENCRYPTION_KEY" in message
    assert "sluice slack genkey" in message and "Fernet.generate_key()" in message


def test_sluice_slack_without_a_key_exits_with_the_fix(oauth_settings):
    no_key = oauth_settings.model_copy(update={"encryption_key": None, "slack_port": 0})
    done = run_sluice(no_key, "slack", "--host", "127.0.0.1")
    assert done.returncode == 2, done.stderr
    assert "SLUICE_ENCRYPTION_KEY is not set" in done.stderr
    assert "sluice slack genkey" in done.stderr
    assert "Traceback" not in done.stderr


def test_genkey_prints_a_key_the_store_accepts(settings):
    done = run_sluice(settings, "slack", "genkey")
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    Fernet(key.encode())  # raises if it is not a Fernet key
    SQLInstallationStore(keyed(settings, key))


def test_a_malformed_key_in_the_list_names_which_one(settings):
    with pytest.raises(ConfigError, match="key 2 of 2 is not a Fernet key"):
        SQLInstallationStore(keyed(settings, new_key(), "not-a-key"))


async def test_single_workspace_mode_needs_no_key(slack_settings):
    assert slack_settings.encryption_key is None
    app = await build_app(slack_settings)
    try:
        assert app.installation_store is None
    finally:
        await app.close()


# --- key rotation ----------------------------------------------------------------------


async def test_rotation_old_rows_read_with_both_keys_and_reencrypt_moves_them_to_the_new_key(
    settings,
):
    old, new = new_key(), new_key()
    store = SQLInstallationStore(keyed(settings, old))
    await store.async_save(installation("TR", "xoxb-rotate-me"))
    await store.close()
    under_old = stored_token(settings, "TR")

    both = keyed(settings, new, old)
    reader = SQLInstallationStore(both)
    try:  # the new key first: rows under the old key still read
        bot = await reader.async_find_bot(enterprise_id=None, team_id="TR")
        assert bot is not None and bot.bot_token == "xoxb-rotate-me"
    finally:
        await reader.close()

    done = run_sluice(both, "slack", "reencrypt")
    assert done.returncode == 0, done.stderr
    assert "1 installation(s): 1 re-encrypted under the first key (0 were plain text)" in (
        done.stdout
    )
    assert "xoxb-rotate-me" not in done.stdout + done.stderr

    after = stored_token(settings, "TR")
    assert after != under_old and after.startswith("fernet:")
    assert Fernet(new.encode()).decrypt(after.removeprefix("fernet:").encode()) == (
        b"xoxb-rotate-me"
    )
    only_new = SQLInstallationStore(keyed(settings, new))
    only_old = SQLInstallationStore(keyed(settings, old))
    try:
        bot = await only_new.async_find_bot(enterprise_id=None, team_id="TR")
        assert bot is not None and bot.bot_token == "xoxb-rotate-me"
        with pytest.raises(ConfigError):  # the old key can now be dropped
            await only_old.async_find_bot(enterprise_id=None, team_id="TR")
    finally:
        await only_new.close()
        await only_old.close()


async def test_reencrypt_leaves_a_row_no_key_decrypts_and_exits_1(settings):
    lost, current = new_key(), new_key()
    for key, team in ((lost, "TL"), (current, "TK")):
        store = SQLInstallationStore(keyed(settings, key))
        await store.async_save(installation(team, f"xoxb-{team}"))
        await store.close()
    before = stored_token(settings, "TL")
    done = run_sluice(keyed(settings, current), "slack", "reencrypt")
    assert done.returncode == 1
    assert (
        "2 installation(s): 1 re-encrypted under the first key (0 were plain text), 1 failed"
        in (done.stdout)
    )
    assert "-/TL" in done.stderr
    assert stored_token(settings, "TL") == before


# --- plain-text rows -------------------------------------------------------------------


def insert_plain_row(settings: Settings, team: str, token: str) -> None:
    """A row as an older Sluice without a key stored it."""
    with sqlite3.connect(settings.database_url.removeprefix("sqlite:///")) as conn:
        conn.execute(
            "insert into slack_installations (enterprise_id, team_id, is_enterprise_install, "
            "bot_token, bot_id, bot_user_id, bot_scopes, user_id, installed_at) "
            "values ('', ?, 0, ?, 'B1', ?, 'chat:write', 'U1', ?)",
            (team, token, BOT_USER, time.time()),
        )


async def test_a_plain_text_row_is_refused_with_a_log_line_and_reencrypt_encrypts_it(
    settings, caplog
):
    s = keyed(settings, new_key())
    store = SQLInstallationStore(s)
    await store.create_tables()
    insert_plain_row(s, "TP", "xoxb-plain-old")
    try:
        with caplog.at_level(logging.ERROR, logger="bots.slack.installations"):
            assert await store.async_find_bot(enterprise_id=None, team_id="TP") is None
            assert await store.async_find_bot(enterprise_id=None, team_id="TP") is None
        [line] = [r.getMessage() for r in caplog.records if "plain text" in r.getMessage()]
        assert "team=TP" in line and "sluice slack reencrypt" in line
        assert "xoxb-plain-old" not in caplog.text

        report = await reencrypt(s)
        assert (report.rows, report.reencrypted, report.from_plain_text) == (1, 1, 1)
        assert report.failed == []
        assert stored_token(s, "TP").startswith("fernet:")
        store.forget(None, "TP")
        bot = await store.async_find_bot(enterprise_id=None, team_id="TP")
        assert bot is not None and bot.bot_token == "xoxb-plain-old"
    finally:
        await store.close()


async def test_events_of_a_workspace_with_a_plain_text_row_are_not_taken(
    oauth_settings, adapter, queue, fake_slack
):
    store = SQLInstallationStore(oauth_settings)
    await store.create_tables()
    await store.async_save(installation("TE", "xoxb-TE"))
    await store.close()
    insert_plain_row(oauth_settings, "TX", "xoxb-TX")
    fake_slack.add_token("xoxb-TE", "TE")
    fake_slack.add_token("xoxb-TX", "TX")
    async with adapter(oauth_settings) as a:
        await a.send.event(mention("from a plain row", "410.1"), team_id="TX")
        status, _ = await a.send.event(mention("from an encrypted row", "410.2"), team_id="TE")
        assert status == 200
    assert [j["text"] for j in await queued_messages(queue, oauth_settings)] == [
        "from an encrypted row"
    ]
    # The plain token was never used against Slack.
    assert all(c.token != "xoxb-TX" for c in fake_slack.calls)


# --- /slack/install state ----------------------------------------------------------------


async def state_keys(redis: Redis, settings: Settings) -> list[bytes]:
    return [k async for k in redis.scan_iter(match=f"{settings.key_prefix}:slack:*")]


async def test_install_is_limited_per_client_with_a_429_page(oauth_settings, adapter, redis):
    s = oauth_settings.model_copy(update={"slack_install_per_client_per_min": 3})
    async with adapter(s) as a:
        statuses = []
        for _ in range(3):
            async with a.http.get(a.base + "/slack/install", allow_redirects=False) as resp:
                statuses.append(resp.status)
        async with a.http.get(a.base + "/slack/install", allow_redirects=False) as resp:
            page = await resp.text()
            assert resp.status == 429
            assert resp.content_type == "text/html"
            assert 1 <= int(resp.headers["Retry-After"]) <= 60
            assert "Too many install attempts from your address" in page
        # Without SLUICE_SLACK_TRUST_FORWARDED_FOR a forwarded address changes nothing.
        async with a.http.get(
            a.base + "/slack/install",
            allow_redirects=False,
            headers={"X-Forwarded-For": "203.0.113.9"},
        ) as resp:
            assert resp.status == 429
    assert statuses == [302, 302, 302]
    assert await redis.zcard(Keys(s.key_prefix).slack_oauth_states()) == 3


async def test_live_install_states_are_bounded_whatever_the_number_of_clients(
    oauth_settings, adapter, redis
):
    s = oauth_settings.model_copy(
        update={
            "slack_install_max_states": 20,
            "slack_install_per_client_per_min": 2,
            "slack_trust_forwarded_for": True,
        }
    )
    async with adapter(s) as a:

        async def get(i: int) -> tuple[int, str]:
            async with a.http.get(
                a.base + "/slack/install",
                allow_redirects=False,
                headers={"X-Forwarded-For": f"198.51.100.1, 10.0.{i // 250}.{i % 250}"},
            ) as resp:
                return resp.status, await resp.text()

        results = await asyncio.gather(*[get(i) for i in range(300)])
    statuses = [status for status, _ in results]
    assert statuses.count(302) == 20
    assert statuses.count(429) == 280
    assert all("Too many installs are in progress" in t for st, t in results if st == 429)
    keys = Keys(s.key_prefix)
    assert await redis.zcard(keys.slack_oauth_states()) == 20
    # One sorted set, plus one counter per client that got a state: nothing per refusal.
    assert len(await state_keys(redis, s)) == 1 + 20
    assert await redis.ttl(keys.slack_oauth_states()) <= 600


async def test_a_state_is_valid_once_and_expires(settings, redis):
    keys = Keys(settings.key_prefix)

    async def connect() -> Redis:
        return redis

    store = RedisOAuthStateStore(connect, keys, per_client_per_min=100)
    state = await store.async_issue(client="192.0.2.1")
    assert await store.async_consume(state)
    assert not await store.async_consume(state)
    assert not await store.async_consume("never-issued")

    short = RedisOAuthStateStore(connect, keys, expiration_s=1, per_client_per_min=100)
    stale = await short.async_issue(client="192.0.2.1")
    await redis.zadd(keys.slack_oauth_states(), {stale: time.time() - 1})  # as if a second passed
    assert not await short.async_consume(stale)


async def test_the_per_client_limit_is_per_address(settings, redis):
    async def connect() -> Redis:
        return redis

    store = RedisOAuthStateStore(connect, Keys(settings.key_prefix), per_client_per_min=1)
    await store.async_issue(client="192.0.2.1")
    with pytest.raises(InstallRefused) as e:
        await store.async_issue(client="192.0.2.1")
    assert e.value.per_client and 1 <= e.value.retry_after_s <= 60
    await store.async_issue(client="192.0.2.2")


def test_a_worker_without_the_key_refuses_to_start_in_multi_workspace_mode(oauth_settings):
    no_key = oauth_settings.model_copy(update={"encryption_key": None})
    done = run_sluice(no_key, "worker", "--burst")
    assert done.returncode == 2, done.stderr
    assert "SLUICE_ENCRYPTION_KEY is not set" in done.stderr
    assert "sluice slack genkey" in done.stderr


POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.mark.postgres
async def test_reencrypt_on_postgres(settings):
    import uuid

    import asyncpg

    try:
        conn = await asyncpg.connect(POSTGRES_URL, timeout=2)
        await conn.close()
    except (OSError, asyncpg.PostgresError) as e:
        pytest.skip(f"no Postgres at {POSTGRES_URL}: {e}")
    old, new = new_key(), new_key()
    pg = settings.model_copy(update={"database_url": POSTGRES_URL})
    team = f"T{uuid.uuid4().hex[:10].upper()}"
    store = SQLInstallationStore(keyed(pg, old))
    try:
        await store.async_save(installation(team, "xoxb-pg-rotate"))
    finally:
        await store.close()
    # The database is shared: rows of other tests (other keys) are left and reported.
    report = await reencrypt(keyed(pg, new, old))
    assert f"-/{team}" not in report.failed and report.reencrypted >= 1
    reader = SQLInstallationStore(keyed(pg, new))
    try:
        bot = await reader.async_find_bot(enterprise_id=None, team_id=team)
        assert bot is not None and bot.bot_token == "xoxb-pg-rotate"
        await reader.async_delete_installation(enterprise_id=None, team_id=team)
    finally:
        await reader.close()

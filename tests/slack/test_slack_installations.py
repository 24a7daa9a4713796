"""Installations in SQL: encrypted tokens, deletion, URL mapping."""

from __future__ import annotations

import sqlite3

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr
from slack_sdk.oauth.installation_store import Installation

from bots.slack.installations import SQLInstallationStore, async_database_url
from core.errors import ConfigError


def new_key() -> SecretStr:
    return SecretStr(Fernet.generate_key().decode())


def installation(team: str, token: str) -> Installation:
    return Installation(
        team_id=team,
        bot_token=token,
        bot_id="B1",
        bot_user_id="UBOT",
        bot_scopes="chat:write",
        user_id="U1",
    )


def test_database_urls_map_to_async_drivers():
    assert async_database_url("sqlite:///./x.db") == "sqlite+aiosqlite:///./x.db"
    assert async_database_url("sqlite:////tmp/x.db") == "sqlite+aiosqlite:////tmp/x.db"
    assert async_database_url("postgresql://u:p@h/db") == "postgresql+asyncpg://u:p@h/db"
    assert async_database_url("postgres://u:p@h/db") == "postgresql+asyncpg://u:p@h/db"


async def test_tokens_are_encrypted_at_rest_and_read_back(settings):
    s = settings.model_copy(update={"encryption_key": new_key()})
    store = SQLInstallationStore(s)
    try:
        await store.async_save(installation("TA", "xoxb-secret-a"))
        await store.async_save(installation("TA", "xoxb-secret-a2"))  # re-install replaces
        bot = await store.async_find_bot(enterprise_id=None, team_id="TA")
        assert bot is not None and bot.bot_token == "xoxb-secret-a2"
    finally:
        await store.close()
    with sqlite3.connect(s.database_url.removeprefix("sqlite:///")) as conn:
        rows = conn.execute("select team_id, bot_token from slack_installations").fetchall()
    assert len(rows) == 1
    assert rows[0][1].startswith("fernet:") and "xoxb" not in rows[0][1]


def test_without_a_key_the_store_refuses_to_start(settings):
    with pytest.raises(ConfigError, match="SLUICE_ENCRYPTION_KEY is not set"):
        SQLInstallationStore(settings)


async def test_deletion_removes_the_tokens(settings):
    store = SQLInstallationStore(settings.model_copy(update={"encryption_key": new_key()}))
    try:
        await store.async_save(installation("TB", "xoxb-deleted"))
        assert (
            await store.async_find_bot(enterprise_id=None, team_id="TB")
        ).bot_token == "xoxb-deleted"
        await store.async_delete_installation(enterprise_id=None, team_id="TB")
        assert await store.async_find_bot(enterprise_id=None, team_id="TB") is None
    finally:
        await store.close()


async def test_encrypted_token_with_another_key_is_a_config_error(settings):
    keyed = settings.model_copy(update={"encryption_key": new_key()})
    store = SQLInstallationStore(keyed)
    await store.async_save(installation("TC", "xoxb-c"))
    await store.close()
    other = settings.model_copy(update={"encryption_key": new_key()})
    reader = SQLInstallationStore(other)
    try:
        with pytest.raises(ConfigError, match="does not decrypt with any key"):
            await reader.async_find_bot(enterprise_id=None, team_id="TC")
    finally:
        await reader.close()


def test_a_malformed_encryption_key_names_the_fix(settings):
    with pytest.raises(ConfigError, match="Fernet"):
        SQLInstallationStore(settings.model_copy(update={"encryption_key": SecretStr("nope")}))


POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.mark.postgres
async def test_installations_on_postgres(settings):
    import uuid

    import asyncpg

    try:
        conn = await asyncpg.connect(POSTGRES_URL, timeout=2)
        await conn.close()
    except (OSError, asyncpg.PostgresError) as e:
        pytest.skip(f"no Postgres at {POSTGRES_URL}: {e}")
    s = settings.model_copy(update={"database_url": POSTGRES_URL, "encryption_key": new_key()})
    team = f"T{uuid.uuid4().hex[:10].upper()}"
    store = SQLInstallationStore(s)
    try:
        await store.async_save(installation(team, "xoxb-pg-1"))
        await store.async_save(installation(team, "xoxb-pg-2"))
        bot = await store.async_find_bot(enterprise_id=None, team_id=team)
        assert bot is not None and bot.bot_token == "xoxb-pg-2"
        await store.async_delete_installation(enterprise_id=None, team_id=team)
        assert await store.async_find_bot(enterprise_id=None, team_id=team) is None
    finally:
        await store.close()

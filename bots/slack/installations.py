"""Slack installations in the SQL database, bot tokens encrypted at rest.

One row per workspace (and enterprise), written by the OAuth redirect and read by
bolt's authorize step (adapter) and by the responder (workers). With
``SLUICE_ENCRYPTION_KEY`` set, bot and user tokens are stored Fernet-encrypted;
rows written without a key stay readable (a stored value says which it is).
The OAuth ``state`` lives in Redis, consumed once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from redis.asyncio import Redis
from slack_sdk.oauth.installation_store import Bot, Installation
from slack_sdk.oauth.installation_store.async_installation_store import AsyncInstallationStore
from slack_sdk.oauth.state_store.async_state_store import AsyncOAuthStateStore
from sqlalchemy import (
    Boolean,
    Column,
    Float,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core.errors import ConfigError
from core.logs import register_secret
from core.redis import Keys
from core.settings import Settings

logger = logging.getLogger(__name__)

metadata = MetaData()

# enterprise_id is "" (not NULL) for plain workspaces so that it can be in the key.
installations = Table(
    "slack_installations",
    metadata,
    Column("enterprise_id", String(32), primary_key=True, default=""),
    Column("team_id", String(32), primary_key=True, default=""),
    Column("is_enterprise_install", Boolean, nullable=False, default=False),
    Column("app_id", String(32)),
    Column("team_name", String(200)),
    Column("enterprise_name", String(200)),
    Column("bot_token", Text),
    Column("bot_id", String(32)),
    Column("bot_user_id", String(32)),
    Column("bot_scopes", Text),
    Column("user_id", String(32), nullable=False),
    Column("user_token", Text),
    Column("user_scopes", Text),
    Column("installed_at", Float, nullable=False),
)

_ENC = "fernet:"


def async_database_url(url: str) -> str:
    """The async driver URL for ``DATABASE_URL`` (aiosqlite, asyncpg)."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


class TokenCipher:
    """Encrypts tokens with Fernet when a key is configured."""

    def __init__(self, key: str | None) -> None:
        try:
            self._fernet = Fernet(key.encode()) if key else None
        except ValueError as e:
            raise ConfigError(
                "SLUICE_ENCRYPTION_KEY is not a Fernet key: create one with "
                "`python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'`."
            ) from e

    def seal(self, value: str | None) -> str | None:
        """The stored form of ``value``."""
        if value is None or self._fernet is None:
            return value
        return _ENC + self._fernet.encrypt(value.encode()).decode()

    def open(self, stored: str | None) -> str | None:
        """The token from its stored form."""
        if stored is None or not stored.startswith(_ENC):
            return stored
        if self._fernet is None:
            raise ConfigError(
                "a stored Slack token is encrypted but SLUICE_ENCRYPTION_KEY is not set"
            )
        try:
            return self._fernet.decrypt(stored[len(_ENC) :].encode()).decode()
        except InvalidToken as e:
            raise ConfigError(
                "a stored Slack token does not decrypt with "
                "SLUICE_ENCRYPTION_KEY (was the key changed?)"
            ) from e


class SQLInstallationStore(AsyncInstallationStore):
    """bolt/slack_sdk installation store over SQLAlchemy async (SQLite or Postgres)."""

    def __init__(
        self, settings: Settings, engine: AsyncEngine | None = None, *, cache_s: float = 10.0
    ) -> None:
        key = settings.encryption_key.get_secret_value() if settings.encryption_key else None
        self.cipher = TokenCipher(key)
        self.engine = engine or create_async_engine(async_database_url(settings.database_url))
        self._ready = False
        self._logger = logger
        # Every event needs its workspace's bot: found bots are kept briefly in memory
        # (a burst of events is not a burst of queries). Deleting here evicts at once;
        # another process's deletion is seen within cache_s.
        self.cache_s = cache_s
        self._bots: dict[tuple[str, str], tuple[Bot, float]] = {}
        self._generation = 0  # bumped by every change, so a read racing it is not cached
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def forget(self, enterprise_id: str | None, team_id: str | None) -> None:
        """Drop a cached bot."""
        self._generation += 1
        self._bots.pop((enterprise_id or "", team_id or ""), None)

    @property
    def logger(self) -> logging.Logger:
        """Used by slack_sdk."""
        return self._logger

    async def create_tables(self) -> None:
        """Create the table if it is missing."""
        if self._ready:
            return
        async with self.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        self._ready = True

    async def close(self) -> None:
        """Dispose of the engine's connections."""
        await self.engine.dispose()

    def _insert(self) -> Any:
        if self.engine.dialect.name == "postgresql":
            return postgresql.insert(installations)
        return sqlite.insert(installations)

    async def async_save(self, installation: Installation) -> None:
        """Store (or replace) one workspace's installation."""
        register_secret(installation.bot_token, installation.user_token)  # masked in logs
        await self.create_tables()
        row = {
            "enterprise_id": installation.enterprise_id or "",
            "team_id": installation.team_id or "",
            "is_enterprise_install": bool(installation.is_enterprise_install),
            "app_id": installation.app_id,
            "team_name": installation.team_name,
            "enterprise_name": installation.enterprise_name,
            "bot_token": self.cipher.seal(installation.bot_token),
            "bot_id": installation.bot_id,
            "bot_user_id": installation.bot_user_id,
            "bot_scopes": ",".join(installation.bot_scopes or []),
            "user_id": installation.user_id,
            "user_token": self.cipher.seal(installation.user_token),
            "user_scopes": ",".join(installation.user_scopes or []),
            "installed_at": float(installation.installed_at or time.time()),
        }
        self.forget(installation.enterprise_id, installation.team_id)
        stmt = self._insert().values(**row)
        stmt = stmt.on_conflict_do_update(
            index_elements=["enterprise_id", "team_id"],
            set_={k: v for k, v in row.items() if k not in ("enterprise_id", "team_id")},
        )
        async with self.engine.begin() as conn:
            await conn.execute(stmt)
        self.forget(installation.enterprise_id, installation.team_id)
        logger.info(
            "slack installation saved team=%s enterprise=%s encrypted=%s",
            installation.team_id,
            installation.enterprise_id,
            self.cipher._fernet is not None,
        )

    async def async_save_bot(self, bot: Bot) -> None:
        """Not used: :meth:`async_save` stores the bot with the installation."""

    def _where(
        self, enterprise_id: str | None, team_id: str | None, is_enterprise_install: bool | None
    ) -> Any:
        if is_enterprise_install:
            team_id = None
        cond = installations.c.enterprise_id == (enterprise_id or "")
        if team_id is not None or not is_enterprise_install:
            cond = and_(cond, installations.c.team_id == (team_id or ""))
        return cond

    async def async_find_installation(
        self,
        *,
        enterprise_id: str | None,
        team_id: str | None,
        user_id: str | None = None,
        is_enterprise_install: bool | None = False,
    ) -> Installation | None:
        """The installation of a workspace, or ``None``."""
        await self.create_tables()
        query = (
            select(installations)
            .where(self._where(enterprise_id, team_id, is_enterprise_install))
            .limit(1)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            return None
        return Installation(
            app_id=row["app_id"],
            enterprise_id=row["enterprise_id"] or None,
            enterprise_name=row["enterprise_name"],
            team_id=row["team_id"] or None,
            team_name=row["team_name"],
            bot_token=self.cipher.open(row["bot_token"]),
            bot_id=row["bot_id"],
            bot_user_id=row["bot_user_id"],
            bot_scopes=row["bot_scopes"] or "",
            user_id=row["user_id"],
            user_token=self.cipher.open(row["user_token"]),
            user_scopes=row["user_scopes"] or "",
            is_enterprise_install=row["is_enterprise_install"],
            installed_at=row["installed_at"],
        )

    async def async_find_bot(
        self,
        *,
        enterprise_id: str | None,
        team_id: str | None,
        is_enterprise_install: bool | None = False,
    ) -> Bot | None:
        """The bot of a workspace, or ``None`` (not installed, or uninstalled)."""
        key = (enterprise_id or "", "" if is_enterprise_install else team_id or "")
        cached = self._bots.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        # One query per workspace at a time: a burst of its events waits for it.
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._bots.get(key)
            if cached is not None and cached[1] > time.monotonic():
                return cached[0]
            generation = self._generation
            found = await self.async_find_installation(
                enterprise_id=enterprise_id,
                team_id=team_id,
                is_enterprise_install=is_enterprise_install,
            )
            if found is None or not found.bot_token:
                return None
            register_secret(found.bot_token, found.user_token)  # masked in logs from now on
            bot = found.to_bot()
            if generation == self._generation:
                self._bots[key] = (bot, time.monotonic() + self.cache_s)
            return bot

    async def async_delete_bot(self, *, enterprise_id: str | None, team_id: str | None) -> None:
        """Forget the workspace's tokens (``tokens_revoked``)."""
        await self.async_delete_installation(enterprise_id=enterprise_id, team_id=team_id)

    async def async_delete_installation(
        self,
        *,
        enterprise_id: str | None,
        team_id: str | None,
        user_id: str | None = None,
    ) -> None:
        """Delete the workspace's row and so its tokens (``app_uninstalled``)."""
        self.forget(enterprise_id, team_id)
        await self.create_tables()
        stmt = delete(installations).where(
            and_(
                installations.c.enterprise_id == (enterprise_id or ""),
                installations.c.team_id == (team_id or ""),
            )
        )
        async with self.engine.begin() as conn:
            await conn.execute(stmt)
        self.forget(enterprise_id, team_id)
        logger.info("slack installation deleted team=%s enterprise=%s", team_id, enterprise_id)


class RedisOAuthStateStore(AsyncOAuthStateStore):
    """OAuth ``state`` values in Redis: issued by the install page, valid once."""

    def __init__(
        self, redis: Callable[[], Awaitable[Redis]], keys: Keys, expiration_s: int = 600
    ) -> None:
        self.redis = redis  # connects on first use
        self.keys = keys
        self.expiration_s = expiration_s
        self._logger = logger

    @property
    def logger(self) -> logging.Logger:
        """Used by slack_sdk."""
        return self._logger

    async def async_issue(self, *args: Any, **kwargs: Any) -> str:
        """A new state value."""
        import secrets

        state = secrets.token_urlsafe(24)
        redis = await self.redis()
        await redis.set(self.keys.slack_oauth_state(state), "1", ex=self.expiration_s)
        return state

    async def async_consume(self, state: str) -> bool:
        """``True`` once for a state that was issued and has not expired."""
        redis = await self.redis()
        deleted = await redis.delete(self.keys.slack_oauth_state(state))
        return bool(deleted)

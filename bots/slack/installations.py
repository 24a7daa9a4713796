"""Slack installations in the SQL database, bot tokens always encrypted at rest.

One row per workspace (and enterprise), written by the OAuth redirect and read by
bolt's authorize step (adapter) and by the responder (workers). Multi-workspace mode
needs ``SLUICE_ENCRYPTION_KEY``: tokens are stored Fernet-encrypted (a stored value
starts with ``fernet:``). The setting may hold several comma-separated keys: the
first encrypts, every one decrypts, so a key is rotated by putting the new key first
and running ``sluice slack reencrypt`` (:func:`reencrypt`), which rewrites every row
under the first key. A row stored in plain text (before encryption was required) is
never used: it is refused with a log line naming ``sluice slack reencrypt``, which
encrypts it.

The OAuth ``state`` lives in Redis, consumed once. Issuing one is limited per client
address and in total (:class:`RedisOAuthStateStore`), so unauthenticated
``GET /slack/install`` requests cannot fill Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
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
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core.errors import ConfigError
from core.infra.logs import register_secret
from core.infra.redis import Keys
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

GENKEY_HINT = (
    'make one with `sluice slack genkey` (or `python -c "from cryptography.fernet import '
    'Fernet; print(Fernet.generate_key().decode())"`)'
)
REENCRYPT_HINT = "run `sluice slack reencrypt` to encrypt it (or install the app again)"


def async_database_url(url: str) -> str:
    """The async driver URL for ``DATABASE_URL`` (aiosqlite, asyncpg)."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


def encryption_keys(settings: Settings) -> list[str]:
    """The keys in ``SLUICE_ENCRYPTION_KEY`` (comma-separated, first one encrypts)."""
    raw = settings.encryption_key.get_secret_value() if settings.encryption_key else ""
    return [k.strip() for k in raw.split(",") if k.strip()]


class PlainTextToken(ConfigError):
    """A stored token is plain text: it was saved before encryption was required."""


class TokenCipher:
    """Encrypts tokens with the first key; decrypts with any (``MultiFernet``)."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ConfigError(
                "SLUICE_ENCRYPTION_KEY is not set: multi-workspace Slack "
                "(SLACK_CLIENT_ID and SLACK_CLIENT_SECRET) stores every workspace's bot "
                f"token encrypted and does not start without a key; {GENKEY_HINT} and set "
                "SLUICE_ENCRYPTION_KEY to it."
            )
        fernets = []
        for i, key in enumerate(keys, 1):
            try:
                fernets.append(Fernet(key.encode()))
            except ValueError as e:
                raise ConfigError(
                    f"SLUICE_ENCRYPTION_KEY: key {i} of {len(keys)} is not a Fernet key "
                    f"(32 url-safe base64-encoded bytes); {GENKEY_HINT}."
                ) from e
        self._fernet = MultiFernet(fernets)
        self.key_count = len(fernets)

    def seal(self, value: str | None) -> str | None:
        """The stored form of ``value``, encrypted with the first key."""
        if value is None:
            return None
        return _ENC + self._fernet.encrypt(value.encode()).decode()

    @staticmethod
    def is_sealed(stored: str | None) -> bool:
        """Whether a stored value is encrypted (``None`` counts: nothing to hide)."""
        return stored is None or stored.startswith(_ENC)

    def open(self, stored: str | None) -> str | None:
        """The token from its stored form.

        Raises:
            PlainTextToken: the value was stored in plain text.
            ConfigError: no key in ``SLUICE_ENCRYPTION_KEY`` decrypts it.
        """
        if stored is None:
            return None
        if not stored.startswith(_ENC):
            raise PlainTextToken(f"a stored Slack token is in plain text; {REENCRYPT_HINT}")
        try:
            return self._fernet.decrypt(stored[len(_ENC) :].encode()).decode()
        except InvalidToken as e:
            raise ConfigError(
                "a stored Slack token does not decrypt with any key in "
                "SLUICE_ENCRYPTION_KEY (was a key removed before `sluice slack reencrypt`?)"
            ) from e

    def reseal(self, stored: str | None) -> str | None:
        """``stored`` encrypted under the first key (plain text is encrypted).

        Raises:
            ConfigError: no key decrypts it.
        """
        if stored is None:
            return None
        if not stored.startswith(_ENC):
            return self.seal(stored)
        try:
            return _ENC + self._fernet.rotate(stored[len(_ENC) :].encode()).decode()
        except InvalidToken as e:
            raise ConfigError(
                "a stored Slack token does not decrypt with any key in SLUICE_ENCRYPTION_KEY"
            ) from e


class SQLInstallationStore(AsyncInstallationStore):
    """bolt/slack_sdk installation store over SQLAlchemy async (SQLite or Postgres).

    Raises:
        ConfigError: ``SLUICE_ENCRYPTION_KEY`` is unset or holds a malformed key.
    """

    def __init__(
        self, settings: Settings, engine: AsyncEngine | None = None, *, cache_s: float = 10.0
    ) -> None:
        self.cipher = TokenCipher(encryption_keys(settings))
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
        self._plain_logged: dict[tuple[str, str], float] = {}

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
            "slack installation saved team=%s enterprise=%s (token encrypted)",
            installation.team_id,
            installation.enterprise_id,
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
        """The installation of a workspace, or ``None``.

        A row whose tokens are stored in plain text is refused (``None``, and an
        error line naming ``sluice slack reencrypt``, at most once a minute per
        workspace and process): such a token may have been read by whoever saw the
        database, and using it silently would hide that.
        """
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
        if not (
            self.cipher.is_sealed(row["bot_token"]) and self.cipher.is_sealed(row["user_token"])
        ):
            self._log_plain(row["enterprise_id"], row["team_id"])
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

    def _log_plain(self, enterprise_id: str, team_id: str) -> None:
        key = (enterprise_id, team_id)
        now = time.monotonic()
        if self._plain_logged.get(key, -1e9) + 60.0 > now:
            return
        self._plain_logged[key] = now
        logger.error(
            "slack installation team=%s enterprise=%s has a token stored in plain text "
            "(saved before SLUICE_ENCRYPTION_KEY was required); refusing to use it: %s",
            team_id,
            enterprise_id or "-",
            REENCRYPT_HINT,
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


@dataclass
class ReencryptReport:
    """What :func:`reencrypt` did, in rows."""

    rows: int = 0
    reencrypted: int = 0  # rewritten under the first key
    from_plain_text: int = 0  # of those, rows that held a plain-text token
    failed: list[str] = field(default_factory=list)  # "enterprise/team" no key decrypts
    changed_meanwhile: int = 0  # re-installed while this ran: already current, left alone


async def reencrypt(settings: Settings, engine: AsyncEngine | None = None) -> ReencryptReport:
    """Rewrite every stored installation's tokens under the first encryption key.

    Plain-text tokens are encrypted; tokens under an older key (any key in
    ``SLUICE_ENCRYPTION_KEY``) are re-encrypted. A row no key decrypts is left as it
    is and reported. Each row is updated only if it still holds what was read, so a
    workspace re-installed meanwhile keeps its new token. Safe to run again.
    """
    store = SQLInstallationStore(settings, engine)
    report = ReencryptReport()
    try:
        await store.create_tables()
        cols = installations.c
        async with store.engine.connect() as conn:
            rows = (
                (
                    await conn.execute(
                        select(cols.enterprise_id, cols.team_id, cols.bot_token, cols.user_token)
                    )
                )
                .mappings()
                .all()
            )
        for row in rows:
            report.rows += 1
            where = f"{row['enterprise_id'] or '-'}/{row['team_id'] or '-'}"
            try:
                bot_token = store.cipher.reseal(row["bot_token"])
                user_token = store.cipher.reseal(row["user_token"])
            except ConfigError:
                logger.error("slack installation %s: no key decrypts its token", where)
                report.failed.append(where)
                continue
            stmt = (
                update(installations)
                .where(
                    and_(
                        cols.enterprise_id == row["enterprise_id"],
                        cols.team_id == row["team_id"],
                        _same(cols.bot_token, row["bot_token"]),
                        _same(cols.user_token, row["user_token"]),
                    )
                )
                .values(bot_token=bot_token, user_token=user_token)
            )
            async with store.engine.begin() as conn:
                result = await conn.execute(stmt)
            if result.rowcount == 0:
                report.changed_meanwhile += 1
                continue
            report.reencrypted += 1
            if not (
                store.cipher.is_sealed(row["bot_token"])
                and store.cipher.is_sealed(row["user_token"])
            ):
                report.from_plain_text += 1
        logger.info(
            "slack reencrypt: %d row(s), %d re-encrypted (%d from plain text), %d failed",
            report.rows,
            report.reencrypted,
            report.from_plain_text,
            len(report.failed),
        )
        return report
    finally:
        if engine is None:
            await store.close()


def _same(column: Any, value: str | None) -> Any:
    return column.is_(None) if value is None else column == value


_ISSUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {1, math.ceil(tonumber(oldest[2]) - now)}
end
local n = redis.call('INCR', KEYS[2])
if n == 1 then redis.call('EXPIRE', KEYS[2], ARGV[5]) end
if n > tonumber(ARGV[4]) then
  return {2, redis.call('TTL', KEYS[2])}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {0, 0}
"""

_CONSUME = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expires then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(expires) > now then return 1 end
return 0
"""


class InstallRefused(Exception):
    """Too many install attempts: from this client, or live states in total."""

    def __init__(self, retry_after_s: int, *, per_client: bool) -> None:
        super().__init__(
            "too many install attempts from this address"
            if per_client
            else "too many install attempts in progress"
        )
        self.retry_after_s = max(1, retry_after_s)
        self.per_client = per_client


class RedisOAuthStateStore(AsyncOAuthStateStore):
    """OAuth ``state`` values in Redis: issued by the install page, valid once.

    Every live state is a member of one sorted set scored by its expiry, so the number
    of live states is bounded by ``SLUICE_SLACK_INSTALL_MAX_STATES`` and Redis holds
    one key for all of them, plus one short-lived counter per client address that
    issued a state in the last minute (``SLUICE_SLACK_INSTALL_PER_CLIENT_PER_MIN``).
    The checks and the write are one Lua script, so concurrent requests cannot pass
    the bounds together.
    """

    def __init__(
        self,
        redis: Callable[[], Awaitable[Redis]],
        keys: Keys,
        *,
        expiration_s: int = 600,
        max_states: int = 1000,
        per_client_per_min: int = 10,
    ) -> None:
        self.redis = redis  # connects on first use
        self.keys = keys
        self.expiration_s = expiration_s
        self.max_states = max_states
        self.per_client_per_min = per_client_per_min
        self._logger = logger

    @property
    def logger(self) -> logging.Logger:
        """Used by slack_sdk."""
        return self._logger

    async def async_issue(self, *args: Any, client: str = "unknown", **kwargs: Any) -> str:
        """A new state value for an install started from address ``client``.

        Raises:
            InstallRefused: over the per-client rate or the bound on live states.
        """
        state = secrets.token_urlsafe(24)
        # The address is hashed: key names stay short and hold nothing a client chose.
        client_key = self.keys.slack_install_client(
            hashlib.sha256(client.encode()).hexdigest()[:24]
        )
        redis = await self.redis()
        verdict, retry_s = await redis.eval(  # type: ignore[misc]
            _ISSUE,
            2,
            self.keys.slack_oauth_states(),
            client_key,
            state,
            str(self.expiration_s),
            str(self.max_states),
            str(self.per_client_per_min),
            "60",
        )
        if int(verdict) != 0:
            per_client = int(verdict) == 2
            logger.warning(
                "slack install refused (%s): %s",
                "per-client limit" if per_client else f"{self.max_states} states live",
                "client over SLUICE_SLACK_INSTALL_PER_CLIENT_PER_MIN"
                if per_client
                else "SLUICE_SLACK_INSTALL_MAX_STATES reached",
            )
            raise InstallRefused(int(retry_s), per_client=per_client)
        return state

    async def async_consume(self, state: str) -> bool:
        """``True`` once for a state that was issued and has not expired."""
        redis = await self.redis()
        found = await redis.eval(_CONSUME, 1, self.keys.slack_oauth_states(), state)  # type: ignore[misc]
        return bool(int(found))

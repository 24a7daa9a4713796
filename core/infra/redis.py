"""Redis connections and the names of Sluice's keys (in one place, like arq's constants).

Every Redis client in Sluice comes from this module: :func:`connect` (an arq pool that
can enqueue) and :func:`client` (a plain ``redis.asyncio.Redis``). Both honour
``REDIS_URL`` and, when ``SLUICE_REDIS_SENTINELS`` is set, Redis Sentinel: they ask
the sentinels for the primary of ``SLUICE_REDIS_SENTINEL_MASTER`` and, after a
failover, connect to the promoted replica on their next connection.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from core.errors import ConfigError, NoPrimaryError
from core.settings import Settings

logger = logging.getLogger(__name__)

# Fail fast on a dead Redis rather than arq's default of 5 retries x 1 s.
CONN_TIMEOUT_S = 2
CONN_RETRIES = 2
CONN_RETRY_DELAY_S = 1


@dataclass
class SluiceRedisSettings(RedisSettings):
    """arq's connection settings plus what arq cannot pass on: the sentinels' own
    password (arq's CLI, which builds its pool itself, ignores it)."""

    sentinel_password: str | None = None


async def _close_sentinel_clients(pool: Any) -> None:
    manager = getattr(pool, "sentinel_manager", None)
    if manager is not None:
        for sentinel in manager.sentinels:
            await sentinel.aclose()


class SentinelRedis(Redis):
    """A ``redis.asyncio.Redis`` on the primary the sentinels name; closing it also
    closes its connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close the client, its pool and the sentinel connections."""
        await super().aclose(close_connection_pool)
        await _close_sentinel_clients(self.connection_pool)


class SentinelArqRedis(ArqRedis):
    """arq's pool on the primary the sentinels name (closes the sentinel connections
    with it)."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close the pool and the sentinel connections."""
        await super().aclose(close_connection_pool)
        await _close_sentinel_clients(self.connection_pool)


def parse_sentinels(value: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` as a list of addresses.

    Raises:
        ConfigError: an entry is not ``host:port`` with a port in 1..65535.
    """
    out: list[tuple[str, int]] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"SLUICE_REDIS_SENTINELS: {entry!r} is not host:port "
                "(e.g. SLUICE_REDIS_SENTINELS=10.0.0.1:26379,10.0.0.2:26379)"
            )
        out.append((host, int(port)))
    if not out:
        raise ConfigError("SLUICE_REDIS_SENTINELS is set but names no sentinel (host:port,...)")
    return out


def redis_settings(settings: Settings) -> SluiceRedisSettings:
    """arq's connection settings from ``REDIS_URL`` (or the sentinels)."""
    if settings.redis_sentinels:
        url = urlparse(settings.redis_url or "redis://")
        path = url.path.lstrip("/")
        rs = SluiceRedisSettings(
            host=parse_sentinels(settings.redis_sentinels),
            sentinel=True,
            sentinel_master=settings.redis_sentinel_master,
            username=url.username,
            password=url.password,
            database=int(path) if path.isdigit() else 0,
            ssl=url.scheme == "rediss",
        )
        if settings.redis_sentinel_password is not None:
            rs.sentinel_password = settings.redis_sentinel_password.get_secret_value()
    elif not settings.redis_url:
        raise ConfigError(
            "REDIS_URL is not set: point it at your Redis (e.g. redis://localhost:6379/0), "
            "or use `sluice dev`, which starts an embedded one."
        )
    else:
        base = RedisSettings.from_dsn(settings.redis_url)
        rs = SluiceRedisSettings(**vars(base))
    rs.conn_timeout = CONN_TIMEOUT_S
    rs.conn_retries = CONN_RETRIES
    rs.conn_retry_delay = CONN_RETRY_DELAY_S
    return rs


def _sentinel(rs: RedisSettings) -> Sentinel:
    hosts = rs.host if isinstance(rs.host, list) else [(rs.host, rs.port)]
    sentinel_kwargs: dict[str, Any] = {
        "socket_connect_timeout": rs.conn_timeout,
        "socket_timeout": rs.conn_timeout,
    }
    password = getattr(rs, "sentinel_password", None)
    if password:
        sentinel_kwargs["password"] = password
    return Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]


def _master_kwargs(rs: RedisSettings) -> dict[str, Any]:
    return {
        "db": rs.database,
        "username": rs.username,
        "password": rs.password,
        "ssl": rs.ssl,
        "socket_connect_timeout": rs.conn_timeout,
        "max_connections": rs.max_connections,
    }


def _no_primary(rs: RedisSettings, e: Exception) -> NoPrimaryError:
    hosts = rs.host if isinstance(rs.host, list) else [(rs.host, rs.port)]
    names = ", ".join(f"{h}:{p}" for h, p in hosts)
    return NoPrimaryError(
        f"Redis Sentinel: none of the sentinels ({names}) names a reachable primary for "
        f"{rs.sentinel_master!r} ({type(e).__name__}). Check SLUICE_REDIS_SENTINELS and "
        "SLUICE_REDIS_SENTINEL_MASTER, and that the sentinels and the primary are up."
    )


async def connect_pool(rs: RedisSettings, **pool_attrs: Any) -> ArqRedis:
    """An arq pool for ``rs``; ``pool_attrs`` set arq's ``job_serializer``,
    ``job_deserializer``, ``default_queue_name`` (what :func:`arq.create_pool` takes).

    Raises:
        NoPrimaryError: with Sentinel, the sentinels name no primary that answers
            (after ``conn_retries`` tries); a :class:`ConfigError` at start-up, a
            ``redis`` ``ConnectionError`` for code that retries.
        redis.exceptions.RedisError, OSError: without Sentinel, Redis does not answer.
    """
    if not rs.sentinel:
        return await create_pool(rs, **pool_attrs)
    sentinel = _sentinel(rs)
    for attempt in range(rs.conn_retries + 1):
        pool: ArqRedis = sentinel.master_for(
            rs.sentinel_master, redis_class=SentinelArqRedis, **_master_kwargs(rs)
        )
        pool.job_serializer = pool_attrs.get("job_serializer")
        pool.job_deserializer = pool_attrs.get("job_deserializer")
        pool.default_queue_name = pool_attrs.get("default_queue_name", pool.default_queue_name)
        try:
            await pool.ping()
        except (RedisError, OSError, TimeoutError) as e:
            await pool.aclose()
            if attempt == rs.conn_retries:
                raise _no_primary(rs, e) from e
            logger.warning(
                "no Redis primary from the sentinels for %r yet (%s); retrying in %ss",
                rs.sentinel_master,
                type(e).__name__,
                rs.conn_retry_delay,
            )
            await asyncio.sleep(rs.conn_retry_delay)
        else:
            return pool
    raise AssertionError("unreachable")  # pragma: no cover


async def connect(settings: Settings, **pool_attrs: Any) -> ArqRedis:
    """An arq Redis pool (a ``redis.asyncio.Redis`` that can also enqueue jobs)."""
    return await connect_pool(redis_settings(settings), **pool_attrs)


def client(settings: Settings, **kwargs: Any) -> Redis:
    """A plain ``redis.asyncio.Redis`` (bytes replies) for ``settings``; ``kwargs``
    go to the connections (e.g. ``socket_connect_timeout``).

    No connection is made until the first command. With Sentinel, every new
    connection asks the sentinels for the current primary.
    """
    rs = redis_settings(settings)
    if rs.sentinel:
        primary: Redis = _sentinel(rs).master_for(
            rs.sentinel_master, redis_class=SentinelRedis, **{**_master_kwargs(rs), **kwargs}
        )
        return primary
    assert settings.redis_url is not None  # redis_settings raised otherwise
    client_: Redis = Redis.from_url(settings.redis_url, **kwargs)
    return client_


async def check_primary(settings: Settings) -> None:
    """With Sentinel, fail at start-up with a clear message when no primary answers.

    Raises:
        NoPrimaryError: the sentinels name no reachable primary.
    """
    if not settings.redis_sentinels:
        return
    pool = await connect(settings)
    await pool.aclose()


def glob_escape(text: str) -> str:
    """``text`` matched literally in a Redis SCAN/KEYS pattern (tenant ids may hold ``*``)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class Keys:
    """Every Redis key Sluice writes, under one prefix (``SLUICE_KEY_PREFIX``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def history(self, conversation_id: str) -> str:
        """The hot window of one conversation (a list of JSON turns)."""
        return f"{self.prefix}:hist:{conversation_id}"

    def web_outbox(self, session: str) -> str:
        """Events streamed to one web chat session (a Redis stream)."""
        return f"{self.prefix}:web:out:{session}"

    def dedupe(self, platform: str, key: str) -> str:
        """A dedupe marker for one delivered event."""
        return f"{self.prefix}:dedupe:{platform}:{key}"

    def delivered(self, job_id: str) -> str:
        """What a job already delivered to the platform (so a retry never posts twice)."""
        return f"{self.prefix}:delivered:{job_id}"

    def undelivered(self, job_id: str) -> str:
        """A finished reply the platform did not take yet, and the delivery attempts so
        far (a hash: ``reply``, ``attempts``); see :mod:`workers.delivery`."""
        return f"{self.prefix}:undelivered:{job_id}"

    def purged(self, job_id: str) -> str:
        """Marks a reply job whose message a purge deleted while it was queued or
        running: its history writes and its arq result are dropped (value: JSON
        ``{"tenant", "session", "conversation"}``, what its end still has to clear)."""
        return f"{self.prefix}:purged:{job_id}"

    # --- History (write-behind) ---
    def history_pattern(self) -> str:
        """SCAN pattern matching every hot window."""
        return f"{self.prefix}:hist:*"

    def history_backlog(self) -> str:
        """The write-behind backlog: a stream of records not yet in SQL."""
        return f"{self.prefix}:histq:backlog"

    def history_overflow(self) -> str:
        """Conversations whose turns went past the backlog bound (a set)."""
        return f"{self.prefix}:histq:overflow"

    def history_stats(self) -> str:
        """Flush state and counters (a hash): last flush, failures, overflow counts."""
        return f"{self.prefix}:histq:stats"

    def history_flush_lock(self) -> str:
        """The lock that lets one flush run at a time across all workers."""
        return f"{self.prefix}:histq:lock"

    def cache_pattern(self, tenant: str) -> str:
        """SCAN pattern for one tenant's cached answers (the cache's key layout)."""
        return glob_escape(self.cache_prefix(tenant)) + "*"

    # --- Slack ---

    def slack_thread(self, team: str, channel: str, thread_ts: str) -> str:
        """Marks a Slack thread the bot answers in (follow-ups need no mention)."""
        return f"{self.prefix}:slack:thread:{team}:{channel}:{thread_ts}"

    def slack_assistant(self, channel: str, thread_ts: str) -> str:
        """Hash of one Slack assistant thread: its context (the channel the user is
        viewing) and whether its title was set."""
        return f"{self.prefix}:slack:assistant:{channel}:{thread_ts}"

    def thread_context(self, conversation_id: str) -> str:
        """A thread's earlier messages read from the platform (JSON, shared by workers)."""
        return f"{self.prefix}:thread:{conversation_id}"

    def thread_context_lock(self, conversation_id: str) -> str:
        """Held by the one worker reading a thread (single flight)."""
        return f"{self.prefix}:thread:lock:{conversation_id}"

    def thread_context_retry(self, conversation_id: str) -> str:
        """Set when reading a thread failed: the next message in it tries again."""
        return f"{self.prefix}:thread:retry:{conversation_id}"

    def slack_replies_budget(self, team: str, minute: int) -> str:
        """conversations.replies calls of a workspace in one clock minute."""
        return f"{self.prefix}:slack:replies:{team}:{minute}"

    def slack_pace(self, channel: str, ts: str) -> str:
        """Held while one Slack message may not be edited again (one edit per interval)."""
        return f"{self.prefix}:slack:pace:{channel}:{ts}"

    def slack_update_budget(self, team: str, minute: int) -> str:
        """chat.update calls of one workspace in one minute."""
        return f"{self.prefix}:slack:updates:{team}:{minute}"

    def slack_oauth_states(self) -> str:
        """Sorted set of the live OAuth states issued by ``/slack/install`` (score: expiry)."""
        return f"{self.prefix}:slack:oauth:states"

    def slack_install_client(self, client_hash: str) -> str:
        """Install attempts of one client address in the current minute."""
        return f"{self.prefix}:slack:install:client:{client_hash}"

    # --- Discord ---
    def discord_bucket(self, bucket: str) -> str:
        """Shared pacing state of one Discord rate-limit bucket (route + major id)."""
        return f"{self.prefix}:discord:bucket:{bucket}"

    def discord_global(self) -> str:
        """Timestamps of recent Discord REST requests from all workers (the global limit)."""
        return f"{self.prefix}:discord:global"

    def discord_global_pause(self) -> str:
        """Set while Discord's global rate limit is exceeded (after a global 429)."""
        return f"{self.prefix}:discord:global:pause"

    def discord_global_learned(self) -> str:
        """A lowered global rate after a global 429 (expires)."""
        return f"{self.prefix}:discord:global:learned"

    def discord_route_bucket(self, route: str) -> str:
        """The ``X-RateLimit-Bucket`` Discord named for a route (learned from responses)."""
        return f"{self.prefix}:discord:route:{route}"

    def discord_dm_member(self, user_id: str) -> str:
        """Whether a user may DM the bot under the ``members`` DM policy ("1"/"0", expires)."""
        return f"{self.prefix}:discord:dm:member:{user_id}"

    def discord_dm_notice(self, user_id: str) -> str:
        """Set while a user who was refused in DMs has had their notice (one per window)."""
        return f"{self.prefix}:discord:dm:notice:{user_id}"

    # --- Choices admins make per tenant or channel (/model, /listen) ---
    def choice(self, what: str, platform: str, tenant: str, channel: str | None = None) -> str:
        """One admin choice (``what``: ``model``, ``listen``) for a tenant or one channel."""
        where = f"{platform}:{tenant}" + (f":{channel}" if channel is not None else "")
        return f"{self.prefix}:choice:{what}:{where}"

    # --- Operations (metrics, status) ---

    def heartbeats(self) -> str:
        """Live processes: a sorted set of ``role:host:pid`` scored by the last beat."""
        return f"{self.prefix}:heartbeats"

    def job_owner(self, job_id: str) -> str:
        """The heartbeat member of the worker running an arq job now (see
        :mod:`workers.reaper`: a handed-back job's old worker delivers nothing)."""
        return f"{self.prefix}:job:owner:{job_id}"

    def job_answered(self, job_id: str) -> str:
        """Set once an arq job's reply reached the platform: a try that runs again
        (its end was lost with a Redis primary, or it was handed back) answers nothing."""
        return f"{self.prefix}:job:answered:{job_id}"

    def worker_jobs(self, member: str) -> str:
        """The arq job ids a worker (its heartbeat member) is running (a set)."""
        return f"{self.prefix}:worker:jobs:{member}"

    # --- Traffic control (core.traffic: ordering, ratelimit, cache; core.llm.budget) ---

    def conv_lock(self, conversation_id: str) -> str:
        """The lock held by the job answering in a conversation (value: its job id)."""
        return f"{self.prefix}:conv:lock:{conversation_id}"

    def conv_pending(self, conversation_id: str) -> str:
        """A conversation's messages not yet answered (zset job id -> arrival ms)."""
        return f"{self.prefix}:conv:pending:{conversation_id}"

    def conv_started(self, conversation_id: str) -> str:
        """Jobs of a conversation that took the lock at least once (a set)."""
        return f"{self.prefix}:conv:started:{conversation_id}"

    def conv_texts(self, conversation_id: str) -> str:
        """User and text of pending messages, kept for burst merging (a hash)."""
        return f"{self.prefix}:conv:texts:{conversation_id}"

    def conv_wake(self, conversation_id: str) -> str:
        """Jobs parked until the conversation frees (hash job id -> JSON
        ``[queue, arq job id, score]``, read by the lock's release)."""
        return f"{self.prefix}:conv:wake:{conversation_id}"

    def conv_freed(self, conversation_id: str) -> str:
        """A token pushed whenever a conversation's lock is given back; a job waiting
        in its slot for the lock blocks on it (``core.traffic.ordering``)."""
        return f"{self.conv_wake(conversation_id)}:freed"

    def merged(self, job_id: str) -> str:
        """Marks a message answered as part of an earlier message's burst."""
        return f"{self.prefix}:merged:{job_id}"

    def lanes(self) -> str:
        """Per-lane counters: ``enqueued:{lane}``, ``started:{lane}`` (a hash)."""
        return f"{self.prefix}:lanes"

    def notice_refresh(self) -> str:
        """Queued notices to refresh: reply job ids scored by when each is due (Redis
        time, ms); swept by every worker's refresher (:mod:`workers.refresher`)."""
        return f"{self.prefix}:notice:refresh"

    def notice_refresh_payload(self) -> str:
        """The message of each notice in :meth:`notice_refresh` (a hash: job id to the
        message's JSON)."""
        return f"{self.prefix}:notice:refresh:msg"

    def notice_refresh_count(self) -> str:
        """Refreshes done so far of each notice in :meth:`notice_refresh` (a hash)."""
        return f"{self.prefix}:notice:refresh:n"

    def job_runs(self, job_id: str) -> str:
        """How often a job really started answering (re-runs after a worker died)."""
        return f"{self.prefix}:runs:{job_id}"

    def limit(self, scope: str, ident: str, window: str) -> str:
        """A rate-limit counter (scope user|tenant, kind and window index in ``window``)."""
        return f"{self.prefix}:limit:{scope}:{ident}:{window}"

    def llm(self, name: str) -> str:
        """Shared LLM budget state: bucket, waiters, breaker, counters."""
        return f"{self.prefix}:llm:{name}"

    def llm_lent(self, job_id: str) -> str:
        """The better score a job's LLM budget wait inherited from a later message of
        its conversation (:func:`core.traffic.ordering.park`; expires)."""
        return f"{self.prefix}:llm:lent:{job_id}"

    def cache_prefix(self, tenant: str) -> str:
        """Start of every cache key of one tenant."""
        return f"{self.prefix}:cache:{tenant}:"

    def cache(self, tenant: str, digest: str) -> str:
        """One cached answer."""
        return f"{self.cache_prefix(tenant)}{digest}"

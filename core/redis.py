"""Redis connections and the names of Sluice's keys (in one place, like arq's constants)."""

from __future__ import annotations

from arq.connections import RedisSettings

from core.errors import ConfigError
from core.settings import Settings


def redis_settings(settings: Settings) -> RedisSettings:
    """arq's connection settings from ``REDIS_URL``."""
    if not settings.redis_url:
        raise ConfigError(
            "REDIS_URL is not set: point it at your Redis (e.g. redis://localhost:6379/0), "
            "or use `sluice dev`, which starts an embedded one."
        )
    rs = RedisSettings.from_dsn(settings.redis_url)
    # Fail fast on a dead Redis rather than arq's default of 5 retries x 1 s.
    rs.conn_timeout = 2
    rs.conn_retries = 2
    rs.conn_retry_delay = 1
    return rs


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

    def discord_dm_member(self, user_id: str) -> str:
        """Whether a user may DM the bot under the ``members`` DM policy ("1"/"0", expires)."""
        return f"{self.prefix}:discord:dm:member:{user_id}"

    def discord_dm_notice(self, user_id: str) -> str:
        """Set while a user who was refused in DMs has had their notice (one per window)."""
        return f"{self.prefix}:discord:dm:notice:{user_id}"

    # --- Operations (metrics, status) ---

    def heartbeats(self) -> str:
        """Live processes: a sorted set of ``role:host:pid`` scored by the last beat."""
        return f"{self.prefix}:heartbeats"

    def worker_jobs(self, member: str) -> str:
        """The arq job ids a worker (its heartbeat member) is running (a set)."""
        return f"{self.prefix}:worker:jobs:{member}"

    # --- Traffic control (core.ordering, core.ratelimit, core.budget, core.cache) ---

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

    def merged(self, job_id: str) -> str:
        """Marks a message answered as part of an earlier message's burst."""
        return f"{self.prefix}:merged:{job_id}"

    def lanes(self) -> str:
        """Per-lane counters: ``enqueued:{lane}``, ``started:{lane}`` (a hash)."""
        return f"{self.prefix}:lanes"

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
        its conversation (:func:`core.ordering.park`; expires)."""
        return f"{self.prefix}:llm:lent:{job_id}"

    def cache_prefix(self, tenant: str) -> str:
        """Start of every cache key of one tenant."""
        return f"{self.prefix}:cache:{tenant}:"

    def cache(self, tenant: str, digest: str) -> str:
        """One cached answer."""
        return f"{self.cache_prefix(tenant)}{digest}"

"""One settings class, read from the environment and ``.env``.

The names in DESIGN.md are fixed (``REDIS_URL``, ``DATABASE_URL``, ``OPENAI_API_KEY``,
``SLACK_BOT_TOKEN`` …); every other knob is ``SLUICE_<NAME>``. Code takes a
:class:`Settings` object as an argument; only entry points call :func:`get_settings`.
Durations end in ``_s``; secrets are :class:`pydantic.SecretStr` so they never print.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
)


def _fixed(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


MAX_ID_CHARS = 128


def id_problem(ident: str) -> str | None:
    """Why ``ident`` is not a usable user/tenant/channel id, or ``None`` if it is.

    Platform ids are short printable tokens (``U012AB``, ``T0001``, ``123456789``):
    an id in settings that is empty, longer than 128 characters, or holds spaces,
    control, format (zero-width, bidi) or unassigned characters, or is not in NFC
    form, can never match what a platform sends; it is a typo or pasted garbage.
    """
    if not ident:
        return "is empty"
    if len(ident) > MAX_ID_CHARS:
        return f"is {len(ident):,} characters long (at most {MAX_ID_CHARS})"
    if unicodedata.normalize("NFC", ident) != ident:
        return "is not in Unicode NFC form"
    for ch in ident:
        if unicodedata.category(ch)[0] in "CZ":
            return f"contains the character U+{ord(ch):04X} (space, control or invisible)"
    return None


def _shown(ident: str) -> str:
    """An id for an error message: short, with odd characters escaped."""
    text = ident[:40].encode("unicode_escape").decode("ascii")
    return f"'{text}'" + ("..." if len(ident) > 40 else "")


class ModelLimits(BaseModel):
    """A model's own limits at one provider (when they differ from the provider's)."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)


class ProviderConfig(BaseModel):
    """One entry of ``SLUICE_PROVIDERS``: an OpenAI-compatible endpoint in the pool."""

    model_config = ConfigDict(extra="forbid")

    name: str
    base_url: str
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    models: list[str]
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    weight: float = 1.0
    model_limits: dict[str, ModelLimits] = Field(default_factory=dict)

    def serves(self, model: str) -> bool:
        """Whether this provider answers ``model``."""
        return model in self.models


PROVIDER_NAME_CHARS = 40


def parse_providers(value: object, where: str) -> list[ProviderConfig]:
    """Provider entries from parsed JSON/TOML (a list of objects).

    Raises:
        ValueError: a clear message that names the entry (its position and name) and
            what is wrong with it; never the key itself.
    """
    if isinstance(value, list) and all(isinstance(v, ProviderConfig) for v in value):
        return list(value)
    if not isinstance(value, list):
        raise ValueError(f"{where or 'providers'}: expected a list of provider objects")
    out: list[ProviderConfig] = []
    for i, raw in enumerate(value, start=1):
        label = f"{where}: provider #{i}" if where else f"provider #{i}"
        if not isinstance(raw, dict):
            raise ValueError(f"{label}: expected an object, not {type(raw).__name__}")
        name = raw.get("name")
        if isinstance(name, str) and name:
            label += f" ({_shown(name)})"
        problem = _provider_problem(raw)
        if problem:
            raise ValueError(f"{label}: {problem}")
        try:
            out.append(ProviderConfig.model_validate(raw))
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in item['loc'])}: {item['msg']}" for item in e.errors()
            )
            raise ValueError(f"{label}: {problems}") from None
    return out


def _provider_problem(raw: dict[str, Any]) -> str | None:
    """What is wrong with one provider entry, or ``None``."""
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        return "missing its name"
    if len(name) > PROVIDER_NAME_CHARS or not all(c.isalnum() or c in "-_." for c in name):
        return f"the name must be 1-{PROVIDER_NAME_CHARS} letters, digits, '-', '_' or '.'"
    url = raw.get("base_url")
    if not url:
        return "missing its base_url"
    if not str(url).startswith(("http://", "https://")):
        return "base_url must start with http:// or https://"
    if not raw.get("api_key") and not raw.get("api_key_env"):
        return (
            "missing its key (api_key, or api_key_env naming a variable or a file in "
            'SLUICE_SECRETS_DIR; use "none" for an endpoint without keys)'
        )
    models = raw.get("models")
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m for m in models)
    ):
        return "missing its models (a non-empty list of model names)"
    weight = raw.get("weight", 1.0)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not 0 < weight <= MAX_TENANT_WEIGHT
    ):
        return f"weight must be a number above 0 (up to {MAX_TENANT_WEIGHT:g})"
    for model in raw.get("model_limits") or {}:
        if model not in models:
            return f"model_limits names {_shown(str(model))}, which is not in its models"
    return None


def read_providers_file(path: str) -> object:
    """The ``providers`` list of a JSON file (a list, or ``{"providers": [...]}``) or a
    TOML file (``[[providers]]`` tables)."""
    file = Path(path)
    where = f"SLUICE_PROVIDERS_FILE={path}"
    try:
        text = file.read_text("utf-8")
    except OSError as e:
        raise ValueError(f"{where}: cannot read it ({e.strerror})") from None
    try:
        if file.suffix.lower() == ".toml":
            data: object = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ValueError(
            f"{where}: not valid {file.suffix.lstrip('.').upper() or 'JSON'}: {e}"
        ) from None
    if isinstance(data, dict):
        data = data.get("providers")
    return data


def _key_from_env(entry: ProviderConfig, secrets_dir: str | None) -> SecretStr:
    """The key a provider entry names with ``api_key_env``: that environment variable, or
    the file of that name in ``SLUICE_SECRETS_DIR``."""
    name = entry.api_key_env or ""
    value = os.environ.get(name)
    if value is None and secrets_dir and name and "/" not in name and name not in (".", ".."):
        path = Path(secrets_dir) / name
        if path.is_file():
            value = path.read_text("utf-8").strip()
    if not value:
        where = f" or a file in SLUICE_SECRETS_DIR={secrets_dir}" if secrets_dir else ""
        raise ValueError(
            f"SLUICE_PROVIDERS: provider {entry.name!r}: api_key_env names {name!r}, but "
            f"no such environment variable{where} is set"
        )
    return SecretStr(value)


class Settings(BaseSettings):
    """Every setting Sluice reads. See the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    # Fixed names (DESIGN.md).
    redis_url: str | None = Field(
        None,
        validation_alias=_fixed("REDIS_URL"),
        description="Redis/Valkey URL (`sluice dev` finds or starts one when unset).",
    )
    database_url: str = Field(
        "sqlite:///./sluice.db",
        validation_alias=_fixed("DATABASE_URL"),
        description="SQL database for history and installations (SQLite or Postgres).",
    )
    openai_api_key: SecretStr | None = Field(
        None,
        validation_alias=_fixed("OPENAI_API_KEY"),
        description="Key for the OpenAI-compatible endpoint; unset in dev means the simulator.",
    )
    openai_base_url: str | None = Field(
        None,
        validation_alias=_fixed("OPENAI_BASE_URL"),
        description="Base URL of any OpenAI-compatible endpoint.",
    )
    model: str = Field(
        "gpt-4o-mini", validation_alias=_fixed("SLUICE_MODEL"), description="Default model."
    )
    allowed_models: Annotated[list[str], NoDecode] = Field(
        [],
        description="Comma-separated models an admin may choose per tenant or channel with "
        "`/model` (empty: the command is off and every conversation uses the default).",
    )
    app: str | None = Field(
        None,
        validation_alias=_fixed("SLUICE_APP"),
        description="Import path `module:attribute` of your bot definition.",
    )
    slack_bot_token: SecretStr | None = Field(
        None, validation_alias=_fixed("SLACK_BOT_TOKEN"), description="Single-workspace bot token."
    )
    slack_signing_secret: SecretStr | None = Field(
        None,
        validation_alias=_fixed("SLACK_SIGNING_SECRET"),
        description="Verifies Slack's HTTP requests.",
    )
    slack_app_token: SecretStr | None = Field(
        None,
        validation_alias=_fixed("SLACK_APP_TOKEN"),
        description="App-level token; when set, `sluice slack` uses Socket Mode.",
    )
    slack_client_id: str | None = Field(
        None, validation_alias=_fixed("SLACK_CLIENT_ID"), description="OAuth client id."
    )
    slack_client_secret: SecretStr | None = Field(
        None, validation_alias=_fixed("SLACK_CLIENT_SECRET"), description="OAuth client secret."
    )
    slack_api_url: str = Field(
        "https://slack.com/api/",
        validation_alias=_fixed("SLACK_API_URL"),
        description="Slack Web API base URL.",
    )
    discord_token: SecretStr | None = Field(
        None, validation_alias=_fixed("DISCORD_TOKEN"), description="Discord bot token."
    )
    discord_api_url: str = Field(
        "https://discord.com/api/v10",
        validation_alias=_fixed("DISCORD_API_URL"),
        description="Discord REST base URL (a REST proxy; workers use it too).",
    )

    # SLUICE_* knobs.
    # --- Redis Sentinel and durability (core.infra.redis) ---
    redis_sentinels: str | None = Field(
        None,
        description="Redis Sentinel addresses, `host:port,host:port`. When set, every "
        "process asks them for the primary of SLUICE_REDIS_SENTINEL_MASTER and follows a "
        "failover; REDIS_URL then gives only the password, user and database number.",
    )
    redis_sentinel_master: str = Field(
        "mymaster", description="The name the sentinels monitor the primary under."
    )
    redis_sentinel_password: SecretStr | None = Field(
        None, description="Password of the sentinels themselves (`requirepass` in sentinel.conf)."
    )
    redis_wait_replicas: int = Field(
        0,
        ge=0,
        description="Replicas that must confirm an accepted message (Redis `WAIT`) before "
        "the adapter acks it to the platform; 0 = do not wait. With Sentinel, 1 keeps an "
        "acked message through a failover.",
    )
    redis_wait_timeout_ms: int = Field(
        1000,
        ge=1,
        description="Longest `WAIT` for SLUICE_REDIS_WAIT_REPLICAS; when it runs out the "
        "adapter does not ack, so the platform delivers the message again.",
    )
    test_clock_offset_s: float = Field(
        0.0,
        description="For tests only: shifts this process's wall clock (`time.time`) by "
        "this many seconds, to run a worker whose host clock is wrong.",
    )

    key_prefix: str = Field("sluice", description="Prefix of every Redis key Sluice writes.")
    web_host: str = Field(
        "127.0.0.1",
        description="Web chat bind address; off loopback the web chat needs SLUICE_WEB_AUTH "
        "or SLUICE_WEB_TOKEN, and SLUICE_WEB_SECRET.",
    )
    web_port: int = Field(8080, ge=0, le=65535, description="Web chat port.")
    web_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        ["127.0.0.1", "localhost", "[::1]"],
        description="Comma-separated host names the web chat answers to (`Host` and "
        "`Origin`); `name` allows any port, `name:port` only that one. Anything else "
        "gets 421 (DNS rebinding) or 403 (a foreign page).",
    )
    web_secret: SecretStr | None = Field(
        None,
        description="Key (32+ characters) that signs web chat session cookies (HMAC-SHA256). "
        "Unset: a random key per process, so sessions end when it restarts and two web "
        "processes cannot share them; required off loopback.",
    )
    web_token: SecretStr | None = Field(
        None,
        description="Shared token (16+ characters) the web chat asks for before it opens a "
        "session (page prompt, or `Authorization: Bearer`). This or SLUICE_WEB_AUTH is "
        "required off loopback.",
    )
    web_auth: str | None = Field(
        None,
        description="`module:function` taking the aiohttp request and returning the "
        "signed-in user's id, or None (refused with 401); may be async. This or "
        "SLUICE_WEB_TOKEN is required off loopback.",
    )
    web_cookie_secure: bool | None = Field(
        None,
        description="Mark the session cookie `Secure` (unset: when the request came over "
        "https, directly or per `X-Forwarded-Proto`).",
    )
    web_max_streams_per_session: int = Field(
        4, ge=1, description="Open reply streams (SSE) one web chat session may hold (429 above)."
    )
    web_max_streams_per_ip: int = Field(
        64,
        ge=1,
        description="Open reply streams (SSE) one client address may hold (429 above); "
        "behind a proxy every client shares the proxy's address.",
    )
    web_redis_max_connections: int = Field(
        512,
        ge=32,
        description="Redis connections one web process may open; each open reply stream "
        "holds one, 16 are kept for sending, so at most this minus 16 streams (503 above).",
    )
    max_input_chars: int = Field(
        8000,
        ge=1,
        description="Longest user text sent to the model; longer text is truncated "
        "for the model (with a note in the reply) and stored whole.",
    )
    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="Largest request body an adapter accepts (413 above)."
    )
    history_max_turns: int = Field(
        50, ge=2, description="Turns kept per conversation in the Redis hot window."
    )
    history_ttl_s: int = Field(
        7 * 86400, ge=60, description="Idle time after which a hot window expires from Redis."
    )
    context_turns: int = Field(
        20, ge=0, description="Earlier turns sent to the model with each message."
    )
    llm_timeout_s: float = Field(60.0, gt=0, description="Total time allowed for one LLM call.")
    llm_connect_timeout_s: float = Field(5.0, gt=0, description="LLM connect timeout.")
    llm_first_token_timeout_s: float = Field(
        30.0, gt=0, description="Time allowed until the first streamed token."
    )
    llm_retries: int = Field(
        3, ge=0, description="Retries of a failed LLM call (transient errors and 429s only)."
    )
    llm_max_tokens: int = Field(1024, ge=1, description="Default max_tokens per answer.")
    worker_max_jobs: int = Field(
        100, ge=1, description="Concurrent jobs per worker process (jobs mostly wait on I/O)."
    )
    worker_poll_delay_s: float = Field(
        0.05,
        gt=0,
        description="How often a worker with work polls the queue for more (an idle "
        "worker blocks instead: SLUICE_WORKER_IDLE_BLOCK_S).",
    )
    worker_idle_block_s: float = Field(
        1.0,
        ge=0,
        le=30,
        description="The longest an idle worker blocks on its queue's wake list before it "
        "polls anyway (enqueuers wake it at once; this only bounds the delay when a "
        "wake-up is lost). 0: poll every SLUICE_WORKER_POLL_DELAY_S instead of blocking.",
    )
    job_timeout_s: int = Field(180, ge=5, description="A reply job is abandoned after this.")
    job_max_tries: int = Field(
        3, ge=1, description="Attempts per reply job (a dead worker's job is re-run)."
    )
    delivery_max_tries: int = Field(
        8,
        ge=1,
        description="Attempts to deliver a finished reply while the platform keeps failing "
        "(429, 5xx, network); the answer is kept and re-sent with backoff, then given up "
        "with an error log (it stays in history).",
    )
    delivery_retry_base_s: float = Field(
        2.0,
        gt=0,
        description="Wait before the second delivery attempt; doubles per attempt "
        "(a longer platform Retry-After wins), up to SLUICE_DELIVERY_RETRY_MAX_S.",
    )
    delivery_retry_max_s: float = Field(
        60.0, gt=0, description="Longest wait between two delivery attempts of one reply."
    )
    shutdown_grace_s: float = Field(
        25.0,
        ge=0,
        description="On SIGTERM a worker lets running jobs finish this long, "
        "then hands the rest back to the queue.",
    )
    stream_min_interval_s: float = Field(
        0.1, ge=0, description="Least time between two streamed updates of one web chat reply."
    )
    dedupe_ttl_s: int = Field(86400, ge=3600, description="Lifetime of dedupe markers.")
    log_level: str = Field("INFO", description="Log level.")
    log_json: bool = Field(False, description="Write logs as JSON lines.")

    # --- Files and images users attach ---
    vision: bool = Field(
        False,
        description="Whether the model reads images: attached images are sent to it as "
        "image parts (a bot's `vision` overrides it); otherwise they are refused with a "
        "notice.",
    )
    file_max_bytes: int = Field(
        20_000_000,
        ge=1024,
        le=1_000_000_000,
        description="Largest attached file a worker downloads, in bytes; checked against "
        "the size the platform declares and again while downloading.",
    )
    file_max_count: int = Field(
        5, ge=0, le=50, description="Files read per message; the rest are refused with a notice."
    )
    file_max_chars: int = Field(
        20_000,
        ge=100,
        description="Text taken from a message's text files and PDFs for the model, in "
        "all; longer text is cut, with a note in the reply.",
    )
    image_max_pixels: int = Field(
        2_000_000,
        ge=10_000,
        le=50_000_000,
        description="Largest image sent to the model, in pixels (width × height); larger "
        "images are downscaled to it.",
    )
    file_download_timeout_s: float = Field(
        30.0, gt=0, description="Longest download of one attached file."
    )

    # --- Framework: tools ---
    tool_max_steps: int = Field(
        5,
        ge=0,
        description="Rounds of tool calls per message before the model must answer "
        "(a bot's `tool_max_steps` overrides it).",
    )
    tool_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Time for all tool runs of one message; after it the model answers "
        "with what it has (a bot's `tool_timeout_s` overrides it).",
    )
    tool_call_timeout_s: float = Field(
        20.0,
        gt=0,
        description="Longest run of one tool call; a slower call is reported "
        "to the model as an error.",
    )
    tool_result_max_chars: int = Field(
        8000, ge=100, description="Longest tool result sent to the model; longer is cut."
    )

    # --- Thread context and feedback (Slack, Discord) ---
    thread_context: bool = Field(
        True,
        description="The first time the bot is mentioned in a Slack or Discord thread (or a "
        "Discord reply chain) it has not seen, read the earlier messages once and give them "
        "to the model as context.",
    )
    thread_context_max_messages: int = Field(
        100,
        ge=1,
        le=1000,
        description="Most earlier thread messages given to the model: the first one and the "
        "newest; a longer thread is cut, with a note.",
    )
    thread_context_max_chars: int = Field(
        16000,
        ge=500,
        description="Most characters of earlier thread messages given to the model (about "
        "4 characters a token); older messages beyond it are left out, with a note.",
    )
    thread_context_fetch_max: int = Field(
        1000,
        ge=1,
        le=20000,
        description="Most messages read from the platform for one thread (Slack pages of "
        "200, Discord pages of 100).",
    )
    thread_context_ttl_s: int = Field(
        7 * 86400,
        ge=60,
        description="How long a thread's fetched messages are kept in Redis, shared by all "
        "workers.",
    )
    slack_replies_per_minute: int = Field(
        50,
        ge=1,
        description="conversations.replies calls per workspace per minute, across all "
        "workers: 50 for Marketplace apps (tier 3); set 1 for apps outside the Marketplace "
        "(Slack's limit for them is 1 call a minute of 15 messages).",
    )
    feedback_buttons: bool = Field(
        True, description="Show 👍/👎 buttons under every answer on Slack and Discord."
    )

    # --- Operations (metrics, health, status) ---
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of a worker's /metrics and /healthz server (unset: no server; "
        "adapters serve /metrics on their own port).",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Bind address of the worker metrics server (0.0.0.0 in containers).",
    )
    health_check_interval_s: int = Field(
        5,
        ge=1,
        description="How often workers write arq's health check and every process its "
        "heartbeat; `sluice status` counts a process live for 3 intervals.",
    )
    worker_dead_after_s: float = Field(
        30.0,
        ge=3,
        description="A worker whose heartbeat is older than this is taken for dead: the "
        "jobs it was running go back to the queue at once (instead of after "
        "SLUICE_JOB_TIMEOUT_S + 10 s, arq's in-progress marker).",
    )

    # --- History (write-behind to SQL) ---
    db_schema: str | None = Field(
        None,
        description="Postgres schema for Sluice's tables (its search_path); unset means "
        "the server's default (public). Ignored for SQLite.",
    )
    history_flush_interval_s: int = Field(
        5,
        ge=1,
        le=3600,
        description="How often the `flush_history` cron job moves the Redis "
        "backlog to SQL (rounded to a divisor of 60 s, or of 60 min above a minute).",
    )
    history_flush_threshold: int = Field(
        5000,
        ge=1,
        description="Backlog length at which a flush is started at once instead of "
        "waiting for the next interval.",
    )
    history_flush_batch: int = Field(
        2000, ge=1, le=50_000, description="Messages per SQL transaction in a flush."
    )
    history_flush_concurrency: int = Field(
        4,
        ge=1,
        le=16,
        description="Batches written at once, each in its own transaction "
        "(Postgres only; SQLite has a single writer).",
    )
    history_flush_max_s: float = Field(
        30.0, gt=0, description="Longest time one flush run keeps going before it yields."
    )
    history_flush_lock_ttl_s: float = Field(
        15.0,
        ge=0.5,
        description="TTL of the flush lock (renewed while flushing); a dead "
        "flusher's lock frees itself after this.",
    )
    history_flush_backoff_max_s: float = Field(
        60.0, gt=0, description="Longest wait between flush attempts while the database fails."
    )
    history_backlog_max: int = Field(
        1_000_000,
        ge=100,
        description="Most messages held in the Redis backlog while SQL is "
        "down or slow; at the bound see docs/history.md (turns stay in the hot window and are "
        "flushed from there; logged at ERROR).",
    )
    history_compress_min_bytes: int = Field(
        256,
        ge=0,
        description="Message bodies at least this long are zstd-compressed in "
        "Redis (0 compresses everything).",
    )
    history_sql_fallback: bool = Field(
        True, description="Read context from SQL when Redis no longer holds a conversation."
    )
    retention_days: int = Field(
        0, ge=0, description="Delete stored messages older than this many days (0 keeps them)."
    )

    # --- Slack ---
    encryption_key: SecretStr | None = Field(
        None,
        description="Fernet key(s) that encrypt stored Slack installation tokens; required "
        "in multi-workspace mode (`sluice slack genkey` makes one). Comma-separated to "
        "rotate: the first encrypts, all decrypt; then run `sluice slack reencrypt`.",
    )
    slack_install_max_states: int = Field(
        1000,
        ge=1,
        description="Most OAuth install states alive at once (each lives 10 minutes); over "
        "it `GET /slack/install` answers 429 for everyone.",
    )
    slack_install_per_client_per_min: int = Field(
        10,
        ge=1,
        description="`GET /slack/install` requests one client address may make per minute; "
        "over it 429.",
    )
    slack_trust_forwarded_for: bool = Field(
        False,
        description="Take the client address of `/slack/install` from the last "
        "`X-Forwarded-For` entry; set only behind a proxy that appends it.",
    )
    slack_port: int = Field(
        3000,
        ge=0,
        le=65535,
        description="Port of the Slack adapter's HTTP mode "
        "(`sluice slack`, and `sluice dev` when Slack's tokens are set).",
    )
    slack_native_streaming: bool = Field(
        True,
        description="Stream Slack replies in threads with chat.startStream/appendStream/"
        "stopStream; off (or where Slack refuses) a posted message is edited instead.",
    )
    slack_edit_interval_s: float = Field(
        1.0,
        ge=0,
        description="Least time between two edits of one Slack message, across all workers.",
    )
    slack_updates_per_minute: int = Field(
        50,
        ge=1,
        description="chat.update calls per workspace per minute for streaming "
        "edits; above it only final edits are sent.",
    )
    slack_message_limit: int = Field(
        12000,
        ge=100,
        le=12000,
        description="Longest Slack message (its markdown_text, at most Slack's 12,000 "
        "characters); longer replies are split.",
    )
    slack_max_retry_after_s: float = Field(
        30.0,
        ge=0,
        description="Longest Slack 429 Retry-After a job waits out before giving up on a delivery.",
    )
    slack_thread_ttl_s: int = Field(
        14 * 86400,
        ge=3600,
        description="How long the bot answers follow-ups (without a "
        "mention) in a thread it replied in.",
    )

    # --- Discord ---
    discord_message_content: bool = Field(
        False,
        description="Ask for the privileged message-content intent (enable it in the developer "
        "portal first). Without it the bot still reads mentions, DMs and replies that ping it.",
    )
    discord_threads: bool = Field(
        False, description="Open a thread for each new conversation started in a channel."
    )
    discord_dm_policy: Literal["everyone", "members", "nobody"] = Field(
        "members",
        description="Who may talk to the bot in DMs: `everyone`; `members` of an allowed "
        "guild (SLUICE_DISCORD_ALLOW_GUILDS, else any guild the bot is in; role lists "
        "apply); `nobody`. Each DM user is their own tenant, `dm-<user id>`.",
    )
    discord_allow_guilds: Annotated[list[str], NoDecode] = Field(
        [], description="Comma-separated guild ids to serve (empty: all)."
    )
    discord_deny_guilds: Annotated[list[str], NoDecode] = Field(
        [], description="Comma-separated guild ids to ignore."
    )
    discord_allow_channels: Annotated[list[str], NoDecode] = Field(
        [], description="Comma-separated channel ids to serve (empty: all)."
    )
    discord_deny_channels: Annotated[list[str], NoDecode] = Field(
        [], description="Comma-separated channel ids to ignore."
    )
    discord_allow_roles: Annotated[list[str], NoDecode] = Field(
        [],
        description="Comma-separated role ids; in guilds only members with one of them are "
        "served (empty: everyone).",
    )
    discord_deny_roles: Annotated[list[str], NoDecode] = Field(
        [], description="Comma-separated role ids whose members are ignored."
    )
    discord_allow_users: Annotated[list[str], NoDecode] = Field(
        [], description="Comma-separated user ids to serve (empty: all)."
    )
    discord_deny_users: Annotated[list[str], NoDecode] = Field(
        [], description="Comma-separated user ids to ignore."
    )
    discord_application_id: str | None = Field(
        None,
        description="Application (client) id, for `sluice discord --invite-url`; "
        "read from the API with DISCORD_TOKEN when unset.",
    )
    discord_sync_commands: bool = Field(
        True, description="Register the /ask command with Discord when the adapter starts."
    )
    discord_typing: bool = Field(
        True, description="Show typing while a message waits and is answered."
    )
    discord_stream_interval_s: float = Field(
        1.2,
        ge=0,
        description="Least time between two edits of a streamed Discord reply "
        "(Discord allows 5 edits per 5 s per channel).",
    )
    discord_global_rps: int = Field(
        40,
        ge=1,
        le=50,
        description="REST requests per second all workers together may send "
        "(Discord's global limit is 50).",
    )
    discord_retries: int = Field(
        3, ge=0, description="Retries of a Discord REST call after a 5xx or network error."
    )
    discord_shards: str | None = Field(
        None,
        description="Gateway shards for this process: `auto` (Discord's recommended count, "
        "all in this process) or `FIRST-LAST/COUNT`, e.g. `0-3/16` for shards 0..3 of 16 "
        "(unset: one connection, no sharding).",
    )
    discord_listen_channels: Annotated[list[str], NoDecode] = Field(
        [],
        description="Comma-separated channel ids where the bot answers every message "
        "without a mention (needs SLUICE_DISCORD_MESSAGE_CONTENT); admins add more with "
        "`/listen on`.",
    )

    @field_validator("discord_shards")
    @classmethod
    def _shard_spec(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_shards(value)  # raises ValueError with the reason
        return value.strip()

    @field_validator(
        "discord_allow_guilds",
        "discord_deny_guilds",
        "discord_allow_channels",
        "discord_deny_channels",
        "discord_allow_roles",
        "discord_deny_roles",
        "discord_allow_users",
        "discord_deny_users",
        "discord_listen_channels",
        "allowed_models",
        "web_allowed_hosts",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return [str(v) for v in json.loads(value)]
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple, set)):
            return [str(v) for v in value]
        return value

    # --- Traffic control (ordering, limits, LLM budget, cache, lanes) ---
    conversation_lock_ttl_s: float = Field(
        10.0,
        gt=0,
        description="Lifetime of a conversation's reply lock; renewed every third of it "
        "while the reply is worked on, so a killed worker's lock frees soon after.",
    )
    order_wait_in_job_s: float = Field(
        2.0,
        ge=0,
        description="How long a job waits in its worker slot for an earlier message of "
        "its conversation that is being answered before it steps aside (parks in the "
        "queue until the conversation frees); for one not started yet it steps aside at "
        "once.",
    )
    order_defer_s: float = Field(
        5.0,
        gt=0,
        description="Longest a job that stepped aside for a busy conversation stays "
        "parked; the job that frees the conversation puts it back in line at once.",
    )
    order_max_wait_s: float = Field(
        900.0,
        gt=0,
        description="An earlier message of the conversation that has not started after "
        "this long is no longer waited for (a safety net against stranded messages).",
    )
    user_requests_per_window: int | None = Field(
        20, ge=1, description="Messages per user per window (unset: no limit)."
    )
    user_window_s: int = Field(60, ge=1, description="Length of the per-user/tenant window.")
    user_tokens_per_day: int | None = Field(
        200_000, ge=1, description="LLM tokens per user per UTC day (unset: no limit)."
    )
    tenant_requests_per_window: int | None = Field(
        10_000,
        ge=1,
        description="Messages per tenant per window (unset: no limit); high enough that a "
        "whole workspace arriving at once is served.",
    )
    tenant_tokens_per_day: int | None = Field(
        5_000_000, ge=1, description="LLM tokens per tenant per UTC day (unset: no limit)."
    )
    admin_users: list[str] = Field(
        default_factory=list,
        description="User ids (JSON list) exempt from per-user limits, or given the admin "
        "limits below.",
    )
    admin_tenants: list[str] = Field(
        default_factory=list,
        description="Tenant ids (JSON list) exempt from per-tenant limits, or given the "
        "admin limits below.",
    )
    admin_requests_per_window: int | None = Field(
        None, ge=1, description="Messages per window for admin users/tenants (unset: exempt)."
    )
    llm_rpm: int | None = Field(
        None,
        ge=1,
        description="Provider requests per minute shared by every worker (unset: "
        "learned from the provider's x-ratelimit-limit-requests header).",
    )
    llm_tpm: int | None = Field(
        None,
        ge=1,
        description="Provider tokens per minute shared by every worker (unset: learned "
        "from x-ratelimit-limit-tokens).",
    )
    llm_budget_headroom: float = Field(
        0.97,
        gt=0,
        le=1,
        description="Fraction of the provider's limits Sluice plans to use (keeps 429s rare).",
    )
    llm_budget_wait_s: float = Field(
        150.0,
        gt=0,
        description="Longest wait in line for the LLM budget before a short apology.",
    )
    breaker_failures: int = Field(
        5, ge=1, description="Provider failures in a row (within the window) that open the breaker."
    )
    breaker_window_s: float = Field(
        30.0, gt=0, description="Window in which breaker failures are counted."
    )
    breaker_open_s: float = Field(
        60.0, gt=0, description="How long an open breaker stops calls to the provider."
    )
    cache_ttl_s: int = Field(3600, ge=0, description="Lifetime of cached answers (0: no cache).")
    lane_high_boost_s: float = Field(
        60.0,
        ge=0,
        description="Head start of high-lane messages in the queue and the budget line; a "
        "bulk message waits at most about this long behind newer high-lane ones.",
    )
    lane_default_boost_s: float = Field(
        20.0, ge=0, description="Head start of default-lane messages over bulk ones."
    )
    lane_queues: str = Field(
        "score",
        pattern="^(score|per-lane)$",
        description="`score`: one queue ordered by lane-boosted score (measured better); "
        "`per-lane`: one queue per lane, workers listen on SLUICE_WORKER_LANES.",
    )
    worker_lanes: list[str] = Field(
        default_factory=lambda: ["high", "default", "bulk"],
        description="With SLUICE_LANE_QUEUES=per-lane: the lane this worker serves (a "
        'JSON list of exactly one lane, e.g. ["high"]; run one worker pool per lane).',
    )
    queued_notice_after_s: float = Field(
        1.0,
        ge=0,
        le=3600,
        description="When a message's expected wait in line exceeds this, the user sees "
        "'Queued: #N in line, about N s' at once, until the answer starts (1 s: with the "
        "model's first token the first visible response stays within 2 s).",
    )
    max_wait_s: float = Field(
        600.0,
        description="Admission at the door: a message whose estimated wait in line is "
        "longer than this (10 s to 1 day) is refused at once with 'Very busy right now, "
        "please try again in about N min' instead of being queued.",
    )
    max_queued: int = Field(
        20_000,
        ge=100,
        le=10_000_000,
        description="Most reply jobs waiting in the queue; beyond it a new message is "
        "refused at once like one over SLUICE_MAX_WAIT_S (keeps Redis memory bounded).",
    )
    notice_max_jobs: int = Field(
        20,
        ge=1,
        le=1000,
        description="Slots per worker process for the reserved path (queued notices, "
        "refusals, cached answers at the door), separate from SLUICE_WORKER_MAX_JOBS so "
        "they never wait behind reply jobs.",
    )
    notice_refresh_after_s: float = Field(
        30.0,
        ge=5,
        le=3600,
        description="A queued notice whose estimate is longer than this is refreshed "
        "while the message waits.",
    )
    notice_refresh_every_s: float = Field(
        15.0,
        ge=15,
        le=600,
        description="Least time between two refreshes of one queued notice (15 s keeps "
        "within Slack's and Discord's edit limits).",
    )

    @field_validator("max_wait_s")
    @classmethod
    def _sane_max_wait(cls, value: float) -> float:
        if not 10 <= value <= 86_400:
            raise ValueError(f"must be between 10 and 86400 seconds (1 day), not {value:g}")
        return value

    @field_validator(
        "admin_users",
        "admin_tenants",
        "discord_allow_guilds",
        "discord_deny_guilds",
        "discord_allow_channels",
        "discord_deny_channels",
        "discord_allow_roles",
        "discord_deny_roles",
        "discord_allow_users",
        "discord_deny_users",
        "discord_listen_channels",
        "allowed_models",
    )
    @classmethod
    def _plain_ids(cls, value: list[str]) -> list[str]:
        for ident in value:
            problem = id_problem(ident)
            if problem:
                raise ValueError(f"the id {_shown(ident)} {problem}")
        return value

    target_wait_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Under overload, a message that can still be answered within this "
        "many seconds of arriving goes before one that already cannot; late ones are "
        "still answered, after the ones still in time (0 < x <= 3600).",
    )
    target_margin_s: float = Field(
        5.0,
        ge=0,
        description="A message counts as late this long before its target wait passes "
        "(about the time an answer takes once it starts); less than SLUICE_TARGET_WAIT_S.",
    )
    fair_step_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="Fair shares within a lane: each of a user's queued messages moves "
        "that user's place in line this many seconds later, so under overload a user's "
        "second message waits behind other users' first ones; a message arriving while "
        "its user is more than one step ahead is over its share and waits behind every "
        "message that can still make SLUICE_TARGET_WAIT_S and every late one "
        "(0 = off, <= 3600).",
    )
    tenant_weights: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict,
        description="Shares of tenants under overload, e.g. `T1=3,T2=1` (or a JSON "
        "object): a weight-3 "
        "tenant's users step through the line three times as fast (SLUICE_FAIR_STEP_S "
        "divided by the weight). Unlisted tenants weigh 1; weights are positive numbers "
        "up to 1000.",
    )

    @field_validator("tenant_weights", mode="before")
    @classmethod
    def _parse_weights(cls, value: object) -> object:
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"tenant weights are not valid JSON: {e}") from e
        if isinstance(value, str):
            return parse_tenant_weights(value)
        if isinstance(value, dict):
            return parse_tenant_weights(",".join(f"{k}={v}" for k, v in value.items()))
        return value

    @model_validator(mode="after")
    def _check_target(self) -> Settings:
        if self.target_margin_s >= self.target_wait_s:
            raise ValueError(
                f"SLUICE_TARGET_MARGIN_S ({self.target_margin_s:g}) must be less than "
                f"SLUICE_TARGET_WAIT_S ({self.target_wait_s:g})"
            )
        return self

    otel_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP traces URL (e.g. `http://otel-collector:4318/v1/traces`): one "
        "OpenTelemetry trace per message; unset: no tracing. Needs `pip install 'sluice[otel]'`; "
        "headers such as auth come from `OTEL_EXPORTER_OTLP_HEADERS`.",
    )
    otel_timeout_s: float = Field(
        5.0, gt=0, description="Longest wait of one trace export (in the background)."
    )
    providers: Annotated[list[ProviderConfig], NoDecode] = Field(
        default_factory=list,
        description="Several OpenAI-compatible endpoints as one pool (a JSON list): each "
        "entry has `name`, `base_url`, `api_key` (or `api_key_env`: a variable's or a "
        "SLUICE_SECRETS_DIR file's name), `models`, and optionally `rpm`, `tpm`, `weight` "
        "(default 1) and `model_limits` (`{model: {rpm, tpm}}`). Unset: one provider "
        "from OPENAI_API_KEY / OPENAI_BASE_URL and SLUICE_LLM_RPM / SLUICE_LLM_TPM.",
    )
    providers_file: str | None = Field(
        None,
        description="A JSON or TOML file (`[[providers]]`) with more provider entries, "
        "as in SLUICE_PROVIDERS.",
    )
    fallback_model: str | None = Field(
        None,
        description="Model to answer with when every provider serving the bot's model "
        "failed, has its breaker open or has no room (a bot's `fallback_model` wins).",
    )

    @field_validator("providers", mode="before")
    @classmethod
    def _parse_providers(cls, value: object) -> object:
        if isinstance(value, str):
            if not value.strip():
                return []
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON: {e}") from e
        return parse_providers(value, "")

    @model_validator(mode="after")
    def _load_providers(self) -> Settings:
        entries = list(self.providers)
        if self.providers_file:
            entries += parse_providers(
                read_providers_file(self.providers_file),
                f"SLUICE_PROVIDERS_FILE={self.providers_file}",
            )
        seen: set[str] = set()
        for entry in entries:
            if entry.name in seen:
                raise ValueError(
                    f"SLUICE_PROVIDERS: provider {entry.name!r} is listed twice "
                    "(names must be unique)"
                )
            seen.add(entry.name)
            if entry.api_key is None:
                entry.api_key = _key_from_env(entry, self.secrets_dir)
        self.providers = entries
        return self

    secrets_dir: str | None = Field(
        None,
        description="Directory of secret files, one per setting, each named like its "
        "environment variable (e.g. `OPENAI_API_KEY`): a mounted Kubernetes Secret. "
        "Environment variables and `.env` win over a file; a missing directory is an error.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, then ``.env``, then ``SLUICE_SECRETS_DIR``'s files.

        The directory itself is named by an argument or the environment (not ``.env``).
        """
        sources: tuple[PydanticBaseSettingsSource, ...] = (
            init_settings,
            env_settings,
            dotenv_settings,
        )
        named = init_settings().get("secrets_dir") or os.environ.get("SLUICE_SECRETS_DIR")
        if not named:
            return sources
        if not Path(str(named)).is_dir():
            raise ValueError(f"SLUICE_SECRETS_DIR={named} is not a directory")
        return (*sources, SecretsSettingsSource(settings_cls, secrets_dir=str(named)))

    @property
    def queue_name(self) -> str:
        """The arq queue Sluice's reply jobs go to."""
        return f"{self.key_prefix}:queue"


def parse_shards(text: str) -> tuple[list[int], int] | None:
    """``SLUICE_DISCORD_SHARDS``: ``None`` for ``auto``, else (shard ids, shard count).

    ``0-3/16`` is shards 0, 1, 2 and 3 of 16; ``5/16`` is shard 5 alone.

    Raises:
        ValueError: not ``auto`` nor ``FIRST-LAST/COUNT`` with 0 <= FIRST <= LAST < COUNT.
    """
    spec = text.strip().lower()
    if spec == "auto":
        return None
    m = re.fullmatch(r"(\d+)(?:-(\d+))?/(\d+)", spec)
    if m is None:
        raise ValueError(
            f"{text!r} is not a shard range: use `auto`, or `FIRST-LAST/COUNT` such as `0-3/16`"
        )
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) is not None else first
    count = int(m.group(3))
    if count < 1 or not 0 <= first <= last < count:
        raise ValueError(
            f"{text!r}: shards {first}..{last} are not within 0..{count - 1} (COUNT is the "
            "total number of shards of the bot, the same in every process)"
        )
    return list(range(first, last + 1)), count


def describe_settings_error(error: ValidationError) -> str:
    """A settings validation error as one line per bad setting, named as in the
    environment (``SLUICE_MAX_WAIT_S: …``), without the value given (it may be a secret)."""
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        info = Settings.model_fields.get(field)
        alias = info.validation_alias if info is not None else None
        if isinstance(alias, AliasChoices):
            name = str(alias.choices[0])
        elif field in Settings.model_fields:
            name = f"SLUICE_{field.upper()}"
        else:
            name = field
        msg = str(item["msg"]).removeprefix("Value error, ")
        lines.append(f"{name}: {msg}" if name else msg)
    return "invalid settings:\n  " + "\n  ".join(lines)


MAX_TENANT_WEIGHT = 1000.0
MAX_TENANT_ID_CHARS = 200


def parse_tenant_weights(text: str) -> dict[str, float]:
    """``"T1=3,T2=1"`` as ``{"T1": 3.0, "T2": 1.0}``.

    Raises:
        ValueError: an entry without ``=``, an empty, over-long or non-printable tenant
            id, a tenant listed twice, or a weight that is not a positive number up to
            :data:`MAX_TENANT_WEIGHT`; the message names the entry.
    """
    out: dict[str, float] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        tenant, sep, weight_text = item.rpartition("=")
        tenant = tenant.strip()
        shown = item[:40] + ("…" if len(item) > 40 else "")
        if not sep or not tenant:
            raise ValueError(f"tenant weight {shown!r}: expected TENANT=WEIGHT, e.g. T1=3")
        if len(tenant) > MAX_TENANT_ID_CHARS or not tenant.isprintable():
            raise ValueError(
                f"tenant weight {shown!r}: the tenant id must be 1-{MAX_TENANT_ID_CHARS} "
                "printable characters"
            )
        try:
            weight = float(weight_text)
        except ValueError:
            weight = math.nan
        if not (0 < weight <= MAX_TENANT_WEIGHT):
            raise ValueError(
                f"tenant weight {shown!r}: the weight must be a positive number up to "
                f"{MAX_TENANT_WEIGHT:g}"
            )
        if tenant in out:
            raise ValueError(f"tenant weight {shown!r}: tenant listed twice")
        out[tenant] = weight
    return out


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once. Tests build :class:`Settings` directly."""
    return Settings()

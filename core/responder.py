"""How workers send replies back, without knowing the platform.

Each adapter package in ``bots/`` provides a :class:`ResponderFactory`; the worker
creates it once at start-up (it holds the HTTP session) and asks it for one
:class:`Responder` per job. Responders must be idempotent per job id: a job re-run
after a worker died must not post a second reply.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.errors import ConfigError, DeliveryRetryableError
from core.framework.agent import ToolProgress
from core.infra.redis import Keys
from core.messages import FileRef, IncomingMessage, Reply
from core.settings import Settings

logger = logging.getLogger(__name__)


class Responder(Protocol):
    """Delivers one reply: shows progress, streams text, then the final reply.

    ``begin``, ``stream`` and ``finish`` are required. ``queued`` and
    ``withdraw_queued`` are optional: a responder that subclasses this protocol
    inherits their no-op defaults, and callers always call them.
    """

    async def begin(self) -> None:
        """The job started (e.g. show typing or a placeholder)."""

    async def stream(self, text: str) -> None:
        """The whole answer so far; the responder decides how often to show it."""

    async def finish(self, reply: Reply) -> None:
        """The final reply; delivered exactly once per job."""

    async def queued(self, wait_s: float, place: int | None = None) -> None:
        """The message waits about ``wait_s`` seconds, ``place`` in line when known.

        The default shows nothing.
        """
        return None

    async def withdraw_queued(self) -> None:
        """Take back the queued notice (the message got no reply of its own).

        The default has nothing to take back.
        """
        return None

    async def tool_progress(self, progress: ToolProgress) -> None:
        """A tool call of the model started or ended; must not raise (a courtesy to
        the reader).

        The default shows nothing.
        """
        return None


class ResponderFactory(Protocol):
    """One per platform per worker process."""

    platform: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def responder(self, msg: IncomingMessage, job_id: str) -> Responder: ...

    async def fetch_file(
        self, msg: IncomingMessage, ref: FileRef, *, max_bytes: int, timeout_s: float
    ) -> bytes:
        """Download a file attached to ``msg`` (see :class:`core.files.attach.FileFetcher`).

        Raises:
            FileRefusedError: the file cannot be downloaded; the message is safe to show.
        """
        ...


class DeliveryState:
    """What one reply job has delivered so far, shared by the platform responders.

    A Redis hash under ``Keys.delivered(job_id)``, kept for ``SLUICE_DEDUPE_TTL_S``:
    the platform's message ids, what they show, whether the reply is done. A job run
    again (after a crash or a delivery retry) reads it and completes the messages
    posted before instead of posting new ones.

    One policy for a Redis error, for every platform:

    - :meth:`read` raises :class:`~core.errors.DeliveryRetryableError`: a responder
      that cannot tell what it already posted must not post (it could post twice);
      the job tries again later.
    - :meth:`save` logs a warning and returns ``False``: the platform already shows
      the message, so the delivery goes on; only a re-run would miss the record.
    """

    def __init__(self, redis: Redis, keys: Keys, job_id: str, ttl_s: int) -> None:
        self._redis = redis
        self.job_id = job_id
        self.key = keys.delivered(job_id)
        self._ttl_s = ttl_s

    async def read(self) -> dict[str, str]:
        """Every field recorded so far (empty for a job that delivered nothing).

        Raises:
            DeliveryRetryableError: Redis could not be read.
        """
        try:
            raw = await cast("Awaitable[dict[Any, Any]]", self._redis.hgetall(self.key))
        except (RedisError, OSError) as e:
            raise DeliveryRetryableError(f"cannot read delivery state: {e}") from e
        return {_text(k): _text(v) for k, v in raw.items()}

    async def save(self, fields: Mapping[str, str]) -> bool:
        """Record ``fields`` (and renew the TTL); ``False`` if Redis failed (logged)."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.key, mapping=dict(fields))
                pipe.expire(self.key, self._ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as e:
            logger.warning("cannot record delivery state job=%s: %s", self.job_id, e)
            return False
        return True


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# Import paths, so that a worker only imports the platform SDKs it uses.
RESPONDERS: dict[str, str] = {
    "web": "bots.web.responder:WebResponderFactory",
    "slack": "bots.slack.responder:SlackResponderFactory",
    "discord": "bots.discord.responder:DiscordResponderFactory",
}


def load_responder_factory(platform: str, settings: Settings, redis: object) -> ResponderFactory:
    """Build the responder factory of one platform from :data:`RESPONDERS`."""
    path = RESPONDERS.get(platform)
    if path is None:
        raise ConfigError(f"no responder for platform {platform!r}")
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"responder for {platform!r} is not available: {e}") from e
    factory: ResponderFactory = getattr(module, attr)(settings, redis)
    return factory

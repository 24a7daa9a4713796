"""How workers send replies back, without knowing the platform.

Each adapter package in ``bots/`` provides a :class:`ResponderFactory`; the worker
creates it once at start-up (it holds the HTTP session) and asks it for one
:class:`Responder` per job. Responders must be idempotent per job id: a job re-run
after a worker died must not post a second reply.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

from core.errors import ConfigError
from core.messages import FetchedThread, IncomingMessage, Reply
from core.settings import Settings


class Responder(Protocol):
    """Delivers one reply: shows progress, streams text, then the final reply."""

    async def begin(self) -> None:
        """The job started (e.g. show typing or a placeholder)."""

    async def stream(self, text: str) -> None:
        """The whole answer so far; the responder decides how often to show it."""

    async def finish(self, reply: Reply) -> None:
        """The final reply; delivered exactly once per job."""


class ResponderFactory(Protocol):
    """One per platform per worker process."""

    platform: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def responder(self, msg: IncomingMessage, job_id: str) -> Responder: ...


@runtime_checkable
class ThreadReader(Protocol):
    """A responder factory that can read a thread's earlier messages (Slack, Discord).

    Used once per thread, the first time the bot is mentioned in it
    (:mod:`core.history.threads`); the result is cached in Redis for every worker.
    """

    async def fetch_thread(self, msg: IncomingMessage, max_messages: int) -> FetchedThread:
        """The messages before ``msg`` in its thread (or reply chain), oldest first,
        at most ``max_messages`` read from the platform.

        Raises:
            ThreadUnavailable: the platform refused for now (rate limit) or failed.
        """
        ...


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

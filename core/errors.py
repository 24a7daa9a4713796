"""Sluice's exceptions, one small tree per layer.

::

    SluiceError
    ├── ConfigError                 settings or environment are wrong; names the fix
    │   ├── BotDefinitionError      the user's bot module (SLUICE_APP) is wrong
    │   └── NoPrimaryError          the Redis sentinels name no reachable primary
    │                               (also a redis ConnectionError: transient mid-run)
    ├── InputError                  a message or request was refused (empty, malformed, too large)
    │   └── FileRefusedError        an attached file cannot be used; says why, safe to show
    ├── QueueError                  the job could not be enqueued (Redis unreachable)
    ├── LLMError                    the model call failed
    │   ├── LLMTransientError       timeout, connection error, 5xx: worth retrying
    │   │   └── LLMRateLimitedError 429 from the provider; carries retry_after_s
    │   ├── LLMRequestError         4xx other than 429: retrying cannot help
    │   └── LLMUnavailableError     retries ran out or the circuit breaker is open
    ├── DeliveryError               the reply could not be delivered to the platform
    │   └── DeliveryRetryableError  429/5xx from the platform: worth retrying
    └── HistoryError                history could not be read or written

Low-level errors (redis, openai, aiohttp) are wrapped with ``raise ... from e``
so that callers handle one tree and the original stays in the traceback.
"""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError


class SluiceError(Exception):
    """Base class of every error Sluice raises on purpose."""


class ConfigError(SluiceError):
    """Settings or environment are wrong; the message says how to fix them."""


class BotDefinitionError(ConfigError):
    """The bot definition named by ``SLUICE_APP`` cannot be used."""


class NoPrimaryError(ConfigError, RedisConnectionError):
    """The Redis sentinels name no primary that answers.

    At start-up a configuration error (wrong sentinels or master name); in a running
    process also a ``redis.exceptions.ConnectionError``, so that code that retries a
    lost Redis retries it (a failover is under way).
    """


class InputError(SluiceError):
    """Input was refused; ``str(err)`` is safe to show to whoever sent it."""


class FileRefusedError(InputError):
    """An attached file was refused (too large, not what it claims, unreadable, no vision).

    ``str(err)`` is a short reason that is safe to show to the user who sent the file
    (no URLs, no tokens).
    """


class QueueError(SluiceError):
    """A job could not be enqueued."""


class LLMError(SluiceError):
    """The LLM call failed."""


class LLMTransientError(LLMError):
    """A failure that a later attempt may not meet (timeout, 5xx, connection)."""


class LLMRateLimitedError(LLMTransientError):
    """The provider answered 429."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LLMRequestError(LLMError):
    """The provider refused the request itself (4xx other than 429)."""


class LLMUnavailableError(LLMError):
    """The provider cannot be used now: retries ran out or the breaker is open."""

    def __init__(
        self, message: str, retry_in_s: float | None = None, partial_text: str = ""
    ) -> None:
        super().__init__(message)
        self.retry_in_s = retry_in_s
        #: What had already streamed when the answer broke off (shown, marked as cut).
        self.partial_text = partial_text


class DeliveryError(SluiceError):
    """The reply could not be delivered to the platform."""


class DeliveryRetryableError(DeliveryError):
    """A delivery failure worth retrying (429 or 5xx)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class HistoryError(SluiceError):
    """History could not be read or written."""

"""Where a ``/ask`` interaction's token waits for the worker that answers it.

The token lets whoever holds it edit the bot's reply for 15 minutes, so it is kept
out of everything that lasts or gets printed: job payloads and arq's job results
carry only an opaque reference (a hash of the token, :func:`token_ref`), the rate-limit
bucket of its webhook route is named by that reference too, and the token itself sits
in one key, ``{prefix}:discord:interaction:{ref}``, that expires when Discord stops
accepting the token and is deleted once the reply is delivered. Every process that
handles a token registers it with the log redaction (:func:`core.infra.logs.register_secret`).
"""

from __future__ import annotations

import hashlib

from redis.asyncio import Redis

from core.infra.logs import register_secret
from core.infra.redis import Keys

# Discord accepts an interaction token for 15 minutes after the interaction.
TOKEN_TTL_S = 15 * 60


def token_ref(token: str) -> str:
    """The opaque reference that stands for ``token`` in jobs and key names."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def token_key(keys: Keys, ref: str) -> str:
    """The Redis key that holds the token of ``ref``."""
    return f"{keys.prefix}:discord:interaction:{ref}"


async def keep_token(redis: Redis, keys: Keys, token: str) -> str:
    """Store ``token`` for :data:`TOKEN_TTL_S`; returns its reference.

    Raises:
        redis.exceptions.RedisError: Redis is unreachable (nothing was enqueued yet).
    """
    register_secret(token)
    ref = token_ref(token)
    await redis.set(token_key(keys, ref), token, ex=TOKEN_TTL_S)
    return ref


async def load_token(redis: Redis, keys: Keys, ref: str) -> str | None:
    """The token of ``ref``, or ``None`` once it expired or the reply was delivered."""
    raw = await redis.get(token_key(keys, ref))
    if raw is None:
        return None
    token = raw.decode() if isinstance(raw, bytes) else str(raw)
    register_secret(token)
    return token


async def forget_token(redis: Redis, keys: Keys, ref: str) -> None:
    """Delete the token of ``ref`` (the reply is out; nothing edits it any more)."""
    await redis.delete(token_key(keys, ref))

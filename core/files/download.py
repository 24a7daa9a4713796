"""A streamed, size-limited download of one attached file.

The size the platform declared is checked before anything is fetched, the
``Content-Length`` before the body is read, and the running total while it streams:
a server that lies about the size cannot make a worker hold more than
``max_bytes + 64 KiB``. Redirects are followed by hand (at most
:data:`MAX_REDIRECTS`); credentials in ``headers`` go only to the host the download
started on, never to a host a redirect points at.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from urllib.parse import urljoin, urlsplit

import aiohttp

from core.errors import FileRefusedError

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 3
CHUNK_BYTES = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def origin(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of ``url``: what must match for credentials to be sent."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def too_large_text(name: str, size: int, max_bytes: int) -> str:
    """The notice for a file over the size limit."""
    return f"{name} is too large ({_mb(size)}; the limit is {_mb(max_bytes)})."


def _mb(n: int) -> str:
    return f"{n / 1_000_000:,.1f} MB" if n >= 1_000_000 else f"{n / 1000:,.0f} KB"


async def download(
    session: aiohttp.ClientSession,
    url: str,
    *,
    name: str,
    max_bytes: int,
    timeout_s: float,
    headers: Mapping[str, str] | None = None,
) -> tuple[bytes, str]:
    """The body and ``Content-Type`` of ``url``, at most ``max_bytes`` long.

    ``name`` is the file's name, for the notices.

    Raises:
        FileRefusedError: too large (declared or while streaming), not reachable, an
            HTTP error, too many redirects or a timeout; the message is safe to show.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await _fetch(session, url, name, max_bytes, dict(headers or {}))
    except TimeoutError as e:
        raise FileRefusedError(f"{name} could not be downloaded in time.") from e
    except aiohttp.ClientError as e:
        logger.warning("download of a file failed: %s", type(e).__name__)
        raise FileRefusedError(f"{name} could not be downloaded.") from e


async def _fetch(
    session: aiohttp.ClientSession,
    url: str,
    name: str,
    max_bytes: int,
    headers: dict[str, str],
) -> tuple[bytes, str]:
    start = origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        # The token only ever goes to where the download started.
        sent = headers if origin(url) == start else {}
        async with session.get(url, headers=sent, allow_redirects=False) as resp:
            if resp.status in _REDIRECTS and resp.headers.get("Location"):
                url = urljoin(url, resp.headers["Location"])
                if urlsplit(url).scheme not in ("http", "https"):
                    raise FileRefusedError(f"{name} could not be downloaded.")
                continue
            if resp.status >= 400:
                logger.warning("download of a file answered HTTP %d", resp.status)
                raise FileRefusedError(f"{name} could not be downloaded (HTTP {resp.status}).")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise FileRefusedError(too_large_text(name, resp.content_length, max_bytes))
            body = bytearray()
            async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                body += chunk
                if len(body) > max_bytes:
                    # The server sent more than it declared, or declared nothing.
                    raise FileRefusedError(
                        f"{name} is too large (more than {_mb(max_bytes)}, the limit)."
                    )
            return bytes(body), resp.headers.get("Content-Type", "")
    raise FileRefusedError(f"{name} could not be downloaded (too many redirects).")

"""Who may use the web chat: allowed Host and Origin names, signed sessions, sign-in.

The web chat is a development tool unless configured otherwise (DESIGN.md):

- it answers only to the host names in ``SLUICE_WEB_ALLOWED_HOSTS`` (loopback by
  default), so a DNS-rebound name cannot reach it, and only to pages from those names;
- its sessions are issued by the server and bound to an HMAC-SHA256-signed cookie
  (``SLUICE_WEB_SECRET``), so a session id alone can neither read nor write;
- off loopback it refuses to start without a sign-in: ``SLUICE_WEB_AUTH`` (a callable
  that names the user of a request) or ``SLUICE_WEB_TOKEN`` (a shared token).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import inspect
import ipaddress
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from aiohttp import web

from core.errors import ConfigError
from core.settings import Settings

logger = logging.getLogger(__name__)

COOKIE = "sluice_session"
MIN_SECRET_CHARS = 32
MIN_TOKEN_CHARS = 16
MAKE_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
USER_ID_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")

AuthHook = Callable[[web.Request], "str | Awaitable[str | None] | None"]


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # "", "0.0.0.0"-like names and host names: reachable from elsewhere


def check_exposure(settings: Settings, host: str) -> None:
    """Refuse to serve the web chat off loopback without a sign-in and a shared secret.

    Raises:
        ConfigError: bound off loopback without ``SLUICE_WEB_AUTH``/``SLUICE_WEB_TOKEN``
            or without ``SLUICE_WEB_SECRET``; the message names the settings.
    """
    if is_loopback(host):
        return
    if settings.web_auth is None and settings.web_token is None:
        raise ConfigError(
            f"The web chat would listen on {host or 'every interface'}, off loopback, "
            "where anyone who reaches it could use it: set SLUICE_WEB_AUTH=module:function "
            "(your sign-in check: it gets the request and returns a user id or None) or "
            "SLUICE_WEB_TOKEN=<a shared token of 16+ characters>, and "
            f"SLUICE_WEB_SECRET=<32+ random characters> ({MAKE_KEY}). "
            "Or bind it to 127.0.0.1 (SLUICE_WEB_HOST / --host)."
        )
    if settings.web_secret is None:
        raise ConfigError(
            f"The web chat would listen on {host or 'every interface'}, off loopback, "
            "without SLUICE_WEB_SECRET: set it to 32+ random characters "
            f"({MAKE_KEY}), the same for every web process, so that sessions are "
            "signed with a key that survives restarts and is shared by replicas."
        )
    if set(settings.web_allowed_hosts) <= {"127.0.0.1", "localhost", "[::1]"}:
        logger.warning(
            "web chat bound to %s but SLUICE_WEB_ALLOWED_HOSTS lists only loopback names: "
            "requests for any other host name get 421; list the public names there",
            host,
        )


def load_auth_hook(spec: str) -> AuthHook:
    """Import ``module:function`` (``SLUICE_WEB_AUTH``).

    Raises:
        ConfigError: the spec is malformed, the module does not import, or the
            attribute is not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"SLUICE_WEB_AUTH must look like module:function, not {spec!r}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"SLUICE_WEB_AUTH={spec}: cannot import {module_name}: {e}") from e
    hook = getattr(module, attr, None)
    if not callable(hook):
        raise ConfigError(f"SLUICE_WEB_AUTH={spec}: {module_name} has no function {attr!r}.")
    return cast(AuthHook, hook)


def parse_host(value: str) -> tuple[str, int | None] | None:
    """``name[:port]`` (``[v6]:port`` too) as (lower-case name, port); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
    elif ":" in value:
        name, _, port_text = value.rpartition(":")
        rest = ":" + port_text
    else:
        name, rest = value, ""
    if not name or any(c in name for c in "/\\@ \t"):
        return None
    if not rest:
        return name, None
    port_text = rest[1:]
    if not rest.startswith(":") or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return name, int(port_text)


class HostRules:
    """The allowed host names (``SLUICE_WEB_ALLOWED_HOSTS``)."""

    def __init__(self, entries: list[str]) -> None:
        self.rules: list[tuple[str, int | None]] = []
        for entry in entries:
            parsed = parse_host(entry)
            if parsed is None:
                raise ConfigError(
                    f"SLUICE_WEB_ALLOWED_HOSTS: {entry!r} is not a host name or name:port."
                )
            self.rules.append(parsed)

    def allows(self, host: str) -> bool:
        """Whether a ``Host`` header value names this web chat."""
        parsed = parse_host(host)
        if parsed is None:
            return False
        name, port = parsed
        return any(n == name and (p is None or p == port) for n, p in self.rules)

    def allows_origin(self, origin: str) -> bool:
        """Whether an ``Origin`` header names a page of this web chat."""
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or "@" in parts.netloc or parts.path:
            return False
        return self.allows(parts.netloc)


@dataclass(frozen=True)
class Identity:
    """Who a request is: its session (the conversation) and its user (for limits)."""

    session: str
    user: str


class Signer:
    """HMAC-SHA256 over a session id and what it is bound to (the sign-in)."""

    def __init__(self, settings: Settings) -> None:
        if settings.web_secret is None:
            self.key = secrets.token_bytes(32)
            self.random = True
            logger.warning(
                "SLUICE_WEB_SECRET is unset: web chat sessions are signed with a random key "
                "of this process; they end when it restarts, and other web processes cannot "
                "read them (set SLUICE_WEB_SECRET, the same for every web process)"
            )
        else:
            secret = settings.web_secret.get_secret_value()
            if len(secret) < MIN_SECRET_CHARS:
                raise ConfigError(
                    f"SLUICE_WEB_SECRET is too short ({len(secret)} characters): use "
                    f"{MIN_SECRET_CHARS}+ random characters ({MAKE_KEY})."
                )
            self.key = secret.encode("utf-8")
            self.random = False

    def _mac(self, session: str, bound_to: str) -> str:
        digest = hmac.new(self.key, f"{session}\n{bound_to}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, session: str, bound_to: str) -> str:
        """The cookie value for a session bound to ``bound_to``."""
        return f"{session}.{self._mac(session, bound_to)}"

    def verify(self, cookie: str, bound_to: str) -> str | None:
        """The session id of a cookie whose signature holds, else None."""
        session, dot, mac = cookie.partition(".")
        if not dot or not SESSION_ID_RE.match(session):
            return None
        if not hmac.compare_digest(mac.encode(), self._mac(session, bound_to).encode()):
            return None
        return session


def new_session_id() -> str:
    """A fresh, unguessable session id (24 URL-safe characters)."""
    return secrets.token_urlsafe(18)


class Gate:
    """The web chat's sign-in: none (loopback), a shared token, or a hook."""

    def __init__(self, settings: Settings) -> None:
        if settings.web_auth is not None and settings.web_token is not None:
            raise ConfigError(
                "Set one of SLUICE_WEB_AUTH (a sign-in hook) and SLUICE_WEB_TOKEN (a shared "
                "token), not both."
            )
        self.hook: AuthHook | None = (
            load_auth_hook(settings.web_auth) if settings.web_auth is not None else None
        )
        self.token: bytes | None = None
        if settings.web_token is not None:
            token = settings.web_token.get_secret_value()
            if len(token) < MIN_TOKEN_CHARS:
                raise ConfigError(
                    f"SLUICE_WEB_TOKEN is too short ({len(token)} characters): use "
                    f"{MIN_TOKEN_CHARS}+ random characters ({MAKE_KEY})."
                )
            self.token = token.encode("utf-8")
        self.spec = settings.web_auth
        self.mode = "hook" if self.hook else "token" if self.token else "open"

    def token_matches(self, candidate: str) -> bool:
        """Constant-time comparison with ``SLUICE_WEB_TOKEN``."""
        if self.token is None:
            return False
        return hmac.compare_digest(candidate.encode("utf-8", "replace"), self.token)

    def token_binding(self) -> str:
        """What a token session is bound to: a digest of the token (a new token ends them)."""
        assert self.token is not None
        return "token:" + hashlib.sha256(self.token).hexdigest()

    async def hook_user(self, request: web.Request) -> str | None:
        """The hook's user id for a request (None: not signed in).

        Raises:
            web.HTTPServiceUnavailable: the hook failed or returned something unusable
                (logged with the detail; the client sees a short JSON error).
        """
        assert self.hook is not None
        try:
            result = self.hook(request)
            if inspect.isawaitable(result):
                result = await result
        except Exception:
            logger.error("web sign-in hook %s failed", self.spec, exc_info=True)
            raise _unavailable("The sign-in check failed; please try again shortly.") from None
        if result is None:
            return None
        if not isinstance(result, str) or not USER_ID_RE.match(result):
            logger.error(
                "web sign-in hook %s returned %s, not a user id (1-128 printable characters)",
                self.spec,
                type(result).__name__,
            )
            raise _unavailable("The sign-in check failed; please try again shortly.")
        return result


def _unavailable(message: str) -> web.HTTPServiceUnavailable:
    return web.HTTPServiceUnavailable(
        text=json.dumps({"error": message}), content_type="application/json"
    )


def bearer(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer …`` header, if any."""
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def cookie_secure(settings: Settings, request: web.Request) -> bool:
    """Whether to mark the session cookie ``Secure``."""
    if settings.web_cookie_secure is not None:
        return settings.web_cookie_secure
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or proto == "https"

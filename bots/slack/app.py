"""``sluice slack``: the Bolt app, its HTTP server (aiohttp) and Socket Mode.

HTTP mode serves ``POST /slack/events`` (Events API, slash commands),
``GET /slack/install`` and ``GET /slack/oauth_redirect`` (multi-workspace OAuth) and
``GET /healthz``. Requests are checked at the edge before Bolt sees them: too
large → 413, bad signature or timestamp older than 5 minutes → 401, unparseable
body → 400. Socket Mode is used when ``SLACK_APP_TOKEN`` is set.

Modes: with ``SLACK_CLIENT_ID`` and ``SLACK_CLIENT_SECRET`` the app is installable
into many workspaces (installations in the SQL database, tokens encrypted: it does
not start without ``SLUICE_ENCRYPTION_KEY``); with only ``SLACK_BOT_TOKEN`` it serves
one workspace. ``GET /slack/install`` is limited per client address and in total
(429 with a short page over either).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.authorization.async_authorize import AsyncInstallationStoreAuthorize
from slack_bolt.oauth.async_oauth_flow import AsyncOAuthFlow
from slack_bolt.oauth.async_oauth_settings import AsyncOAuthSettings
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from bots.slack.convert import payload_problem
from bots.slack.installations import InstallRefused, RedisOAuthStateStore, SQLInstallationStore
from bots.slack.intake import Intake
from bots.slack.listeners import SluiceListeners, register
from core.errors import ConfigError, QueueError
from core.infra.heartbeat import process_ops
from core.infra.metrics import metrics_routes
from core.infra.signals import stop_on_signals
from core.settings import Settings

logger = logging.getLogger(__name__)

BOT_SCOPES = [
    "app_mentions:read",
    "assistant:write",
    "channels:history",
    "chat:write",
    "commands",
    # Files users share with the bot: the worker downloads url_private (core.files).
    "files:read",
    "groups:history",
    "im:history",
    "im:write",
    "mpim:history",
]
EVENTS_PATH = "/slack/events"
INSTALL_PATH = "/slack/install"
REDIRECT_PATH = "/slack/oauth_redirect"


class _WebClient(AsyncWebClient):
    """slack_sdk's client, sending OAuth client credentials in the form body.

    Slack accepts them there as well as in Basic auth; slack_sdk's Basic auth path
    uses ``aiohttp.BasicAuth``, which aiohttp 3.14 deprecates with a warning.
    """

    async def oauth_v2_access(
        self,
        *,
        client_id: str,
        client_secret: str,
        code: str | None = None,
        redirect_uri: str | None = None,
        grant_type: str | None = None,
        refresh_token: str | None = None,
        **kwargs: Any,
    ) -> AsyncSlackResponse:
        params = {
            "client_id": client_id,
            "client_secret": client_secret,
            "code": code,
            "redirect_uri": redirect_uri,
            "grant_type": grant_type,
            "refresh_token": refresh_token,
            **kwargs,
        }
        return await self.api_call(
            "oauth.v2.access", data={k: v for k, v in params.items() if v is not None}
        )


class _Authorize(AsyncInstallationStoreAuthorize):
    """Bolt's installation-store authorize, one workspace at a time.

    Bolt caches the ``auth.test`` result per token but does not stop a burst of a
    workspace's events from all missing the cache at once; holding a per-workspace
    lock makes the first event fill the cache and the rest hit it.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._locks: dict[tuple[str | None, str | None], asyncio.Lock] = {}

    async def __call__(
        self,
        *,
        enterprise_id: str | None,
        team_id: str | None,
        **kwargs: Any,
    ) -> AuthorizeResult | None:
        lock = self._locks.setdefault((enterprise_id, team_id), asyncio.Lock())
        async with lock:
            return await super().__call__(enterprise_id=enterprise_id, team_id=team_id, **kwargs)


class _OAuthFlow(AsyncOAuthFlow):
    """Bolt's OAuth flow, issuing each state for the client address that asked.

    The route puts the address in the request context; :class:`RedisOAuthStateStore`
    limits states per address and in total and raises :class:`InstallRefused`.
    """

    async def issue_new_state(self, request: AsyncBoltRequest) -> str:
        store = self.settings.state_store
        assert isinstance(store, RedisOAuthStateStore)
        return await store.async_issue(client=str(request.context.get(_CLIENT) or "unknown"))


_CLIENT = "sluice_client_address"


def is_multi_workspace(settings: Settings) -> bool:
    """OAuth installs (many workspaces) rather than one ``SLACK_BOT_TOKEN``."""
    return bool(settings.slack_client_id and settings.slack_client_secret)


@dataclass
class SlackApp:
    """Everything ``sluice slack`` runs, for tests and for the CLI."""

    bolt: AsyncApp
    listeners: SluiceListeners
    installation_store: SQLInstallationStore | None

    async def close(self) -> None:
        """Close Redis and database connections."""
        await self.listeners.intake.close()
        if self.installation_store is not None:
            await self.installation_store.close()


async def build_app(settings: Settings, intake: Intake | None = None) -> SlackApp:
    """The Bolt app with Sluice's listeners, configured from ``settings``."""
    if settings.slack_signing_secret is None and settings.slack_app_token is None:
        raise ConfigError(
            "SLACK_SIGNING_SECRET is not set: copy it from your Slack app's "
            "Basic Information page (or set SLACK_APP_TOKEN for Socket Mode)."
        )
    intake = intake or Intake(settings)
    client = _WebClient(base_url=settings.slack_api_url)
    secret = (
        settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else None
    )
    store: SQLInstallationStore | None = None
    if is_multi_workspace(settings):
        store = SQLInstallationStore(settings)
        await store.create_tables()
        assert settings.slack_client_secret is not None
        oauth = AsyncOAuthSettings(
            client_id=settings.slack_client_id,
            client_secret=settings.slack_client_secret.get_secret_value(),
            scopes=BOT_SCOPES,
            installation_store=store,
            installation_store_bot_only=True,
            state_store=RedisOAuthStateStore(
                intake.redis,
                intake.keys,
                max_states=settings.slack_install_max_states,
                per_client_per_min=settings.slack_install_per_client_per_min,
            ),
            install_path=INSTALL_PATH,
            redirect_uri_path=REDIRECT_PATH,
            install_page_rendering_enabled=False,
        )
        # Bolt's authorize calls auth.test for every event unless its result is cached
        # per token. The token itself is still looked up for every event (the store
        # keeps it a few seconds), so an uninstalled workspace is refused.
        authorize = _Authorize(
            installation_store=store,
            client_id=oauth.client_id,
            client_secret=oauth.client_secret,
            logger=logger,
            bot_only=True,
            client=client,
            cache_enabled=True,
        )
        bolt = AsyncApp(
            signing_secret=secret,
            client=client,
            oauth_flow=_OAuthFlow(client=client, logger=logger, settings=oauth),
            authorize=authorize,  # type: ignore[arg-type]  # bolt accepts AsyncAuthorize objects
            installation_store_bot_only=True,
            request_verification_enabled=secret is not None,
        )
    else:
        if settings.slack_bot_token is None:
            raise ConfigError(
                "Set SLACK_BOT_TOKEN (one workspace) or SLACK_CLIENT_ID and "
                "SLACK_CLIENT_SECRET (installable app) for `sluice slack`."
            )
        # Bolt takes the token from the client when a client is given.
        client.token = settings.slack_bot_token.get_secret_value()
        bolt = AsyncApp(
            signing_secret=secret,
            client=client,
            request_verification_enabled=secret is not None,
        )
    listeners = register(bolt, settings, intake=intake, installation_store=store)

    # Registered last, so it only sees what every other listener passed on: channel
    # chatter, edits, bot messages, events Sluice does not use. They are acked (200)
    # so that Slack does not deliver them again.
    @bolt.event(re.compile(".*"))
    async def other_events() -> None:
        """Nothing to do."""

    return SlackApp(bolt=bolt, listeners=listeners, installation_store=store)


_COMMAND_FIELDS = ("user_id", "channel_id", "trigger_id")

_REFUSED_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Try again later</title></head>
<body><h1>Too many install attempts</h1><p>{reason}. Please try again in {wait} seconds.</p>
</body></html>
"""


def client_address(request: web.Request, settings: Settings) -> str:
    """The address ``/slack/install`` limits: the peer, or the proxy's last forwarded entry."""
    if settings.slack_trust_forwarded_for:
        forwarded = request.headers.get("X-Forwarded-For", "")
        last = forwarded.rsplit(",", 1)[-1].strip()
        if last:
            return last[:64]
    return request.remote or "unknown"


def refused_page(e: InstallRefused) -> web.Response:
    """429 with a short page and ``Retry-After``."""
    reason = (
        "Too many install attempts from your address"
        if e.per_client
        else ("Too many installs are in progress right now")
    )
    return web.Response(
        status=429,
        text=_REFUSED_PAGE.format(reason=html.escape(reason), wait=e.retry_after_s),
        content_type="text/html",
        headers={"Retry-After": str(e.retry_after_s)},
    )


def _body_problem(body: bytes, content_type: str) -> str | None:
    """Why a signed request body cannot be handled (``None``: it can)."""
    try:
        text = body.decode("utf-8")
        if content_type == "application/json":
            data = json.loads(text)
            if not isinstance(data, dict):
                return "the body must be a JSON object"
            return payload_problem(data)
        form = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text))
        if "payload" in form:
            data = json.loads(form["payload"][0])
            return (
                payload_problem(data)
                if isinstance(data, dict)
                else "'payload' must be a JSON object"
            )
        if "command" in form:
            missing = [k for k in _COMMAND_FIELDS if not (form.get(k) or [""])[0]]
            if missing:
                return f"a slash command needs {', '.join(missing)}"
        return None if form else "empty body"
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: JSON nested deeper than the parser's stack.
        return "the body is not valid UTF-8 JSON or form data"


async def _oauth(bolt: AsyncApp, request: web.Request, settings: Settings) -> web.StreamResponse:
    """``GET /slack/install`` and ``GET /slack/oauth_redirect``, through bolt's flow."""
    flow = bolt.oauth_flow
    if flow is None:
        return web.Response(status=404, text="this app is not installable (no OAuth)")
    bolt_req = AsyncBoltRequest(
        body="",
        query=request.query_string,
        headers={k: v for k, v in request.headers.items()},
        context={_CLIENT: client_address(request, settings)},
    )
    if request.path == INSTALL_PATH:
        try:
            bolt_resp = await flow.handle_installation(bolt_req)
        except InstallRefused as e:
            return refused_page(e)
    else:
        bolt_resp = await flow.handle_callback(bolt_req)
    return await to_aiohttp_response(bolt_resp)


def web_app(slack: SlackApp, settings: Settings) -> web.Application:
    """The aiohttp application of HTTP mode."""
    secret = (
        settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else ""
    )
    verifier = SignatureVerifier(secret)
    bolt = slack.bolt
    max_bytes = settings.max_body_bytes

    async def events(request: web.Request) -> web.StreamResponse:
        if (request.content_length or 0) > max_bytes:
            return web.Response(status=413, text="body too large")
        body = await request.content.read(max_bytes + 1)
        if len(body) > max_bytes:
            return web.Response(status=413, text="body too large")
        timestamp = request.headers.get("X-Slack-Request-Timestamp", "")
        signature = request.headers.get("X-Slack-Signature", "")
        try:
            valid = bool(
                timestamp.isdigit() and signature and verifier.is_valid(body, timestamp, signature)
            )
        except UnicodeDecodeError:  # slack_sdk decodes the body to sign it
            return web.Response(status=400, text="malformed body: not valid UTF-8")
        if not valid:
            return web.Response(status=401, text="invalid signature or stale timestamp")
        problem = _body_problem(body, request.content_type)
        if problem is not None:
            return web.Response(status=400, text=f"malformed body: {problem}")
        bolt_req = AsyncBoltRequest(
            body=body.decode("utf-8"),
            query=request.query_string,
            headers={k: v for k, v in request.headers.items()},
        )
        return await to_aiohttp_response(await bolt.async_dispatch(bolt_req))

    async def oauth(request: web.Request) -> web.StreamResponse:
        return await _oauth(bolt, request, settings)

    async def healthz(request: web.Request) -> web.Response:
        try:
            redis = await slack.listeners.intake.redis()
            await redis.ping()
        except (QueueError, OSError, ConnectionError) as e:
            return web.json_response({"ok": False, "redis": str(e)}, status=503)
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=max_bytes)
    app.router.add_post(EVENTS_PATH, events)
    app.router.add_get(INSTALL_PATH, oauth)
    app.router.add_get(REDIRECT_PATH, oauth)
    app.router.add_get("/healthz", healthz)
    metrics_routes(app)

    async def on_cleanup(_: web.Application) -> None:
        await slack.close()

    app.on_cleanup.append(on_cleanup)
    return app


def is_configured(settings: Settings) -> bool:
    """Enough Slack settings to run the adapter (``sluice dev`` starts it then)."""
    return bool(
        (settings.slack_bot_token or is_multi_workspace(settings))
        and (settings.slack_signing_secret or settings.slack_app_token)
    )


@contextlib.asynccontextmanager
async def running(
    settings: Settings, host: str = "127.0.0.1", port: int | None = None
) -> AsyncIterator[str]:
    """Run the Slack adapter in the current event loop; yields what it listens on.

    Socket Mode when ``SLACK_APP_TOKEN`` is set, else HTTP on ``host:port``
    (``SLUICE_SLACK_PORT`` by default).
    """
    port = settings.slack_port if port is None else port
    async with process_ops(settings, "adapter:slack"):
        async with _running(settings, host, port) as where:
            yield where


@contextlib.asynccontextmanager
async def _running(settings: Settings, host: str, port: int) -> AsyncIterator[str]:
    slack = await build_app(settings)
    if settings.slack_app_token is not None:
        from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler

        handler = AsyncSocketModeHandler(slack.bolt, settings.slack_app_token.get_secret_value())
        # slack_bolt leaves the Socket Mode handler's methods unannotated.
        await handler.connect_async()  # type: ignore[no-untyped-call]
        logger.info("slack adapter (Socket Mode) connected")
        try:
            yield "Socket Mode"
        finally:
            await handler.close_async()  # type: ignore[no-untyped-call]
            await slack.close()
        return
    runner = web.AppRunner(web_app(slack, settings), access_log=None)
    await runner.setup()
    try:
        # A deep accept queue: a burst of Slack deliveries must not wait for SYN retries.
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        where = f"http://{host}:{port}{EVENTS_PATH}"
        logger.info(
            "slack adapter (HTTP, %s) on %s",
            "multi-workspace" if is_multi_workspace(settings) else "single workspace",
            where,
        )
        yield where
    finally:
        await runner.cleanup()  # closes the app's Redis and database connections


async def serve(settings: Settings, host: str, port: int) -> None:
    """``sluice slack``: serve until SIGINT/SIGTERM, then stop accepting and close."""
    stop = stop_on_signals()
    async with running(settings, host, port):
        await stop.wait()

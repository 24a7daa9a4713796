"""The local web chat: one page, an endpoint to send, a stream of replies (SSE).

``POST /api/session`` issues (or renews) the caller's session: a server-chosen id in
a signed, HttpOnly, SameSite=Strict cookie; with ``SLUICE_WEB_TOKEN`` or
``SLUICE_WEB_AUTH`` only after sign-in. ``POST /api/messages`` validates, enqueues a
``reply`` job and answers 202 at once; ``GET /api/events`` streams the session's
replies as server-sent events from its Redis outbox. Both act only for the session
of a valid cookie. Every route answers only to the allowed host names, and only to
pages from them (:mod:`bots.web.security`). One browser's tabs share its session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from bots.web.responder import publish
from bots.web.security import (
    COOKIE,
    Gate,
    HostRules,
    Identity,
    Signer,
    bearer,
    cookie_secure,
    new_session_id,
)
from core.errors import QueueError
from core.infra.heartbeat import add_heartbeat
from core.infra.metrics import ACK_SECONDS, metrics_routes
from core.infra.redis import Keys
from core.messages import IncomingMessage
from core.settings import Settings
from core.traffic.queue import (
    Accepted,
    accept_message,
    arq_job_id,
    connect_queue,
    message_lane,
)

logger = logging.getLogger(__name__)

ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
SSE_BLOCK_MS = 15_000
# Redis connections of the web pool kept for sending while reply streams hold the rest.
SEND_CONNECTIONS = 16

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
REDIS: web.AppKey[ArqRedis] = web.AppKey("redis", ArqRedis)
STREAMS: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("streams", set)
SIGNER: web.AppKey[Signer] = web.AppKey("signer", Signer)
GATE: web.AppKey[Gate] = web.AppKey("gate", Gate)
HOSTS: web.AppKey[HostRules] = web.AppKey("hosts", HostRules)
OPEN: web.AppKey[Counter[str]] = web.AppKey("open_streams", Counter)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _read_json(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(
            413, f"Body too large: the limit is {request.app[SETTINGS].max_body_bytes:,} bytes."
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return _error(400, f"Body is not valid UTF-8 (byte {e.start}).")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        return _error(400, f"Body is not valid JSON: {e}")
    if not isinstance(data, dict):
        return _error(400, 'Body must be a JSON object, e.g. {"text": "hello"}.')
    return data


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route: an allowed ``Host``, an allowed ``Origin`` when there is one (and
    one on a browser's POST), and JSON bodies only."""
    hosts = request.app[HOSTS]
    host = request.headers.get("Host")
    if host is None:
        return _error(400, "A Host header is required.")
    if not hosts.allows(host):
        return _error(
            421,
            "This web chat does not answer to that host name; its operator can add it "
            "to SLUICE_WEB_ALLOWED_HOSTS.",
        )
    origin = request.headers.get("Origin")
    if origin is not None and not hosts.allows_origin(origin):
        return _error(403, "Requests from pages of other sites are refused.")
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        fetch_site = request.headers.get("Sec-Fetch-Site")
        if fetch_site == "cross-site" or (origin is None and fetch_site is not None):
            return _error(403, "Requests from pages of other sites are refused.")
        if request.content_type != "application/json":
            return _error(415, "Send the body as JSON (Content-Type: application/json).")
    return await handler(request)


def _binding(request: web.Request, user: str | None) -> str:
    """What a session of this request is bound to: the hook's user, the token, or none."""
    gate = request.app[GATE]
    if gate.mode == "hook":
        return "user:" + str(user)
    if gate.mode == "token":
        return gate.token_binding()
    return "open"


def _identity(request: web.Request, session: str, user: str | None) -> Identity:
    # Namespaced: a web user id never equals a Slack/Discord id or an admin id.
    return Identity(session=session, user="web:" + (user if user is not None else session))


def _sign_in_required(request: web.Request) -> web.Response:
    gate = request.app[GATE]
    if gate.mode == "token":
        return web.json_response(
            {"error": "This web chat needs its access token.", "auth": "token"}, status=401
        )
    return web.json_response(
        {"error": "Sign in first: this web chat admits signed-in users only.", "auth": "sign-in"},
        status=401,
    )


async def identify(request: web.Request) -> Identity | web.Response:
    """The session of the request's signed cookie (and, with a hook, its signed-in
    user); a 401 JSON response when there is none or it does not verify."""
    gate = request.app[GATE]
    user = None
    if gate.mode == "hook":
        user = await gate.hook_user(request)
        if user is None:
            return _sign_in_required(request)
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        return _error(401, "No session: POST /api/session first (the page does this).")
    session = request.app[SIGNER].verify(cookie, _binding(request, user))
    if session is None:
        return _error(401, "The session cookie is not valid (expired or forged): reload the page.")
    return _identity(request, session, user)


def _check_named_session(identity: Identity, named: object) -> web.Response | None:
    """A ``session`` the client names must be its own."""
    if named is None:
        return None
    if named != identity.session:
        return _error(403, "'session' is not the session of your cookie.")
    return None


async def open_session(request: web.Request) -> web.Response:
    """Issue the caller's session cookie, or renew the one it holds.

    With ``SLUICE_WEB_TOKEN`` the body's ``token`` (or ``Authorization: Bearer``) must
    match; with ``SLUICE_WEB_AUTH`` the hook must name a user. Answers
    ``{"session", "user"}``; 401 with ``auth`` (``token`` or ``sign-in``) otherwise."""
    data = await _read_json(request)
    if isinstance(data, web.Response):
        return data
    gate = request.app[GATE]
    signer = request.app[SIGNER]
    user = None
    if gate.mode == "hook":
        user = await gate.hook_user(request)
        if user is None:
            return _sign_in_required(request)
    binding = _binding(request, user)
    cookie = request.cookies.get(COOKIE)
    session = signer.verify(cookie, binding) if cookie else None
    if gate.mode == "token":
        token = data.get("token", bearer(request))
        if token is not None:
            if not isinstance(token, str) or not gate.token_matches(token):
                logger.warning("web chat: wrong access token from %s", request.remote)
                return web.json_response(
                    {"error": "That access token is wrong.", "auth": "token"}, status=401
                )
        elif session is None:
            return _sign_in_required(request)
    if session is None:
        session = new_session_id()
    identity = _identity(request, session, user)
    resp = web.json_response({"session": identity.session, "user": identity.user})
    resp.set_cookie(
        COOKIE,
        signer.sign(session, binding),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=cookie_secure(request.app[SETTINGS], request),
    )
    return resp


async def send_message(request: web.Request) -> web.Response:
    """Accept a message from a page: validate, enqueue, answer 202 with its id."""
    started = time.monotonic()
    identity = await identify(request)
    if isinstance(identity, web.Response):
        return identity
    data = await _read_json(request)
    if isinstance(data, web.Response):
        return data
    refused = _check_named_session(identity, data.get("session"))
    if refused is not None:
        return refused
    session, text = identity.session, data.get("text")
    if not isinstance(text, str):
        return _error(400, "'text' must be a string.")
    # Lone surrogates cannot be encoded for Redis or the model; refuse them clearly.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _error(400, "'text' contains invalid Unicode (a lone surrogate).")
    if not text.strip():
        return _error(400, "Message is empty: type something to send.")
    client_id = data.get("id")
    if client_id is not None and (not isinstance(client_id, str) or not ID_RE.match(client_id)):
        return _error(400, "'id' must be 8-64 letters, digits, '-' or '_'.")
    msg = IncomingMessage(
        platform="web",
        tenant="web",
        channel=session,
        user=identity.user,
        message_id=client_id or uuid.uuid4().hex,
        text=text,
        ts=time.time(),
        is_dm=True,
    )
    resp = await _accept(request, msg)
    if resp.status == 202:
        ACK_SECONDS.labels("web").observe(time.monotonic() - started)
    return resp


async def _accept(request: web.Request, msg: IncomingMessage) -> web.Response:
    """Dedupe and enqueue, then show the message; 503 when Redis is down.

    The 202 body holds the message's id, its job's id, the lane it waits in and
    ``refused``: ``true`` when the door refused it (busy, or over a limit: nothing is
    queued and no answer follows), with ``notice``: whether the refusal's notice follows
    on the event stream (``false``: this user was already told in this limit window).
    A duplicate of a message already sent has ``duplicate: true``."""
    settings = request.app[SETTINGS]
    redis = request.app[REDIS]
    body: dict[str, object] = {
        "message_id": msg.message_id,
        "job_id": arq_job_id(settings, msg),
        "lane": message_lane(settings, msg),
        "refused": False,
    }
    try:
        outcome = await accept_message(redis, settings, msg)
        if not outcome:
            return web.json_response({**body, "duplicate": True}, status=202)
        if outcome.refused:
            body["refused"] = True
            body["notice"] = outcome is Accepted.REFUSED
        await publish(
            redis,
            Keys(settings.key_prefix),
            msg.channel,
            {"type": "user", "message_id": msg.message_id, "text": msg.text},
        )
    except (QueueError, RedisError, OSError) as e:
        logger.error("web enqueue failed message=%s: %s", msg.message_id, e)
        return _error(503, "The queue is unavailable right now; please try again shortly.")
    return web.json_response(body, status=202)


async def events(request: web.Request) -> web.StreamResponse:
    """Stream the cookie's session's events as SSE; ``Last-Event-ID`` resumes after a
    reconnect. Open streams are capped per session, per client address and in all
    (each holds a Redis connection): 429 or 503 beyond."""
    identity = await identify(request)
    if isinstance(identity, web.Response):
        return identity
    refused = _check_named_session(identity, request.query.get("session"))
    if refused is not None:
        return refused
    session = identity.session
    settings = request.app[SETTINGS]
    redis = request.app[REDIS]
    key = Keys(settings.key_prefix).web_outbox(session)
    last_id = request.headers.get("Last-Event-ID") or request.query.get("since") or "0-0"
    if not re.match(r"^\d+-\d+$", last_id):
        last_id = "0-0"
    counts = request.app[OPEN]
    slots = ("session:" + session, "ip:" + str(request.remote), "all")
    if counts[slots[0]] >= settings.web_max_streams_per_session:
        return _error(
            429,
            f"This session already has {counts[slots[0]]} open reply streams (the limit): "
            "close another tab of this chat.",
        )
    if counts[slots[1]] >= settings.web_max_streams_per_ip:
        return _error(429, "Too many open reply streams from your address; close some tabs.")
    if counts[slots[2]] >= max(1, settings.web_redis_max_connections - SEND_CONNECTIONS):
        return _error(503, "The web chat has as many open streams as it can hold; try again.")
    for slot in slots:
        counts[slot] += 1
    task = asyncio.current_task()
    streams = request.app[STREAMS]
    if task is not None:
        streams.add(task)
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    try:
        await resp.prepare(request)
        await resp.write(b"retry: 1000\n\n")
        await _pump(redis, key, last_id, resp)
    except ConnectionResetError:
        logger.debug("web events: a session's stream disconnected")
    finally:
        if task is not None:
            streams.discard(task)
        for slot in slots:
            counts[slot] -= 1
            if counts[slot] <= 0:
                del counts[slot]
    return resp


async def _pump(redis: ArqRedis, key: str, last_id: str, resp: web.StreamResponse) -> None:
    while True:
        try:
            got = await redis.xread({key: last_id}, block=SSE_BLOCK_MS, count=100)
        except (RedisError, OSError) as e:
            logger.warning("web events: redis error for session stream: %s", e)
            await asyncio.sleep(1)
            continue
        if not got:
            await resp.write(b": keep-alive\n\n")
            continue
        for _key, entries in got:
            for entry_id, fields in entries:
                last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                data = fields.get(b"data") or fields.get("data") or b"{}"
                if isinstance(data, bytes):
                    data = data.decode()
                await resp.write(f"id: {last_id}\ndata: {data}\n\n".encode())


async def index(request: web.Request) -> web.Response:
    """The chat page; no other site may frame it."""
    page = resources.files("bots.web").joinpath("static/index.html").read_text("utf-8")
    return web.Response(
        text=page,
        content_type="text/html",
        headers={
            "Content-Security-Policy": "frame-ancestors 'none'",
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


async def healthz(request: web.Request) -> web.Response:
    """200 when Redis answers, 503 otherwise."""
    try:
        await request.app[REDIS].ping()
    except (RedisError, OSError):
        return web.json_response({"ok": False, "redis": "unreachable"}, status=503)
    return web.json_response({"ok": True})


async def _close_streams(app: web.Application) -> None:
    # Open SSE streams never end by themselves; end them so shutdown is prompt.
    streams: set[asyncio.Task[Any]] = app[STREAMS]
    for task in list(streams):
        task.cancel()


def create_web_app(settings: Settings, redis: ArqRedis) -> web.Application:
    """The web chat application; ``redis`` is an arq pool from :func:`connect_web_redis`.

    Raises:
        ConfigError: a malformed ``SLUICE_WEB_ALLOWED_HOSTS`` entry, a too short
            ``SLUICE_WEB_SECRET`` or ``SLUICE_WEB_TOKEN``, both sign-ins set, or a
            ``SLUICE_WEB_AUTH`` that does not import.
    """
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[guard])
    app[SETTINGS] = settings
    app[REDIS] = redis
    app[STREAMS] = set()
    app[HOSTS] = HostRules(settings.web_allowed_hosts)
    app[GATE] = Gate(settings)
    app[SIGNER] = Signer(settings)
    app[OPEN] = Counter()
    app.on_shutdown.append(_close_streams)
    app.router.add_get("/", index)
    app.router.add_post("/api/session", open_session)
    app.router.add_post("/api/messages", send_message)
    app.router.add_get("/api/events", events)
    app.router.add_get("/healthz", healthz)
    metrics_routes(app, redis=redis, settings=settings)
    add_heartbeat(
        app, redis, Keys(settings.key_prefix), "adapter:web", settings.health_check_interval_s
    )
    return app


async def connect_web_redis(settings: Settings) -> ArqRedis:
    """The web adapter's Redis pool, capped at ``SLUICE_WEB_REDIS_MAX_CONNECTIONS``."""
    return await connect_queue(settings, max_connections=settings.web_redis_max_connections)

"""The local web chat: one page, an endpoint to send, a stream of replies (SSE).

``POST /api/messages`` validates, enqueues a ``reply`` job and answers 202 at once;
``GET /api/events?session=…`` streams the session's replies as server-sent events
from its Redis outbox. Each browser tab is its own session, so its own user.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from importlib import resources
from typing import Any

from aiohttp import web
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from bots.web.responder import publish
from core.errors import QueueError
from core.heartbeat import add_heartbeat
from core.messages import IncomingMessage
from core.metrics import ACK_SECONDS, metrics_routes
from core.queue import accept_message, arq_job_id, message_lane
from core.redis import Keys
from core.settings import Settings

logger = logging.getLogger(__name__)

SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
SSE_BLOCK_MS = 15_000

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
REDIS: web.AppKey[ArqRedis] = web.AppKey("redis", ArqRedis)
STREAMS: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("streams", set)


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
        return _error(400, "Body must be a JSON object with 'session' and 'text'.")
    return data


async def send_message(request: web.Request) -> web.Response:
    """Accept a message from a page: validate, enqueue, answer 202 with its id."""
    started = time.monotonic()
    data = await _read_json(request)
    if isinstance(data, web.Response):
        return data
    session, text = data.get("session"), data.get("text")
    if not isinstance(session, str) or not SESSION_RE.match(session):
        return _error(400, "'session' must be 1-64 letters, digits, '-' or '_'.")
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
        user=session,
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

    The 202 body holds the message's id, its job's id and the lane it waits in."""
    settings = request.app[SETTINGS]
    redis = request.app[REDIS]
    body = {
        "message_id": msg.message_id,
        "job_id": arq_job_id(settings, msg),
        "lane": message_lane(settings, msg),
    }
    try:
        if not await accept_message(redis, settings, msg):
            return web.json_response({**body, "duplicate": True}, status=202)
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
    """Stream a session's events as SSE; ``Last-Event-ID`` resumes after a reconnect."""
    session = request.query.get("session", "")
    if not SESSION_RE.match(session):
        return _error(400, "'session' must be 1-64 letters, digits, '-' or '_'.")
    settings = request.app[SETTINGS]
    redis = request.app[REDIS]
    key = Keys(settings.key_prefix).web_outbox(session)
    last_id = request.headers.get("Last-Event-ID") or request.query.get("since") or "0-0"
    if not re.match(r"^\d+-\d+$", last_id):
        last_id = "0-0"
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    task = asyncio.current_task()
    streams = request.app[STREAMS]
    if task is not None:
        streams.add(task)
    try:
        await resp.write(b"retry: 1000\n\n")
        await _pump(redis, key, last_id, resp)
    except ConnectionResetError:
        logger.debug("web events: session %s disconnected", session)
    finally:
        if task is not None:
            streams.discard(task)
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
    """The chat page."""
    page = resources.files("bots.web").joinpath("static/index.html").read_text("utf-8")
    return web.Response(text=page, content_type="text/html")


async def healthz(request: web.Request) -> web.Response:
    """200 when Redis answers, 503 otherwise."""
    try:
        await request.app[REDIS].ping()
    except (RedisError, OSError):
        return web.json_response({"ok": False, "redis": "unreachable"}, status=503)
    return web.json_response({"ok": True})


async def _close_streams(app: web.Application) -> None:
    # Open SSE streams never end by themselves; end them so shutdown is prompt.
    for task in list(app[STREAMS]):
        task.cancel()


def create_web_app(settings: Settings, redis: ArqRedis) -> web.Application:
    """The web chat application; ``redis`` is an arq pool from :func:`core.queue.connect_queue`."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[REDIS] = redis
    app[STREAMS] = set()
    app.on_shutdown.append(_close_streams)
    app.router.add_get("/", index)
    app.router.add_post("/api/messages", send_message)
    app.router.add_get("/api/events", events)
    app.router.add_get("/healthz", healthz)
    metrics_routes(app, redis=redis, settings=settings)
    add_heartbeat(
        app, redis, Keys(settings.key_prefix), "adapter:web", settings.health_check_interval_s
    )
    return app

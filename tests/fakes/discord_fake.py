"""A local fake of Discord: the gateway (websocket) and the REST API, on one free port.

The real discord.py client connects to it: point ``discord.http.Route.BASE`` at
:attr:`DiscordFake.api_url` (Sluice does that from ``DISCORD_API_URL``); the gateway
URL comes from the fake's ``GET /gateway/bot``. Workers' responders talk to the same
REST API over plain HTTP.

What it does, like Discord:

- Gateway: HELLO, IDENTIFY -> READY + one GUILD_CREATE per guild, HEARTBEAT -> ACK,
  RESUME -> RESUMED. Tests inject MESSAGE_CREATE and INTERACTION_CREATE; without the
  message-content intent a guild message's content is blanked unless it mentions the
  bot (as Discord does for apps without the privileged intent).
- REST: users/@me, application info, gateway/bot, channels, guild members (a user
  who posted in a guild, or was added with :meth:`DiscordFake.add_member`, is a
  member), create/edit/delete message, typing, thread from a message (dispatching
  THREAD_CREATE), application command bulk overwrite, interaction callback, webhook
  (interaction) original and follow-up messages. Every call is recorded.
- Rate limits: per-route buckets keyed by route and major parameter with
  ``X-RateLimit-Limit/Remaining/Reset/Reset-After/Bucket`` headers, a 429 with JSON
  ``retry_after`` when a bucket is exhausted, and the global limit (50 requests in
  any second; interaction and webhook routes are exempt) answered with
  ``"global": true``.
- Faults: :meth:`DiscordFake.fail` makes matching calls answer 403, 5xx, ... .

Sharding and scoped limits (see the "sharding" and "scoped rate limits" sections):

- IDENTIFY with ``shard: [id, count]`` makes a shard session: its READY names the
  shard and lists only its guilds, and it gets only the events of guilds with
  ``(guild_id >> 22) % count == id`` (DMs go to shard 0), as Discord routes them.
  ``GET /gateway/bot`` recommends :attr:`DiscordFake.recommended_shards`.
- :attr:`DiscordFake.bucket_groups` makes several routes share one bucket (one
  ``X-RateLimit-Bucket`` hash), as Discord does; :meth:`DiscordFake.limit_once`
  answers a 429 with a given ``X-RateLimit-Scope`` (``user``, ``global``, ``shared``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import random
import re
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.files import FileServer, Served

DISCORD_EPOCH_MS = 1420070400000
MESSAGE_CONTENT_INTENT = 1 << 15
EVERYONE_PERMISSIONS = "1071698660929"  # view, send, read history, threads, ...

# (method, path regex, template, major parameter group) -> bucket
_ROUTES: list[tuple[str, str, str]] = [
    ("POST", r"/channels/(?P<major>\d+)/messages", "POST /channels/{channel_id}/messages"),
    (
        "PATCH",
        r"/channels/(?P<major>\d+)/messages/\d+",
        "PATCH /channels/{channel_id}/messages/{message_id}",
    ),
    (
        "DELETE",
        r"/channels/(?P<major>\d+)/messages/\d+",
        "DELETE /channels/{channel_id}/messages/{message_id}",
    ),
    (
        "GET",
        r"/channels/(?P<major>\d+)/messages/\d+",
        "GET /channels/{channel_id}/messages/{message_id}",
    ),
    ("GET", r"/channels/(?P<major>\d+)/messages", "GET /channels/{channel_id}/messages"),
    ("POST", r"/channels/(?P<major>\d+)/typing", "POST /channels/{channel_id}/typing"),
    (
        "POST",
        r"/channels/(?P<major>\d+)/messages/\d+/threads",
        "POST /channels/{channel_id}/messages/{message_id}/threads",
    ),
    ("GET", r"/channels/(?P<major>\d+)", "GET /channels/{channel_id}"),
    (
        "POST",
        r"/interactions/(?P<major>\d+)/[^/]+/callback",
        "POST /interactions/{interaction_id}/{token}/callback",
    ),
    (
        "PATCH",
        r"/webhooks/\d+/(?P<major>[^/]+)/messages/[^/]+",
        "PATCH /webhooks/{application_id}/{token}/messages/{message_id}",
    ),
    (
        "DELETE",
        r"/webhooks/\d+/(?P<major>[^/]+)/messages/[^/]+",
        "DELETE /webhooks/{application_id}/{token}/messages/{message_id}",
    ),
    (
        "GET",
        r"/webhooks/\d+/(?P<major>[^/]+)/messages/[^/]+",
        "GET /webhooks/{application_id}/{token}/messages/{message_id}",
    ),
    ("POST", r"/webhooks/\d+/(?P<major>[^/]+)", "POST /webhooks/{application_id}/{token}"),
    (
        "PUT",
        r"/applications/(?P<major>\d+)/commands",
        "PUT /applications/{application_id}/commands",
    ),
    (
        "GET",
        r"/applications/(?P<major>\d+)/commands",
        "GET /applications/{application_id}/commands",
    ),
    (
        "PUT",
        r"/applications/(?P<major>\d+)/guilds/\d+/commands",
        "PUT /applications/{application_id}/guilds/{guild_id}/commands",
    ),
    (
        "GET",
        r"/guilds/(?P<major>\d+)/members/\d+",
        "GET /guilds/{guild_id}/members/{user_id}",
    ),
    ("GET", r"/users/@me", "GET /users/@me"),
    ("GET", r"/oauth2/applications/@me", "GET /oauth2/applications/@me"),
    ("GET", r"/gateway/bot", "GET /gateway/bot"),
    ("GET", r"/gateway", "GET /gateway"),
]

# Discord's documented per-route limits for the routes Sluice uses (limit, window s).
DEFAULT_LIMITS: dict[str, tuple[int, float]] = {
    "POST /channels/{channel_id}/messages": (5, 5.0),
    "PATCH /channels/{channel_id}/messages/{message_id}": (5, 5.0),
    "DELETE /channels/{channel_id}/messages/{message_id}": (5, 1.0),
    "POST /channels/{channel_id}/typing": (5, 5.0),
    "POST /channels/{channel_id}/messages/{message_id}/threads": (10, 10.0),
    "PATCH /webhooks/{application_id}/{token}/messages/{message_id}": (5, 2.0),
    "POST /webhooks/{application_id}/{token}": (5, 2.0),
    "PUT /applications/{application_id}/commands": (2, 60.0),
}
_FALLBACK_LIMIT = (50, 1.0)
# Interactions are not bound to the bot's global rate limit.
_GLOBAL_EXEMPT = (
    "POST /interactions/",
    "PATCH /webhooks/",
    "POST /webhooks/",
    "GET /webhooks/",
    "DELETE /webhooks/",
)


def _json(data: Any, status: int = 200) -> web.Response:
    # Exactly "application/json", like Discord (discord.py compares the header as is).
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"}
    )


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class Call:
    """One REST request the fake received."""

    method: str
    path: str
    route: str
    major: str
    body: Any
    status: int = 0
    t: float = field(default_factory=time.monotonic)
    is_global_429: bool = False


@dataclass
class _Bucket:
    limit: int
    window_s: float
    count: int = 0
    reset_at: float = 0.0
    key_hash: str = ""


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Interaction:
    """An INTERACTION_CREATE the fake sent, and what the app did with it."""

    id: str
    token: str
    channel_id: str
    created: float
    callback_type: int | None = None
    callback_after_s: float | None = None
    original: dict[str, Any] | None = None
    followups: list[dict[str, Any]] = field(default_factory=list)


class _Session:
    def __init__(self, ws: web.WebSocketResponse, session_id: str, intents: int) -> None:
        self.ws = ws
        self.session_id = session_id
        self.intents = intents
        self.seq = 0
        self.lock = asyncio.Lock()
        self.shard: tuple[int, int] | None = None  # (id, count) when IDENTIFY named one


class DiscordFake:
    """The fake Discord. ``async with DiscordFake() as fake:`` starts it on a free port."""

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        bot_id: int = 900000000000000001,
        application_id: int | None = None,
        limits: dict[str, tuple[int, float]] | None = None,
        global_limit: int = 50,
    ) -> None:
        self.token = token
        self.bot_id = str(bot_id)
        self.application_id = str(application_id or bot_id)
        self.limits = {**DEFAULT_LIMITS, **(limits or {})}
        self.global_limit = global_limit
        self.bot_user = self.user(bot_id, "sluice", bot=True)
        self.guilds: dict[str, dict[str, Any]] = {}
        self.guild_members: dict[str, dict[str, list[str]]] = {}  # guild -> user -> roles
        self.channels: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, dict[str, Any]] = {}  # id -> message (all channels)
        self.calls: list[Call] = []
        self.interactions: dict[str, Interaction] = {}
        self.commands: list[dict[str, Any]] = []
        self.identifies: list[dict[str, Any]] = []
        self.connected = asyncio.Event()
        self.resumes = 0
        self._replay: list[tuple[str, dict[str, Any]]] = []
        self._sessions: list[_Session] = []
        self._buckets: dict[str, _Bucket] = {}
        self._global_window: deque[float] = deque()
        self._faults: list[_Fault] = []
        # A random start for the low bits: fakes in parallel test processes must not
        # hand out the same ids in the same millisecond (job ids derive from them).
        self._ids = itertools.count(random.randrange(1 << 22))
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.recommended_shards = 1
        self.bucket_groups: dict[str, str] = {}  # route template -> shared bucket name
        # A slow network on demand: while ``hold`` is an unset event, REST requests wait
        # for it before they arrive (are counted against limits); ``held`` counts them.
        self.hold: asyncio.Event | None = None
        self.held = 0
        self._session_shards: dict[str, tuple[int, int]] = {}
        self.shard_events: list[tuple[tuple[int, int], str, str]] = []  # (shard, event, id)
        self.file_server = FileServer()  # attachments (the CDN)

    # --- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> DiscordFake:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        app = web.Application()
        app.router.add_get("/gateway-ws", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        app.router.add_get("/attachments/{channel_id}/{attachment_id}/{name}", self._attachment)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def close(self) -> None:
        """Close every gateway connection and stop the server."""
        for s in list(self._sessions):
            await s.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        """The REST base URL (what ``DISCORD_API_URL`` should be)."""
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        """The websocket URL ``GET /gateway/bot`` hands out."""
        return f"ws://127.0.0.1:{self.port}/gateway-ws"

    # --- world building --------------------------------------------------------------

    def snowflake(self) -> str:
        """A new id, increasing, shaped like Discord's."""
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return str((ms << 22) | (next(self._ids) & 0x3FFFFF))

    @staticmethod
    def user(user_id: int | str, name: str, *, bot: bool = False) -> dict[str, Any]:
        """A user object."""
        return {
            "id": str(user_id),
            "username": name,
            "discriminator": "0",
            "global_name": name,
            "avatar": None,
            "bot": bot,
            "public_flags": 0,
        }

    def add_guild(
        self,
        guild_id: int | str,
        *,
        name: str = "guild",
        channels: list[int | str] = (),  # type: ignore[assignment]
        roles: list[int | str] = (),  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """A guild the bot is in, with text channels and extra roles."""
        gid = str(guild_id)
        role_list = [self._role(gid, "@everyone", gid)]
        role_list += [self._role(str(r), f"role{r}", gid) for r in roles]
        guild: dict[str, Any] = {
            "id": gid,
            "name": name,
            "icon": None,
            "owner_id": "1",
            "large": False,
            "member_count": 2,
            "features": [],
            "emojis": [],
            "stickers": [],
            "roles": role_list,
            "channels": [],
            "threads": [],
            "voice_states": [],
            "presences": [],
            "joined_at": _now_iso(),
            "unavailable": False,
            "members": [self.member(self.bot_user)],
            "premium_tier": 0,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "preferred_locale": "en-US",
            "system_channel_flags": 0,
        }
        self.guilds[gid] = guild
        for c in channels:
            self.add_channel(gid, c)
        return guild

    def add_role(self, guild_id: str, role_id: str, *, permissions: int) -> None:
        """A role with the given permission bits (e.g. ``1 << 5``, Manage Server)."""
        role = {**self._role(role_id, f"role{role_id}", guild_id), "permissions": str(permissions)}
        self.guilds[guild_id]["roles"].append(role)

    @staticmethod
    def _role(role_id: str, name: str, guild_id: str) -> dict[str, Any]:
        return {
            "id": role_id,
            "name": name,
            "color": 0,
            "hoist": False,
            "position": 0,
            "permissions": EVERYONE_PERMISSIONS,
            "managed": False,
            "mentionable": True,
            "flags": 0,
        }

    def add_channel(self, guild_id: str, channel_id: int | str, name: str = "general") -> None:
        """A text channel in a guild."""
        ch = {
            "id": str(channel_id),
            "type": 0,
            "name": name,
            "position": 0,
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
            "rate_limit_per_user": 0,
            "topic": None,
            "last_message_id": None,
        }
        self.guilds[guild_id]["channels"].append(ch)
        self.channels[str(channel_id)] = {**ch, "guild_id": guild_id}

    def add_thread(
        self,
        guild_id: str,
        parent_id: str,
        thread_id: int | str,
        *,
        bot_member: bool = True,
        owner_id: str = "1",
    ) -> dict[str, Any]:
        """An active public thread in a guild (with the bot as a member if asked)."""
        thread = self._thread(guild_id, parent_id, str(thread_id), "a thread", owner_id)
        if bot_member:
            thread["member"] = {
                "id": str(thread_id),
                "user_id": self.bot_id,
                "join_timestamp": _now_iso(),
                "flags": 0,
            }
        self.guilds[guild_id]["threads"].append(thread)
        self.channels[str(thread_id)] = thread
        return thread

    @staticmethod
    def _thread(guild_id: str, parent_id: str, tid: str, name: str, owner: str) -> dict[str, Any]:
        return {
            "id": tid,
            "guild_id": guild_id,
            "parent_id": parent_id,
            "owner_id": owner,
            "type": 11,
            "name": name,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "message_count": 0,
            "member_count": 1,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": _now_iso(),
                "locked": False,
            },
        }

    def add_member(
        self,
        guild_id: int | str,
        user: dict[str, Any],
        roles: list[str] = (),  # type: ignore[assignment]
    ) -> None:
        """Make ``user`` a member of a guild (with ``roles``)."""
        self.guild_members.setdefault(str(guild_id), {})[str(user["id"])] = list(roles)

    def member(self, user: dict[str, Any], roles: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
        """A guild member object for ``user``."""
        return {
            "user": user,
            "roles": list(roles),
            "joined_at": _now_iso(),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "nick": None,
        }

    # --- gateway ---------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 41250}})
        session: _Session | None = None
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(msg.data)
                op = payload.get("op")
                if op == 1:
                    await ws.send_json({"op": 11})
                elif op == 2:
                    session = await self._identify(ws, payload["d"])
                elif op == 6:
                    session = _Session(ws, payload["d"]["session_id"], self._last_intents())
                    session.seq = payload["d"].get("seq") or 0
                    session.shard = self._session_shards.get(session.session_id)
                    self._sessions.append(session)
                    # Events "missed" while away are replayed before RESUMED.
                    for event, data in self._replay:
                        await self._send(session, event, self._seen(session, event, data))
                    await self._send(session, "RESUMED", {})
                    self.resumes += 1
        finally:
            if session is not None and session in self._sessions:
                self._sessions.remove(session)
        return ws

    def _last_intents(self) -> int:
        return int(self.identifies[-1].get("intents", 0)) if self.identifies else 0

    async def _identify(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> _Session | None:
        if data.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return None
        self.identifies.append({k: v for k, v in data.items() if k != "token"})
        session = _Session(
            ws, hashlib.sha1(self.snowflake().encode()).hexdigest(), int(data.get("intents", 0))
        )
        try:
            session.shard = self._shard_of_identify(data)
        except ValueError:
            await ws.close(code=4010, message=b"Invalid shard.")
            return None
        if session.shard is not None:
            self._session_shards[session.session_id] = session.shard
        guilds = [g for g in self.guilds.values() if self._gets(session, g["id"])]
        self._sessions.append(session)
        await self._send(
            session,
            "READY",
            {
                "v": 10,
                "user": {**self.bot_user, "verified": True, "mfa_enabled": False, "flags": 0},
                "guilds": [{"id": g["id"], "unavailable": True} for g in guilds],
                "session_id": session.session_id,
                "resume_gateway_url": self.gateway_url,
                "application": {"id": self.application_id, "flags": 0},
                "shard": list(session.shard or (0, 1)),
                "private_channels": [],
                "relationships": [],
            },
        )
        for guild in guilds:
            await self._send(session, "GUILD_CREATE", guild)
        self.connected.set()
        return session

    async def _send(self, session: _Session, event: str, data: dict[str, Any]) -> None:
        async with session.lock:
            session.seq += 1
            await session.ws.send_json({"op": 0, "t": event, "s": session.seq, "d": data})
            if session.shard is not None:
                self.shard_events.append((session.shard, event, str(data.get("id", ""))))

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a DISPATCH event to every connected gateway session."""
        for session in list(self._sessions):
            if not self._gets(session, data.get("guild_id")):
                continue
            with contextlib.suppress(ConnectionResetError):
                await self._send(session, event, self._seen(session, event, data))

    # --- sharding --------------------------------------------------------------------

    @staticmethod
    def shard_of(guild_id: int | str, shard_count: int) -> int:
        """The shard that gets a guild's events (Discord's formula)."""
        return (int(guild_id) >> 22) % shard_count

    @staticmethod
    def _shard_of_identify(data: dict[str, Any]) -> tuple[int, int] | None:
        shard = data.get("shard")
        if not isinstance(shard, list) or len(shard) != 2:
            return None
        shard_id, count = int(shard[0]), int(shard[1])
        if not 0 <= shard_id < count:
            raise ValueError(f"IDENTIFY with an invalid shard {shard}")
        return shard_id, count

    def _gets(self, session: _Session, guild_id: object) -> bool:
        """Whether ``session`` receives events of ``guild_id`` (``None``: a DM, shard 0)."""
        if session.shard is None:
            return True
        shard_id, count = session.shard
        if guild_id is None:
            return shard_id == 0
        return self.shard_of(str(guild_id), count) == shard_id

    def _seen(self, session: _Session, event: str, data: dict[str, Any]) -> dict[str, Any]:
        return self._as_seen_by(session, data) if event == "MESSAGE_CREATE" else data

    async def reconnect(self, replay: list[tuple[str, dict[str, Any]]] = ()) -> None:  # type: ignore[assignment]
        """Ask every client to reconnect (op 7); on RESUME, replay ``replay`` events first."""
        self._replay = list(replay)
        for session in list(self._sessions):
            with contextlib.suppress(ConnectionResetError):
                await session.ws.send_json({"op": 7, "d": None})

    def _as_seen_by(self, session: _Session, data: dict[str, Any]) -> dict[str, Any]:
        """Blank content the way Discord does for apps without the message-content intent."""
        if session.intents & MESSAGE_CONTENT_INTENT or "guild_id" not in data:
            return data
        mentioned = any(u["id"] == self.bot_id for u in data.get("mentions", []))
        if mentioned or data["author"]["id"] == self.bot_id:
            return data
        return {**data, "content": "", "embeds": [], "attachments": []}

    # --- injected user actions -------------------------------------------------------

    async def send_user_message(
        self,
        channel_id: int | str,
        author: dict[str, Any],
        content: str,
        *,
        mention_bot: bool = False,
        reply_to: dict[str, Any] | None = None,
        roles: list[str] = (),  # type: ignore[assignment]
        message_id: str | None = None,
        ping: bool = True,
        include_referenced: bool = True,
        attachments: list[dict[str, Any]] = (),  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """A user posts a message: build MESSAGE_CREATE as Discord would and dispatch it.

        ``mention_bot`` puts ``<@bot>`` in front of the content. A reply to a message of
        the bot mentions the bot too (Discord's default "reply with ping"), unless
        ``ping`` is off. ``include_referenced=False`` leaves ``referenced_message`` out
        of a reply, as Discord may.
        """
        cid = str(channel_id)
        channel = self.channels.get(cid)
        mentions = []
        if mention_bot:
            content = f"<@{self.bot_id}> {content}"
        replies_to_bot = reply_to is not None and reply_to["author"]["id"] == self.bot_id
        if mention_bot or (replies_to_bot and ping):
            mentions.append(self.bot_user)
        msg: dict[str, Any] = {
            "id": message_id or self.snowflake(),
            "channel_id": cid,
            "author": author,
            "content": content,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": mentions,
            "mention_roles": [],
            "attachments": list(attachments),
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
            "components": [],
        }
        if channel is not None and "guild_id" in channel:
            msg["guild_id"] = channel["guild_id"]
            msg["member"] = {k: v for k, v in self.member(author, roles).items() if k != "user"}
            self.add_member(channel["guild_id"], author, roles)  # only members can post
        if reply_to is not None:
            msg["type"] = 19
            msg["message_reference"] = {
                "message_id": reply_to["id"],
                "channel_id": cid,
                **({"guild_id": msg["guild_id"]} if "guild_id" in msg else {}),
            }
            if include_referenced:
                msg["referenced_message"] = reply_to
        self.messages[msg["id"]] = msg
        await self.dispatch("MESSAGE_CREATE", msg)
        return msg

    # --- Attachments (the CDN) ------------------------------------------------------------

    def add_attachment(
        self,
        channel_id: int | str,
        filename: str,
        data: bytes,
        content_type: str | None,
        *,
        size: int | None = None,
        chunked: bool = False,
    ) -> dict[str, Any]:
        """Serve a file as Discord's CDN would and return the attachment object for
        :meth:`send_user_message` (``size`` is the declared size, the true one by default)."""
        aid = self.snowflake()
        self.file_server.add(aid, Served(data, content_type or "application/octet-stream", chunked))
        url = f"http://127.0.0.1:{self.port}/attachments/{channel_id}/{aid}/{filename}"
        attachment: dict[str, Any] = {
            "id": aid,
            "filename": filename,
            "size": len(data) if size is None else size,
            "url": url,
            "proxy_url": url,
        }
        if content_type is not None:
            attachment["content_type"] = content_type
        return attachment

    async def _attachment(self, request: web.Request) -> web.StreamResponse:
        return await self.file_server.serve(request, request.match_info["attachment_id"])

    async def dm_channel(self, channel_id: int | str, user: dict[str, Any]) -> str:
        """A DM channel between ``user`` and the bot."""
        cid = str(channel_id)
        self.channels[cid] = {"id": cid, "type": 1, "recipients": [user], "last_message_id": None}
        return cid

    async def invoke_ask(
        self,
        channel_id: int | str,
        user: dict[str, Any],
        question: str,
        *,
        roles: list[str] = (),  # type: ignore[assignment]
    ) -> Interaction:
        """A user runs ``/ask question:...``: dispatch INTERACTION_CREATE."""
        cid = str(channel_id)
        channel = self.channels[cid]
        iid = self.snowflake()
        token = "itoken-" + hashlib.sha1(iid.encode()).hexdigest()
        data: dict[str, Any] = {
            "id": iid,
            "application_id": self.application_id,
            "type": 2,
            "token": token,
            "version": 1,
            "channel_id": cid,
            "channel": {"id": cid, "type": channel["type"], "name": channel.get("name", "")},
            "data": {
                "id": "1",
                "name": "ask",
                "type": 1,
                "options": [{"name": "question", "type": 3, "value": question}],
            },
            "app_permissions": EVERYONE_PERMISSIONS,
            "locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": "1"},
            "attachment_size_limit": 8388608,
        }
        return await self._dispatch_interaction(data, channel, user, roles)

    async def _dispatch_interaction(
        self,
        data: dict[str, Any],
        channel: dict[str, Any],
        user: dict[str, Any],
        roles: list[str],
    ) -> Interaction:
        """Dispatch INTERACTION_CREATE ``data`` as sent in ``channel`` by ``user`` (a
        guild member, or a user in a DM) and track the interaction by its token."""
        if "guild_id" in channel:
            data["guild_id"] = channel["guild_id"]
            data["guild_locale"] = "en-US"
            data["member"] = {**self.member(user, roles), "permissions": EVERYONE_PERMISSIONS}
            data["context"] = 0
        else:
            data["user"] = user
            data["context"] = 1
        inter = Interaction(data["id"], data["token"], data["channel_id"], time.monotonic())
        self.interactions[data["token"]] = inter
        await self.dispatch("INTERACTION_CREATE", data)
        return inter

    # --- channel history (GET /channels/{id}/messages) ---------------------------------

    def add_history(
        self, channel_id: int | str, author: dict[str, Any], content: str, **extra: Any
    ) -> dict[str, Any]:
        """A message that was already in the channel (no gateway event): it shows in
        the channel's history and can be fetched."""
        msg: dict[str, Any] = {
            "id": self.snowflake(),
            "channel_id": str(channel_id),
            "author": author,
            "content": content,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
            "components": [],
            **extra,
        }
        channel = self.channels.get(str(channel_id)) or {}
        if "guild_id" in channel:
            msg["guild_id"] = channel["guild_id"]
        self.messages[msg["id"]] = msg
        return msg

    async def _r_get_channels_channel_id_messages(
        self, request: web.Request, call: Call
    ) -> web.Response:
        """Newest first; ``before`` (exclusive) and ``limit`` (1-100), as Discord."""
        if call.major not in self.channels:
            return self._error(404, "Unknown Channel", 10003)
        try:
            limit = int(request.query.get("limit", "50"))
            before = int(request.query.get("before", str(1 << 63)))
        except ValueError:
            return self._error(400, "Invalid Form Body", 50035)
        if not 1 <= limit <= 100:
            return self._error(400, "Invalid Form Body", 50035)
        found = sorted(
            (
                m
                for m in self.messages.values()
                if m["channel_id"] == call.major and int(m["id"]) < before
            ),
            key=lambda m: int(m["id"]),
            reverse=True,
        )
        return _json([self._public(m) for m in found[:limit]])

    # --- message components (buttons) -----------------------------------------------

    async def click_button(
        self,
        message: dict[str, Any],
        user: dict[str, Any],
        custom_id: str,
        *,
        roles: list[str] = (),  # type: ignore[assignment]
    ) -> Interaction:
        """A user clicks a button of ``message``: dispatch a MESSAGE_COMPONENT
        INTERACTION_CREATE carrying ``custom_id`` (which need not be one the message
        has: a forged click)."""
        cid = str(message["channel_id"])
        channel = self.channels[cid]
        iid = self.snowflake()
        token = "itoken-" + hashlib.sha1(iid.encode()).hexdigest()
        data: dict[str, Any] = {
            "id": iid,
            "application_id": self.application_id,
            "type": 3,
            "token": token,
            "version": 1,
            "channel_id": cid,
            "channel": {"id": cid, "type": channel["type"], "name": channel.get("name", "")},
            "message": self._public(message),
            "data": {"custom_id": custom_id, "component_type": 2},
            "app_permissions": EVERYONE_PERMISSIONS,
            "locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": "1"},
            "attachment_size_limit": 8388608,
        }
        return await self._dispatch_interaction(data, channel, user, roles)

    # --- faults and statistics -------------------------------------------------------

    def fail(self, method: str, path_regex: str, status: int, *, times: int = 1) -> None:
        """The next ``times`` matching REST calls answer ``status``."""
        body = {
            403: {"message": "Missing Permissions", "code": 50013},
            404: {"message": "Unknown Channel", "code": 10003},
            400: {"message": "Thread is archived", "code": 50083},
        }.get(status, {"message": "Internal Server Error", "code": 0})
        self._faults.append(_Fault(method, re.compile(path_regex), status, times, body))

    # --- scoped rate limits ----------------------------------------------------------

    def limit_once(
        self,
        method: str,
        path_regex: str,
        *,
        scope: str,
        retry_after: float,
        times: int = 1,
    ) -> None:
        """The next ``times`` matching calls answer 429 with ``X-RateLimit-Scope: scope``.

        ``shared`` is a limit on the resource shared by everyone (it does not count
        against the app); ``global`` the app's global limit; ``user`` the app's bucket.
        """
        body = {
            "message": "You are being rate limited.",
            "retry_after": retry_after,
            "global": scope == "global",
            "code": 0,
        }
        headers = {
            "Retry-After": str(max(1, int(retry_after + 0.999))),
            "X-RateLimit-Scope": scope,
        }
        if scope == "global":
            headers["X-RateLimit-Global"] = "true"
        self._faults.append(_Fault(method, re.compile(path_regex), 429, times, body, headers))

    def calls_to(self, method: str, route_prefix: str = "") -> list[Call]:
        """Recorded calls with that method whose route template starts as given."""
        return [
            c
            for c in self.calls
            if c.method == method and c.route.split(" ", 1)[1].startswith(route_prefix)
        ]

    def bot_messages(self, channel_id: int | str | None = None) -> list[dict[str, Any]]:
        """Messages the bot created through REST, oldest first."""
        return [
            m
            for m in self.messages.values()
            if m["author"]["id"] == self.bot_id
            and (channel_id is None or m["channel_id"] == str(channel_id))
        ]

    def max_requests_in_any_second(self) -> int:
        """The most REST requests that arrived within any 1-second window."""
        times = sorted(c.t for c in self.calls)
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] >= 1.0:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def max_429_per_bucket_window(self) -> int:
        """The most 429s any one bucket answered within one of its windows."""
        by_bucket: dict[str, list[float]] = defaultdict(list)
        for c in self.calls:
            if c.status == 429:
                by_bucket["global" if c.is_global_429 else f"{c.route}:{c.major}"].append(c.t)
        best = 0
        for key, times in by_bucket.items():
            route = key.split(":", 1)[0]
            window = 1.0 if key == "global" else self.limits.get(route, _FALLBACK_LIMIT)[1]
            lo = 0
            for hi, t in enumerate(times):
                while t - times[lo] >= window:
                    lo += 1
                best = max(best, hi - lo + 1)
        return best

    # --- REST ------------------------------------------------------------------------

    def _route(self, method: str, path: str) -> tuple[str, str]:
        for m, regex, template in _ROUTES:
            if m == method:
                match = re.fullmatch(regex, path)
                if match:
                    return template, match.groupdict().get("major", "")
        return f"{method} {path}", ""

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        if self.hold is not None and not self.hold.is_set():
            self.held += 1
            await self.hold.wait()
        path = "/" + request.match_info["tail"]
        route, major = self._route(request.method, path)
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            with contextlib.suppress(ValueError):
                body = json.loads(raw) if raw else None
        call = Call(request.method, path, route, major, body)
        self.calls.append(call)
        response = self._check(request, call)
        if response is None:
            response = await self._handle(request, call)
            self._add_bucket_headers(response, call)
        call.status = response.status
        return response

    def _check(self, request: web.Request, call: Call) -> web.Response | None:
        """Auth, injected faults and rate limits; a response means "stop here"."""
        webhook = call.route.startswith(_GLOBAL_EXEMPT)
        if not webhook and request.headers.get("Authorization") != f"Bot {self.token}":
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        for fault in self._faults:
            if fault.times > 0 and fault.method == call.method and fault.pattern.search(call.path):
                fault.times -= 1
                resp = _json(fault.body, status=fault.status)
                resp.headers.update(fault.headers)
                return resp
        now = time.monotonic()
        if not webhook:
            while self._global_window and now - self._global_window[0] >= 1.0:
                self._global_window.popleft()
            if len(self._global_window) >= self.global_limit:
                retry = 1.0 - (now - self._global_window[0])
                call.is_global_429 = True
                return self._too_many(retry, is_global=True)
        bucket = self._bucket(call)
        if now >= bucket.reset_at:
            bucket.count, bucket.reset_at = 0, now + bucket.window_s
        if bucket.count >= bucket.limit:
            resp = self._too_many(bucket.reset_at - now, is_global=False)
            self._set_headers(resp, bucket, now)
            return resp
        bucket.count += 1
        if not webhook:
            self._global_window.append(now)
        return None

    def _bucket(self, call: Call) -> _Bucket:
        group = self.bucket_groups.get(call.route, call.route)
        key = f"{group}:{call.major}"
        bucket = self._buckets.get(key)
        if bucket is None:
            limit, window = self.limits.get(call.route, _FALLBACK_LIMIT)
            bucket = _Bucket(limit, window, key_hash=hashlib.md5(group.encode()).hexdigest())
            self._buckets[key] = bucket
        return bucket

    @staticmethod
    def _too_many(retry_after: float, *, is_global: bool) -> web.Response:
        retry_after = max(round(retry_after, 3), 0.001)
        resp = _json(
            {
                "message": "You are being rate limited.",
                "retry_after": retry_after,
                "global": is_global,
                "code": 0,
            },
            status=429,
        )
        resp.headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
        resp.headers["Via"] = "1.1 google"
        resp.headers["X-RateLimit-Scope"] = "global" if is_global else "user"
        if is_global:
            resp.headers["X-RateLimit-Global"] = "true"
        return resp

    def _set_headers(self, resp: web.StreamResponse, bucket: _Bucket, now: float) -> None:
        reset_after = max(bucket.reset_at - now, 0.0)
        resp.headers["X-RateLimit-Limit"] = str(bucket.limit)
        resp.headers["X-RateLimit-Remaining"] = str(max(bucket.limit - bucket.count, 0))
        resp.headers["X-RateLimit-Reset"] = f"{time.time() + reset_after:.3f}"
        resp.headers["X-RateLimit-Reset-After"] = f"{reset_after:.3f}"
        resp.headers["X-RateLimit-Bucket"] = bucket.key_hash

    def _add_bucket_headers(self, resp: web.StreamResponse, call: Call) -> None:
        if 200 <= resp.status < 300:
            self._set_headers(resp, self._bucket(call), time.monotonic())

    async def _handle(self, request: web.Request, call: Call) -> web.Response:
        handler = getattr(self, "_r_" + re.sub(r"\W+", "_", call.route.lower()).strip("_"), None)
        if handler is None:
            return _json({"message": "404: Not Found", "code": 0}, status=404)
        result: web.Response = await handler(request, call)
        return result

    @staticmethod
    def _error(status: int, message: str, code: int) -> web.Response:
        return _json({"message": message, "code": code}, status=status)

    async def _r_get_guilds_guild_id_members_user_id(
        self, request: web.Request, call: Call
    ) -> web.Response:
        guild_id, user_id = call.path.split("/")[2], call.path.split("/")[4]
        if guild_id not in self.guilds:
            return self._error(404, "Unknown Guild", 10004)
        roles = self.guild_members.get(guild_id, {}).get(user_id)
        if roles is None:
            return self._error(404, "Unknown Member", 10007)
        return _json(self.member(self.user(user_id, f"user{user_id}"), roles))

    async def _r_get_users_me(self, request: web.Request, call: Call) -> web.Response:
        return _json({**self.bot_user, "verified": True, "flags": 0})

    async def _r_get_oauth2_applications_me(self, request: web.Request, call: Call) -> web.Response:
        return _json(
            {
                "id": self.application_id,
                "name": "sluice",
                "icon": None,
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": self.user(1, "owner"),
                "verify_key": "00",
                "flags": 0,
                "team": None,
                "summary": "",
                "rpc_origins": [],
                "interactions_endpoint_url": None,
            }
        )

    async def _r_get_gateway_bot(self, request: web.Request, call: Call) -> web.Response:
        return _json(
            {
                "url": self.gateway_url,
                "shards": self.recommended_shards,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 14400000,
                    "max_concurrency": 1,
                },
            }
        )

    async def _r_get_gateway(self, request: web.Request, call: Call) -> web.Response:
        return _json({"url": self.gateway_url})

    async def _r_get_channels_channel_id(self, request: web.Request, call: Call) -> web.Response:
        channel = self.channels.get(call.major)
        if channel is None:
            return self._error(404, "Unknown Channel", 10003)
        return _json(channel)

    def _bot_message(self, channel_id: str, body: dict[str, Any]) -> dict[str, Any] | str:
        """Validate a message body like Discord does; a string is the 400 reason."""
        content = body.get("content") or ""
        if not content.strip() and not body.get("embeds"):
            return "Cannot send an empty message"
        if len(content) > 2000:
            return "content: Must be 2000 or fewer in length."
        msg: dict[str, Any] = {
            "id": self.snowflake(),
            "channel_id": channel_id,
            "author": self.bot_user,
            "content": content,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
            "components": body.get("components") or [],
            "allowed_mentions": body.get("allowed_mentions"),
            "edits": 0,
            "edit_history": [content],
        }
        ref = body.get("message_reference")
        if ref:
            referenced = self.messages.get(str(ref.get("message_id")))
            if referenced is None and ref.get("fail_if_not_exists", True):
                return "message_reference: Unknown message"
            if referenced is not None:
                # Discord echoes a full reference, as the gateway and REST return it.
                msg["type"] = 19
                msg["message_reference"] = {
                    "type": 0,
                    "message_id": referenced["id"],
                    "channel_id": channel_id,
                    **({"guild_id": referenced["guild_id"]} if "guild_id" in referenced else {}),
                }
                msg["referenced_message"] = self._public(referenced)
        return msg

    async def _r_post_channels_channel_id_messages(
        self, request: web.Request, call: Call
    ) -> web.Response:
        if call.major not in self.channels:
            return self._error(404, "Unknown Channel", 10003)
        body = call.body or {}
        if body.get("enforce_nonce") and body.get("nonce"):
            # Discord returns the earlier message for a repeated nonce (a few minutes).
            for earlier in self.messages.values():
                if earlier.get("nonce") == body["nonce"] and earlier["channel_id"] == call.major:
                    return _json(self._public(earlier))
        msg = self._bot_message(call.major, body)
        if isinstance(msg, str):
            return self._error(400, msg, 50006 if "empty" in msg else 50035)
        msg["nonce"] = body.get("nonce")
        self.messages[msg["id"]] = msg
        await self.dispatch("MESSAGE_CREATE", self._public(msg))
        return _json(self._public(msg))

    @staticmethod
    def _public(msg: dict[str, Any]) -> dict[str, Any]:
        return {
            k: v
            for k, v in msg.items()
            if k not in ("allowed_mentions", "edits", "edit_history", "interaction_token")
        }

    def _edit(self, msg: dict[str, Any], body: dict[str, Any]) -> web.Response:
        content = body.get("content")
        if content is not None:
            if len(content) > 2000:
                return self._error(400, "content: Must be 2000 or fewer in length.", 50035)
            msg["content"] = content
            msg["edit_history"].append(content)
        if "components" in body:
            msg["components"] = body["components"] or []
        msg["edits"] += 1
        msg["edited_timestamp"] = _now_iso()
        msg["allowed_mentions"] = body.get("allowed_mentions")
        return _json(self._public(msg))

    async def _r_patch_channels_channel_id_messages_message_id(
        self, request: web.Request, call: Call
    ) -> web.Response:
        msg = self.messages.get(call.path.rsplit("/", 1)[1])
        if msg is None or msg["channel_id"] != call.major:
            return self._error(404, "Unknown Message", 10008)
        if msg["author"]["id"] != self.bot_id:
            return self._error(403, "Cannot edit a message authored by another user", 50005)
        return self._edit(msg, call.body or {})

    async def _r_delete_channels_channel_id_messages_message_id(
        self, request: web.Request, call: Call
    ) -> web.Response:
        if self.messages.pop(call.path.rsplit("/", 1)[1], None) is None:
            return self._error(404, "Unknown Message", 10008)
        return web.Response(status=204)

    async def _r_get_channels_channel_id_messages_message_id(
        self, request: web.Request, call: Call
    ) -> web.Response:
        msg = self.messages.get(call.path.rsplit("/", 1)[1])
        if msg is None:
            return self._error(404, "Unknown Message", 10008)
        return _json(self._public(msg))

    async def _r_post_channels_channel_id_typing(
        self, request: web.Request, call: Call
    ) -> web.Response:
        return web.Response(status=204)

    async def _r_post_channels_channel_id_messages_message_id_threads(
        self, request: web.Request, call: Call
    ) -> web.Response:
        parent = self.channels.get(call.major)
        message_id = call.path.split("/")[4]
        if parent is None or message_id not in self.messages:
            return self._error(404, "Unknown Message", 10008)
        name = (call.body or {}).get("name") or "thread"
        tid = message_id  # Discord gives a thread started from a message the message's id
        thread = self._thread(parent["guild_id"], call.major, tid, name[:100], self.bot_id)
        thread["member"] = {
            "id": tid,
            "user_id": self.bot_id,
            "join_timestamp": _now_iso(),
            "flags": 0,
        }
        self.channels[tid] = thread
        await self.dispatch("THREAD_CREATE", {**thread, "newly_created": True})
        return _json(thread, status=201)

    async def _r_put_applications_application_id_commands(
        self, request: web.Request, call: Call
    ) -> web.Response:
        self.commands = [
            {
                **c,
                "id": self.snowflake(),
                "application_id": self.application_id,
                "version": "1",
                "default_member_permissions": None,
                "type": 1,
            }
            for c in call.body or []
        ]
        return _json(self.commands)

    async def _r_get_applications_application_id_commands(
        self, request: web.Request, call: Call
    ) -> web.Response:
        return _json(self.commands)

    async def _r_post_interactions_interaction_id_token_callback(
        self, request: web.Request, call: Call
    ) -> web.Response:
        token = call.path.split("/")[3]
        inter = self.interactions.get(token)
        if inter is None:
            return self._error(404, "Unknown interaction", 10062)
        if time.monotonic() - inter.created > 3.0 and inter.callback_type is None:
            return self._error(404, "Unknown interaction", 10062)
        if inter.callback_type is not None:
            return self._error(400, "Interaction has already been acknowledged.", 40060)
        inter.callback_type = int((call.body or {}).get("type", 0))
        inter.callback_after_s = time.monotonic() - inter.created
        if request.query.get("with_response") in ("1", "true", "True"):
            return _json(
                {
                    "interaction": {
                        "id": inter.id,
                        "type": 2,
                        "response_message_loading": inter.callback_type == 5,
                        "response_message_ephemeral": False,
                    },
                    "resource": {"type": inter.callback_type},
                }
            )
        return web.Response(status=204)

    def _interaction_for(self, call: Call) -> Interaction | None:
        inter = self.interactions.get(call.major)
        if inter is None or inter.callback_type is None:
            return None
        return inter

    async def _r_patch_webhooks_application_id_token_messages_message_id(
        self, request: web.Request, call: Call
    ) -> web.Response:
        inter = self._interaction_for(call)
        if inter is None:
            return self._error(404, "Unknown Webhook", 10015)
        target = call.path.rsplit("/", 1)[1]
        if target == "@original":
            if inter.original is None:
                msg = self._bot_message(inter.channel_id, {"content": "\u200b"})
                assert not isinstance(msg, str)
                msg["content"] = ""
                msg["interaction_token"] = inter.token
                inter.original = msg
                self.messages[msg["id"]] = msg
            return self._edit(inter.original, call.body or {})
        msg = self.messages.get(target)
        if msg is None or msg not in inter.followups:
            return self._error(404, "Unknown Message", 10008)
        return self._edit(msg, call.body or {})

    async def _r_get_webhooks_application_id_token_messages_message_id(
        self, request: web.Request, call: Call
    ) -> web.Response:
        inter = self._interaction_for(call)
        if inter is None or inter.original is None:
            return self._error(404, "Unknown Message", 10008)
        return _json(self._public(inter.original))

    async def _r_post_webhooks_application_id_token(
        self, request: web.Request, call: Call
    ) -> web.Response:
        inter = self._interaction_for(call)
        if inter is None:
            return self._error(404, "Unknown Webhook", 10015)
        msg = self._bot_message(inter.channel_id, call.body or {})
        if isinstance(msg, str):
            return self._error(400, msg, 50035)
        self.messages[msg["id"]] = msg
        inter.followups.append(msg)
        return _json(self._public(msg))

    async def _r_delete_webhooks_application_id_token_messages_message_id(
        self, request: web.Request, call: Call
    ) -> web.Response:
        inter = self._interaction_for(call)
        target = call.path.rsplit("/", 1)[1]
        msg = self.messages.get(target)
        if inter is None or msg is None or msg not in inter.followups:
            return self._error(404, "Unknown Message", 10008)
        inter.followups.remove(msg)
        del self.messages[target]
        return web.Response(status=204)

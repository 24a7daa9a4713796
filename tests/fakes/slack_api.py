"""A local fake of the Slack Web API, and a sender of signed Events API requests.

The real ``slack_sdk`` ``AsyncWebClient(base_url=fake.url)`` talks to it over HTTP.
It knows a set of bot tokens (each belongs to one team), records every call
(method, token, params), keeps the messages posted, edited and streamed, and can
be told to fail the next N calls of a method with a 429 (``Retry-After``), a 5xx
or a Slack error such as ``message_not_in_streaming_state``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web

from tests.fakes.files import FileServer, Served


@dataclass
class TokenInfo:
    """Who a bot token belongs to."""

    team_id: str
    bot_user_id: str
    bot_id: str


@dataclass
class Call:
    """One recorded Web API call."""

    method: str
    token: str | None
    params: dict[str, Any]
    at: float = field(default_factory=time.monotonic)


@dataclass
class Message:
    """A message as the fake workspace shows it."""

    channel: str
    ts: str
    text: str
    token: str | None
    thread_ts: str | None = None
    streaming: bool = False
    edits: int = 0
    team_id: str | None = None
    # Set from markdown_text (posted, edited or streamed as Markdown), not text.
    markdown: bool = False
    # Task updates streamed as chunks: task id -> the latest task_update chunk.
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _Failure:
    status: int
    error: str
    times: int
    retry_after_s: int | None = None


class FakeSlackAPI:
    """An aiohttp server that answers like ``https://slack.com/api/``."""

    def __init__(self, *, client_id: str = "cid", client_secret: str = "csecret") -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.tokens: dict[str, TokenInfo] = {}
        self.calls: list[Call] = []
        self.messages: dict[tuple[str, str], Message] = {}
        self.oauth_codes: dict[str, str] = {}
        self.revoked: set[str] = set()
        self._failures: dict[str, list[_Failure]] = {}
        self._ts = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.close_streams_after_appends: int | None = None
        self.stream_error: str | None = None
        self.app_tokens: set[str] = set()
        self.socket_acks: dict[str, dict[str, Any]] = {}
        self._sockets: list[web.WebSocketResponse] = []
        self.file_server = FileServer()

    @property
    def url(self) -> str:
        """The base URL to give ``AsyncWebClient(base_url=...)`` (ends with ``/``)."""
        return f"http://127.0.0.1:{self.port}/api/"

    # --- set-up --------------------------------------------------------------

    def add_token(
        self, token: str, team_id: str, bot_user_id: str = "UBOT", bot_id: str = "BBOT"
    ) -> None:
        """Make ``token`` a valid bot token of ``team_id``."""
        self.tokens[token] = TokenInfo(team_id, bot_user_id, bot_id)

    def add_oauth_code(self, code: str, team_id: str, bot_user_id: str = "UBOT") -> None:
        """``oauth.v2.access`` with ``code`` installs the app into ``team_id``."""
        self.oauth_codes[code] = team_id
        self._oauth_bot_users = getattr(self, "_oauth_bot_users", {})
        self._oauth_bot_users[code] = bot_user_id

    def fail(
        self,
        method: str,
        *,
        status: int = 429,
        times: int = 1,
        retry_after_s: int | None = 1,
        error: str = "ratelimited",
    ) -> None:
        """Answer the next ``times`` calls of ``method`` with an error."""
        self._failures.setdefault(method, []).append(
            _Failure(status=status, error=error, times=times, retry_after_s=retry_after_s)
        )

    # --- queries ---------------------------------------------------------------

    def calls_of(self, method: str) -> list[Call]:
        """The recorded calls of one method, oldest first."""
        return [c for c in self.calls if c.method == method]

    def replies(self, channel: str | None = None) -> list[Message]:
        """Messages the bot posted (or streamed), oldest first."""
        found = [m for m in self.messages.values() if channel is None or m.channel == channel]
        return sorted(found, key=lambda m: float(m.ts))

    async def wait_for(self, predicate: Any, timeout_s: float = 10.0) -> None:
        """Wait until ``predicate()`` is true."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            await asyncio.sleep(0.02)

    # --- server ----------------------------------------------------------------

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        app = web.Application()
        app.router.add_post("/api/{method}", self._handle)
        app.router.add_get("/api/{method}", self._handle)
        app.router.add_get("/link", self._socket)
        app.router.add_get("/files-pri/{team}/{file_id}/{name}", self._file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        """Stop the server."""
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- Files (url_private) ---------------------------------------------------------

    def add_file(
        self,
        name: str,
        data: bytes,
        mimetype: str,
        *,
        team_id: str = "T1",
        size: int | None = None,
        chunked: bool = False,
        redirect_to: str | None = None,
    ) -> dict[str, Any]:
        """Serve a file at a ``url_private`` (bot token of ``team_id`` required) and
        return the file object an event carries. ``size`` is the declared size (the
        true one by default); ``chunked`` sends the body without a length."""
        file_id = f"F{next(self._ts):08d}"
        self.file_server.add(
            file_id, Served(data, mimetype or "application/octet-stream", chunked, redirect_to)
        )
        return {
            "id": file_id,
            "name": name,
            "title": name,
            "mimetype": mimetype,
            "filetype": name.rsplit(".", 1)[-1],
            "size": len(data) if size is None else size,
            "url_private": f"http://127.0.0.1:{self.port}/files-pri/{team_id}/{file_id}/{name}",
            "mode": "hosted",
        }

    async def _file(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        info = self.tokens.get(auth.removeprefix("Bearer "))
        allowed = info is not None and info.team_id == request.match_info["team"]
        return await self.file_server.serve(request, request.match_info["file_id"], allowed=allowed)

    # --- Socket Mode ---------------------------------------------------------------

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_json(
            {"type": "hello", "num_connections": 1, "connection_info": {"app_id": "AFAKE"}}
        )
        try:
            async for frame in ws:
                if frame.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(frame.data)
                    if "envelope_id" in data:
                        self.socket_acks[data["envelope_id"]] = data
        finally:
            self._sockets.remove(ws)
        return ws

    async def socket_event(
        self,
        event: dict[str, Any],
        *,
        team_id: str = "T1",
        envelope_id: str | None = None,
        retry_attempt: int = 0,
    ) -> str:
        """Push an Events API envelope to the connected Socket Mode client."""
        await self.wait_for(lambda: self._sockets)
        envelope_id = envelope_id or secrets.token_hex(8)
        await self._sockets[-1].send_json(
            {
                "envelope_id": envelope_id,
                "type": "events_api",
                "accepts_response_payload": False,
                "retry_attempt": retry_attempt,
                "retry_reason": "timeout" if retry_attempt else "",
                "payload": event_envelope(event, team_id=team_id),
            }
        )
        return envelope_id

    async def _params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        body = await request.read()
        if not body:
            return params
        if request.content_type == "application/json":
            params.update(json.loads(body))
        else:
            for key, values in parse_qs(body.decode(), keep_blank_values=True).items():
                params[key] = values[-1]
        return params

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await self._params(request)
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else params.get("token")
        self.calls.append(Call(method, token, params))
        failures = self._failures.get(method)
        if failures:
            failure = failures[0]
            failure.times -= 1
            if failure.times <= 0:
                failures.pop(0)
            headers = {}
            if failure.retry_after_s is not None:
                headers["Retry-After"] = str(failure.retry_after_s)
            return web.json_response(
                {"ok": False, "error": failure.error}, status=failure.status, headers=headers
            )
        if method == "oauth.v2.access":
            return web.json_response(self._oauth_access(request, params))
        if method == "apps.connections.open":
            if token not in self.app_tokens:
                return web.json_response({"ok": False, "error": "invalid_auth"})
            return web.json_response({"ok": True, "url": f"ws://127.0.0.1:{self.port}/link"})
        info = self.tokens.get(token or "")
        if info is None or token in self.revoked:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return web.json_response({"ok": False, "error": "unknown_method"})
        result: dict[str, Any] = handler(token, info, params)
        return web.json_response(result)

    # --- methods -----------------------------------------------------------------

    def _next_ts(self) -> str:
        return f"{1_700_000_000 + next(self._ts)}.000100"

    def _oauth_access(self, request: web.Request, params: dict[str, Any]) -> dict[str, Any]:
        client_id = params.get("client_id")
        client_secret = params.get("client_secret")
        if request.headers.get("Authorization", "").startswith("Basic "):
            import base64

            raw = base64.b64decode(request.headers["Authorization"][6:]).decode()
            client_id, _, client_secret = raw.partition(":")
        if client_id != self.client_id or client_secret != self.client_secret:
            return {"ok": False, "error": "invalid_client_id"}
        code = params.get("code", "")
        team_id = self.oauth_codes.pop(code, None)
        if team_id is None:
            return {"ok": False, "error": "invalid_code"}
        bot_user = self._oauth_bot_users.get(code, "UBOT")
        token = f"xoxb-{team_id}-{secrets.token_hex(6)}"
        self.add_token(token, team_id, bot_user_id=bot_user, bot_id=f"B{team_id}")
        return {
            "ok": True,
            "app_id": "AFAKE",
            "authed_user": {"id": "UINSTALLER"},
            "scope": "app_mentions:read,chat:write,im:history,commands",
            "token_type": "bot",
            "access_token": token,
            "bot_user_id": bot_user,
            "team": {"id": team_id, "name": f"Team {team_id}"},
            "enterprise": None,
            "is_enterprise_install": False,
        }

    def _m_auth_test(self, token: str, info: TokenInfo, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "url": f"https://{info.team_id.lower()}.slack.com/",
            "team": f"Team {info.team_id}",
            "user": "sluice",
            "team_id": info.team_id,
            "user_id": info.bot_user_id,
            "bot_id": info.bot_id,
            "is_enterprise_install": False,
        }

    def _m_auth_revoke(self, token: str, info: TokenInfo, params: dict[str, Any]) -> dict[str, Any]:
        self.revoked.add(token)
        return {"ok": True, "revoked": True}

    def _m_chat_postMessage(
        self, token: str, info: TokenInfo, params: dict[str, Any]
    ) -> dict[str, Any]:
        channel = params.get("channel")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        if problem := _markdown_problem(params):
            return problem
        if not params.get("text") and not params.get("blocks") and not params.get("markdown_text"):
            return {"ok": False, "error": "no_text"}
        ts = self._next_ts()
        msg = Message(
            channel,
            ts,
            params.get("markdown_text") or params.get("text", ""),
            token,
            thread_ts=params.get("thread_ts"),
            team_id=info.team_id,
            markdown="markdown_text" in params,
        )
        self.messages[(channel, ts)] = msg
        return {
            "ok": True,
            "channel": channel,
            "ts": ts,
            "message": {"text": msg.text, "ts": ts, "bot_id": info.bot_id},
        }

    def _m_chat_postEphemeral(
        self, token: str, info: TokenInfo, params: dict[str, Any]
    ) -> dict[str, Any]:
        return {"ok": True, "message_ts": self._next_ts()}

    def _m_chat_update(self, token: str, info: TokenInfo, params: dict[str, Any]) -> dict[str, Any]:
        msg = self.messages.get((params.get("channel", ""), params.get("ts", "")))
        if msg is None:
            return {"ok": False, "error": "message_not_found"}
        if msg.token is not None and self.tokens.get(msg.token, info).team_id != info.team_id:
            return {"ok": False, "error": "cant_update_message"}
        if problem := _markdown_problem(params):
            return problem
        if "markdown_text" in params:
            msg.text, msg.markdown = params["markdown_text"], True
        elif "text" in params:
            msg.text, msg.markdown = params["text"], False
        msg.edits += 1
        msg.streaming = False
        return {"ok": True, "channel": msg.channel, "ts": msg.ts, "text": msg.text}

    def _m_chat_delete(self, token: str, info: TokenInfo, params: dict[str, Any]) -> dict[str, Any]:
        msg = self.messages.get((params.get("channel", ""), params.get("ts", "")))
        if msg is None:
            return {"ok": False, "error": "message_not_found"}
        if msg.token is not None and self.tokens.get(msg.token, info).team_id != info.team_id:
            return {"ok": False, "error": "cant_delete_message"}
        del self.messages[(msg.channel, msg.ts)]
        return {"ok": True, "channel": msg.channel, "ts": msg.ts}

    def _m_chat_startStream(
        self, token: str, info: TokenInfo, params: dict[str, Any]
    ) -> dict[str, Any]:
        if self.stream_error:
            return {"ok": False, "error": self.stream_error}
        channel = params.get("channel")
        if not channel or not params.get("thread_ts"):
            return {"ok": False, "error": "invalid_arguments"}
        ts = self._next_ts()
        msg = Message(
            channel,
            ts,
            params.get("markdown_text", ""),
            token,
            thread_ts=params["thread_ts"],
            streaming=True,
            team_id=info.team_id,
            markdown=True,
        )
        if problem := _apply_chunks(msg, params):
            return problem
        self.messages[(channel, ts)] = msg
        return {"ok": True, "channel": channel, "ts": ts}

    def _stream_msg(self, params: dict[str, Any]) -> Message | dict[str, Any]:
        msg = self.messages.get((params.get("channel", ""), params.get("ts", "")))
        if msg is None:
            return {"ok": False, "error": "message_not_found"}
        if not msg.streaming:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        return msg

    def _m_chat_appendStream(
        self, token: str, info: TokenInfo, params: dict[str, Any]
    ) -> dict[str, Any]:
        msg = self._stream_msg(params)
        if isinstance(msg, dict):
            return msg
        if problem := _apply_chunks(msg, params):
            return problem
        msg.text += params.get("markdown_text", "")
        msg.edits += 1
        limit = self.close_streams_after_appends
        if limit is not None and msg.edits >= limit:
            msg.streaming = False
        return {"ok": True, "channel": msg.channel, "ts": msg.ts}

    def _m_chat_stopStream(
        self, token: str, info: TokenInfo, params: dict[str, Any]
    ) -> dict[str, Any]:
        msg = self._stream_msg(params)
        if isinstance(msg, dict):
            return msg
        if problem := _apply_chunks(msg, params):
            return problem
        msg.text += params.get("markdown_text", "")
        msg.streaming = False
        return {
            "ok": True,
            "channel": msg.channel,
            "ts": msg.ts,
            "message": {"text": msg.text, "ts": msg.ts},
        }

    def _m_assistant_threads_setStatus(
        self, token: str, info: TokenInfo, params: dict[str, Any]
    ) -> dict[str, Any]:
        return {"ok": True}

    def _m_assistant_threads_setSuggestedPrompts(
        self, token: str, info: TokenInfo, params: dict[str, Any]
    ) -> dict[str, Any]:
        return {"ok": True}

    def _m_assistant_threads_setTitle(
        self, token: str, info: TokenInfo, params: dict[str, Any]
    ) -> dict[str, Any]:
        if not params.get("channel_id") or not params.get("thread_ts") or not params.get("title"):
            return {"ok": False, "error": "invalid_arguments"}
        return {"ok": True}

    def _m_conversations_info(
        self, token: str, info: TokenInfo, params: dict[str, Any]
    ) -> dict[str, Any]:
        channel = params.get("channel", "")
        return {"ok": True, "channel": {"id": channel, "is_im": channel.startswith("D")}}


# --- markdown_text and streamed chunks (chat.postMessage/update, the stream) -----------

MARKDOWN_LIMIT = 12000
TASK_STATUSES = frozenset({"pending", "in_progress", "complete", "error"})


def _markdown_problem(params: dict[str, Any]) -> dict[str, Any] | None:
    """Slack's checks of ``markdown_text``: not with ``text`` or ``blocks``, at most
    12,000 characters."""
    markdown = params.get("markdown_text")
    if markdown is None:
        return None
    if params.get("text") or params.get("blocks"):
        return {"ok": False, "error": "invalid_arguments"}
    if len(markdown) > MARKDOWN_LIMIT:
        return {"ok": False, "error": "msg_too_long"}
    return None


def _apply_chunks(msg: Message, params: dict[str, Any]) -> dict[str, Any] | None:
    """Apply a stream call's ``chunks``: Markdown text is appended, a ``task_update``
    replaces the task of its id. Unknown or malformed chunks are refused."""
    chunks = params.get("chunks")
    if chunks is None:
        return None
    if isinstance(chunks, str):  # form-encoded
        chunks = json.loads(chunks)
    if not isinstance(chunks, list):
        return {"ok": False, "error": "invalid_chunks"}
    for chunk in chunks:
        kind = chunk.get("type") if isinstance(chunk, dict) else None
        if kind == "markdown_text" and isinstance(chunk.get("text"), str):
            msg.text += chunk["text"]
        elif (
            kind == "task_update"
            and isinstance(chunk.get("id"), str)
            and isinstance(chunk.get("title"), str)
            and chunk.get("status") in TASK_STATUSES
        ):
            msg.tasks[chunk["id"]] = dict(chunk)
        else:
            return {"ok": False, "error": "invalid_chunks"}
    return None


class ResponseURLSink:
    """An aiohttp server that accepts posts to slash-command ``response_url`` s."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    def url(self, name: str) -> str:
        """A response URL for one command invocation."""
        return f"http://127.0.0.1:{self.port}/respond/{name}"

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        app = web.Application()

        async def handle(request: web.Request) -> web.Response:
            body = await request.json()
            body["_name"] = request.match_info["name"]
            self.posts.append(body)
            return web.Response(text="ok")

        app.router.add_post("/respond/{name}", handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        """Stop the server."""
        if self._runner is not None:
            await self._runner.cleanup()


# --- signed Events API requests ------------------------------------------------


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """Slack's v0 request signature of ``body`` at ``timestamp``."""
    base = b"v0:" + str(timestamp).encode() + b":" + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


_event_ids = itertools.count(1)


def event_envelope(
    event: dict[str, Any],
    *,
    team_id: str = "T1",
    event_id: str | None = None,
    api_app_id: str = "AFAKE",
) -> dict[str, Any]:
    """An ``event_callback`` body around ``event``."""
    return {
        "token": "legacy",
        "team_id": team_id,
        "api_app_id": api_app_id,
        "event": event,
        "type": "event_callback",
        "event_id": event_id or f"Ev{next(_event_ids):08d}",
        "event_time": int(time.time()),
        "authorizations": [{"team_id": team_id, "user_id": "UBOT", "is_bot": True}],
    }


class EventSender:
    """Sends real signed HTTP requests to a Slack app's ``/slack/events``."""

    def __init__(self, session: aiohttp.ClientSession, url: str, signing_secret: str) -> None:
        self.session = session
        self.url = url
        self.secret = signing_secret

    async def post_raw(
        self,
        body: bytes,
        *,
        content_type: str = "application/json",
        timestamp: int | None = None,
        retry_num: int | None = None,
        signature: str | None = None,
    ) -> tuple[int, str]:
        """POST ``body`` signed (or with ``signature``); returns status and text."""
        ts = int(time.time()) if timestamp is None else timestamp
        headers = {
            "Content-Type": content_type,
            "X-Slack-Request-Timestamp": str(ts),
            "X-Slack-Signature": signature or sign(self.secret, body, ts),
        }
        if retry_num is not None:
            headers["X-Slack-Retry-Num"] = str(retry_num)
            headers["X-Slack-Retry-Reason"] = "http_timeout"
        async with self.session.post(self.url, data=body, headers=headers) as resp:
            return resp.status, await resp.text()

    async def event(
        self,
        event: dict[str, Any],
        *,
        team_id: str = "T1",
        event_id: str | None = None,
        retry_num: int | None = None,
    ) -> tuple[int, str]:
        """Deliver one event inside an ``event_callback`` envelope."""
        body = json.dumps(event_envelope(event, team_id=team_id, event_id=event_id)).encode()
        return await self.post_raw(body, retry_num=retry_num)

    async def command(self, form: dict[str, str]) -> tuple[int, str]:
        """Deliver a slash command (form-encoded)."""
        from urllib.parse import urlencode

        body = urlencode(form).encode()
        return await self.post_raw(body, content_type="application/x-www-form-urlencoded")

"""How workers deliver replies to Slack: streamed, paced, split, once per job.

:class:`SlackResponderFactory` is built once per worker process (``core.responder``
loads it from ``RESPONDERS``); it holds one aiohttp session and finds each
workspace's bot token (``SLACK_BOT_TOKEN``, or the installation in the SQL
database). Each job gets a :class:`SlackResponder`:

- In a thread, Slack's native streaming (``chat.startStream`` → ``appendStream`` →
  ``stopStream``) shows the answer as it is written. Where Slack refuses streaming,
  elsewhere (top-level DMs, ``/ask``), or when Slack closes a stream early, the
  reply is a posted message edited with ``chat.update``.
- Edits of one message are paced through Redis, so that all workers together make
  at most one per ``SLUICE_SLACK_EDIT_INTERVAL_S``, and intermediate edits stop when
  the workspace has used ``SLUICE_SLACK_UPDATES_PER_MINUTE``; final edits always go.
- 429s are waited out (``Retry-After``, up to ``SLUICE_SLACK_MAX_RETRY_AFTER_S``), 5xx
  and network errors retried a few times; past that, progress updates stop (the answer
  goes on) and ``finish()`` raises ``DeliveryRetryableError``, so that the job delivers
  the kept reply again later (``workers.delivery``).
- What was posted (message ts, extra parts, done) is kept in Redis under the job id
  (:class:`core.responder.DeliveryState`, with its policy for a Redis error), so a
  re-run job edits its message instead of posting a second one.
- While a message waits in line, :meth:`SlackResponder.queued` posts "⏳ Queued: about
  N s" where the reply will go; the reply job finds it in the same Redis state and
  edits it into the answer (so a message that waited is answered by edits, not by a
  native stream: Slack cannot turn a posted message into a stream). In an assistant
  thread the notice is the thread's status instead, and the answer streams as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from bots.slack.format import reply_parts, safe_markdown, stream_cut
from core.errors import DeliveryError, DeliveryRetryableError, FileRefusedError
from core.files.download import download, origin
from core.framework.agent import ToolProgress
from core.infra.redis import Keys
from core.messages import QUEUED_PREFIX, FileRef, IncomingMessage, Reply, queued_text
from core.responder import DeliveryState, Responder
from core.settings import Settings

logger = logging.getLogger(__name__)

SERVER_ERROR_RETRIES = 3
RATE_LIMIT_RETRIES = 6
_AUTH_ERRORS = frozenset(
    {
        "invalid_auth",
        "not_authed",
        "token_revoked",
        "account_inactive",
        "team_not_found",
        "app_uninstalled",
    }
)
# Errors that mean "this conversation cannot be streamed to": use chat.update instead.
_STREAM_REFUSED = frozenset(
    {
        "unknown_method",
        "not_allowed",
        "not_allowed_token_type",
        "feature_not_enabled",
        "invalid_arguments",
        "missing_scope",
        "method_not_supported_for_channel_type",
        "not_authorized",
    }
)
_NOT_STREAMING = frozenset(
    {
        "message_not_in_streaming_state",
        "message_not_found",
        "streaming_state_conflict",
        "cant_update_message",
    }
)
# What a tool's name or call id may show: the characters OpenAI allows in tool names.
_TOOL_NAME = re.compile(r"[^A-Za-z0-9_.\-]")
_NOT_IN_CHANNEL = frozenset({"not_in_channel", "channel_not_found", "is_archived"})
# Record a posted message's ts unless the job's state already has one (a queued
# notice and the reply may both post: the first to record wins, the other deletes
# its message), and never once the job is done. Returns the ts that won ('' if done).
_CLAIM_TS = """
if redis.call('hexists', KEYS[1], 'done') == 0
   and redis.call('hsetnx', KEYS[1], 'ts', ARGV[1]) == 1 then
  redis.call('hset', KEYS[1], 'mode', ARGV[2], 'notice', ARGV[3])
  redis.call('expire', KEYS[1], ARGV[4])
end
return {redis.call('hget', KEYS[1], 'ts') or '', redis.call('hget', KEYS[1], 'mode') or 'post'}
"""


def _header(response: Any, name: str) -> str | None:
    headers = getattr(response, "headers", None) or {}
    for key, value in headers.items():
        if key.lower() == name.lower():
            return str(value[0] if isinstance(value, list) else value)
    return None


def _escape_mrkdwn(text: str) -> str:
    """The three characters Slack's ``text`` field treats as markup, escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# Where Slack serves url_private; tests point SLACK_API_URL's host at a fake instead.
SLACK_FILE_HOST = "files.slack.com"


class SlackResponderFactory:
    """One per worker process: HTTP session, token lookup, per-token Web API clients."""

    platform = "slack"

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self.session: aiohttp.ClientSession | None = None
        self._store: Any = None
        self._clients: dict[str, AsyncWebClient] = {}
        self.stream_refused: set[str] = set()

    async def start(self) -> None:
        """Open the HTTP session (and the installation store in multi-workspace mode)."""
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        if self.settings.slack_client_id and self.settings.slack_client_secret:
            from bots.slack.installations import SQLInstallationStore

            self._store = SQLInstallationStore(self.settings)

    async def close(self) -> None:
        """Close what :meth:`start` opened."""
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self._store is not None:
            await self._store.close()

    def responder(self, msg: IncomingMessage, job_id: str) -> SlackResponder:
        """The responder of one job."""
        return SlackResponder(self, msg, job_id)

    async def token_for(self, msg: IncomingMessage) -> str:
        """The bot token of the message's workspace.

        Raises:
            DeliveryError: the workspace is not installed (or was uninstalled).
        """
        if self._store is None:
            if self.settings.slack_bot_token is None:
                raise DeliveryError("SLACK_BOT_TOKEN is not set")
            return self.settings.slack_bot_token.get_secret_value()
        bot = await self._store.async_find_bot(
            enterprise_id=msg.meta.get("enterprise_id"),
            team_id=msg.tenant,
            is_enterprise_install=msg.meta.get("is_enterprise_install") == "1",
        )
        if bot is None or not bot.bot_token:
            raise DeliveryError(f"slack workspace {msg.tenant} is not installed")
        return str(bot.bot_token)

    async def fetch_file(
        self, msg: IncomingMessage, ref: FileRef, *, max_bytes: int, timeout_s: float
    ) -> bytes:
        """Download a file shared in Slack (``url_private``, with the workspace's bot
        token; needs the ``files:read`` scope). The token is sent only to Slack's file
        host (or the host of ``SLACK_API_URL``), never to a host a redirect names.

        Raises:
            FileRefusedError: not a Slack file URL, no token, or the download failed.
        """
        if self.session is None:
            raise RuntimeError("SlackResponderFactory.start() was not awaited")
        # Only Slack's own file host, over HTTPS (or SLACK_API_URL's host and scheme).
        where = origin(ref.url)[:2]
        if where not in (("https", SLACK_FILE_HOST), origin(self.settings.slack_api_url)[:2]):
            raise FileRefusedError(f"{ref.name} is not a Slack file, so I did not open it.")
        try:
            token = await self.token_for(msg)
        except DeliveryError as e:
            raise FileRefusedError(f"{ref.name} could not be downloaded.") from e
        data, content_type = await download(
            self.session,
            ref.url,
            name=ref.name,
            max_bytes=max_bytes,
            timeout_s=timeout_s,
            headers={"Authorization": f"Bearer {token}"},
        )
        if content_type.startswith("text/html") and not ref.mimetype.startswith("text/html"):
            # Slack answers a file request it refuses with its sign-in page.
            raise FileRefusedError(
                f"Slack did not let me download {ref.name} (the app may lack the files:read scope)."
            )
        return data

    def forget(self, team: str) -> None:
        """Drop a cached token (revoked or uninstalled)."""
        if self._store is not None:
            self._store.forget(None, team)

    def client(self, token: str) -> AsyncWebClient:
        """A Web API client for ``token`` on the shared session."""
        client = self._clients.get(token)
        if client is None:
            client = AsyncWebClient(
                token=token, base_url=self.settings.slack_api_url, session=self.session
            )
            self._clients[token] = client
        return client

    async def call(
        self, team: str, method: Callable[..., Awaitable[AsyncSlackResponse]], **kwargs: Any
    ) -> AsyncSlackResponse:
        """Call the Web API, waiting out 429s and retrying 5xx and connection errors.

        Raises:
            DeliveryRetryableError: still rate limited or failing after the retries.
            DeliveryError: the token is no longer valid.
            SlackApiError: any other Slack error, for the caller to handle.
        """
        name = getattr(method, "__name__", "call")
        limited = failed = 0
        while True:
            try:
                return await method(**kwargs)
            except SlackApiError as e:
                status = e.response.status_code
                error = str(e.response.get("error", ""))
                if status == 429 or error == "ratelimited":
                    retry_after_s = float(_header(e.response, "Retry-After") or 1)
                    limited += 1
                    if (
                        limited > RATE_LIMIT_RETRIES
                        or retry_after_s > self.settings.slack_max_retry_after_s
                    ):
                        raise DeliveryRetryableError(
                            f"slack {name} rate limited", retry_after_s=retry_after_s
                        ) from e
                    logger.info("slack %s 429 team=%s: waiting %.1fs", name, team, retry_after_s)
                    await asyncio.sleep(retry_after_s)
                    continue
                if status >= 500:
                    failed += 1
                    if failed > SERVER_ERROR_RETRIES:
                        raise DeliveryRetryableError(f"slack {name} failed: {status}") from e
                    await asyncio.sleep(0.2 * 2**failed)
                    continue
                if error in _AUTH_ERRORS:
                    self.forget(team)
                    raise DeliveryError(f"slack token of {team} is not valid: {error}") from e
                raise
            except (aiohttp.ClientError, TimeoutError) as e:
                failed += 1
                if failed > SERVER_ERROR_RETRIES:
                    raise DeliveryRetryableError(f"slack {name} unreachable: {e}") from e
                await asyncio.sleep(0.2 * 2**failed)


class SlackResponder(Responder):
    """Delivers one job's reply to Slack (see the module docstring)."""

    def __init__(self, factory: SlackResponderFactory, msg: IncomingMessage, job_id: str) -> None:
        self.f = factory
        self.settings = factory.settings
        self.msg = msg
        self.job_id = job_id
        self.state = DeliveryState(
            factory.redis, factory.keys, job_id, factory.settings.dedupe_ttl_s
        )
        self.state_key = self.state.key
        self.limit = self.settings.slack_message_limit
        self.thread = msg.meta.get("reply_thread") or msg.thread
        self.ts: str | None = None
        self.mode: str | None = None
        self.done = False
        self.notice = False  # the message at ``ts`` still shows the queued notice
        self._loaded = False
        self.streamed = ""  # the markdown already streamed (a prefix of the answer)
        self.parts: dict[int, str] = {}
        self._client: AsyncWebClient | None = None
        self._refused: DeliveryError | None = None  # e.g. channel gone: finish() reports it
        self._stream_failing = False  # Slack kept failing a progress update: finish() only

    # --- helpers -----------------------------------------------------------------

    async def _api(self) -> AsyncWebClient:
        if self._client is None:
            self._client = self.f.client(await self.f.token_for(self.msg))
        return self._client

    async def _call(self, name: str, **kwargs: Any) -> AsyncSlackResponse:
        client = await self._api()
        return await self.f.call(self.msg.tenant, getattr(client, name), **kwargs)

    async def _load(self) -> None:
        state = await self.state.read()
        self._loaded = True
        self.ts = state.get("ts")
        self.mode = state.get("mode") or ("post" if self.ts else None)
        self.done = state.get("done") == "1"
        self.notice = state.get("notice") == "1"
        self.parts = {int(k[5:]): v for k, v in state.items() if k.startswith("part:")}
        if self.mode == "stream":
            # A re-run cannot continue another process's stream: edit the message instead.
            self.mode = "restream"

    async def _save(self, **fields: str) -> None:
        await self.state.save(fields)

    async def _claim(self, ts: str, mode: str, *, notice: bool = False) -> str | None:
        """Record ``ts`` as this job's message; the ts recorded earlier if there is one."""
        try:
            won = await cast(
                "Awaitable[list[Any]]",
                self.f.redis.eval(
                    _CLAIM_TS,
                    1,
                    self.state_key,
                    ts,
                    mode,
                    "1" if notice else "0",
                    str(self.settings.dedupe_ttl_s),
                ),
            )
        except RedisError:
            logger.warning("could not record delivery job=%s", self.job_id, exc_info=True)
            return None
        winner = won[0].decode() if isinstance(won[0], bytes) else str(won[0])
        return None if winner == ts else winner

    async def _recorded_ts(self) -> str | None:
        """The ts another job (the queued notice) recorded since :meth:`_load`, if any."""
        try:
            ts = await cast("Awaitable[Any]", self.f.redis.hget(self.state_key, "ts"))
        except RedisError as e:
            # Posting anew is the fallback: a queued notice, if any, stays beside the answer.
            logger.warning("cannot re-read delivery state job=%s: %s", self.job_id, e)
            return None
        return ts.decode() if isinstance(ts, bytes) else ts

    async def _delete(self, ts: str) -> None:
        try:
            await self._call("chat_delete", channel=self.msg.channel, ts=ts)
        except SlackApiError as e:
            logger.info("slack chat.delete failed job=%s: %s", self.job_id, e)

    async def _may_edit(self, final: bool) -> bool:
        """Take this message's edit slot (waiting for it if ``final``)."""
        assert self.ts is not None
        key = self.f.keys.slack_pace(self.msg.channel, self.ts)
        interval_ms = int(self.settings.slack_edit_interval_s * 1000)
        if interval_ms <= 0:
            return True
        redis = self.f.redis
        try:
            while not await redis.set(key, "1", px=interval_ms, nx=True):
                if not final:
                    return False
                wait_ms = await redis.pttl(key)
                await asyncio.sleep(max(wait_ms, 10) / 1000)
            if final:
                return True
            budget = self.f.keys.slack_update_budget(self.msg.tenant, int(time.time() // 60))
            used = await redis.incr(budget)
            if used == 1:
                await redis.expire(budget, 120)
            return int(used) <= self.settings.slack_updates_per_minute
        except RedisError:
            logger.warning("edit pacing unavailable job=%s", self.job_id, exc_info=True)
            return final

    def _can_stream(self) -> bool:
        return bool(
            self.settings.slack_native_streaming
            and self.thread
            and self.msg.meta.get("kind") != "command"
            and self.msg.tenant not in self.f.stream_refused
        )

    # --- Responder protocol ----------------------------------------------------------

    async def begin(self) -> None:
        """Load what an earlier try delivered; show the assistant status."""
        await self._load()
        if self.done or self.ts or not self.msg.meta.get("assistant") or not self.thread:
            return
        try:
            await self._call(
                "assistant_threads_setStatus",
                channel_id=self.msg.channel,
                thread_ts=self.thread,
                status="is thinking…",
            )
        except (SlackApiError, DeliveryRetryableError) as e:
            logger.info("setStatus failed job=%s: %s", self.job_id, e)

    async def stream(self, text: str) -> None:
        """Show the answer so far (paced; skipped when an edit is not due).

        Progress is best effort: when Slack keeps failing an update (429/5xx past the
        retries), the answer goes on without further updates and :meth:`finish`
        delivers it (or raises, and the job delivers it later).
        """
        if (
            self.done
            or self.mode == "url"
            or self._refused is not None
            or self._stream_failing
            or not text.strip()
        ):
            return
        try:
            if self.ts is None:
                await self._open(text)
            elif self.mode == "stream":
                await self._append(text)
            elif await self._may_edit(final=False):
                await self._edit(self._preview(text))
        except DeliveryRetryableError as e:
            # Failing here would throw the model's answer away: finish() delivers it.
            logger.info("slack progress update failed job=%s: %s", self.job_id, e)
            self._stream_failing = True
        except DeliveryError as e:
            # Retrying cannot help (channel gone, archived, token revoked): let the
            # answer finish, and let finish() report it once.
            logger.info("slack refused the reply job=%s: %s", self.job_id, e)
            self._refused = e

    async def finish(self, reply: Reply) -> None:
        """Deliver the final reply exactly once for this job.

        Raises:
            DeliveryRetryableError: Slack kept failing (429, 5xx, network); calling
                ``finish`` again, in this job or a re-run, completes the message
                already posted (its ``ts`` and parts are kept in Redis).
            DeliveryError: retrying cannot help (channel gone, token revoked).
        """
        if self.done:
            logger.info("reply already delivered job=%s", self.job_id)
            return
        if self._refused is not None:
            raise self._refused
        parts = reply_parts(reply.text, self.limit)
        fresh = self.ts is None and self.mode != "url"
        if fresh:
            await self._open(reply.text, stream=False, shown=parts[0])
        if self.mode == "url":
            await self._respond_url(parts)
        else:
            if self.mode == "stream":
                await self._stop(reply.text, parts)
            elif not fresh:
                if self.mode == "restream":
                    await self._quietly_stop()
                await self._may_edit(final=True)
                await self._edit(parts[0])
            await self._post_rest(parts)
        self.done = True
        await self._save(done="1")
        logger.info(
            "slack reply delivered tenant=%s message=%s job=%s mode=%s parts=%d",
            self.msg.tenant,
            self.msg.message_id,
            self.job_id,
            self.mode,
            len(parts),
        )

    async def tool_progress(self, progress: ToolProgress) -> None:
        """Show a tool call of the model while the answer is written.

        In a native stream (threads) it is a task update (a ``task_update`` chunk of
        ``chat.startStream``/``appendStream``, shown as a timeline; the stream opens
        for it if the answer has no text yet). Elsewhere in an assistant thread, a
        starting call sets the thread's status ("is using <tool>…"). An edited message
        shows only the answer. A courtesy: failures are logged, never raised.
        """
        if self.done or self.mode == "url" or self._refused is not None or self._stream_failing:
            return
        name = _TOOL_NAME.sub("", progress.name)[:64] or "tool"
        chunk = {
            "type": "task_update",
            "id": _TOOL_NAME.sub("", progress.call_id)[:64] or name,
            "title": name,
            "status": progress.status,
        }
        try:
            if self.ts is None and self._can_stream():
                await self._open("", chunks=[chunk])
                if self.mode == "stream":
                    return
            if self.mode == "stream":
                await self._call(
                    "chat_appendStream", channel=self.msg.channel, ts=self.ts, chunks=[chunk]
                )
            elif (
                self.msg.meta.get("assistant") and self.thread and progress.status == "in_progress"
            ):
                await self._call(
                    "assistant_threads_setStatus",
                    channel_id=self.msg.channel,
                    thread_ts=self.thread,
                    status=f"is using {name}…",
                )
        except (SlackApiError, DeliveryError) as e:
            logger.info("slack tool progress not shown job=%s: %s", self.job_id, e)

    async def queued(self, wait_s: float, place: int | None = None) -> None:
        """Show that the message waits in line, about ``wait_s`` seconds (``place`` in
        line when known).

        Posts "⏳ Queued: #N in line, about N s" where the reply will go (or updates the notice
        this job already shows), recorded in the job's delivery state so that the
        reply's :meth:`stream`/:meth:`finish` edit it into the answer. In an assistant
        thread it sets the thread's status instead. Called by the ``notify_queued``
        job (a separate responder of the same job id) or while the reply waits in the
        LLM budget's line. Does nothing once the reply is out or being written, and
        never through a slash command's ``response_url``: that URL cannot edit a
        message into the answer later, so the notice would stay beside it (and it
        allows only five posts, which a long answer needs). A courtesy: failures
        are logged, never raised.
        """
        try:
            if not self._loaded or self.ts is None:
                await self._load()  # the notice or the answer may have been posted since
            if self.done or self.mode == "url" or self._refused is not None:
                return
            text = queued_text(wait_s, place)
            if self.msg.meta.get("assistant") and self.thread:
                if self.ts is None:
                    await self._queued_status(text)
            elif self.ts is not None:
                if self.notice and self.mode == "post" and await self._may_edit(final=False):
                    await self._edit(text, notice=True)
            else:
                await self._post_notice(text)
        except (SlackApiError, DeliveryError) as e:
            logger.info("slack queued notice not shown job=%s: %s", self.job_id, e)

    async def withdraw_queued(self) -> None:
        """This message gets no reply of its own (merged into a later message's):
        delete its queued notice, and keep a late ``notify_queued`` from posting one."""
        try:
            await self._save(done="1")
            await self._load()
            if self.ts is not None and self.notice:
                await self._delete(self.ts)
        except (SlackApiError, DeliveryError) as e:
            logger.info("slack queued notice not withdrawn job=%s: %s", self.job_id, e)

    async def _queued_status(self, text: str) -> None:
        status = "is queued" + text.removeprefix(QUEUED_PREFIX)
        await self._call(
            "assistant_threads_setStatus",
            channel_id=self.msg.channel,
            thread_ts=self.thread,
            status=status,
        )
        if await self._recorded_ts() is not None:
            # The answer was posted meanwhile (which clears a status): clear ours too.
            await self._call(
                "assistant_threads_setStatus",
                channel_id=self.msg.channel,
                thread_ts=self.thread,
                status="",
            )

    async def _post_notice(self, text: str) -> None:
        kwargs: dict[str, Any] = {"channel": self.msg.channel, "text": text}
        if self.thread:
            kwargs["thread_ts"] = self.thread
        resp = await self._call("chat_postMessage", **kwargs)
        ts = str(resp["ts"])
        if await self._claim(ts, "post", notice=True) is not None:
            # The reply was posted first, or the job is done: take the notice back.
            await self._delete(ts)
            return
        self.ts, self.mode, self.notice = ts, "post", True
        logger.info("slack queued notice posted job=%s ts=%s", self.job_id, ts)

    # --- delivery steps ----------------------------------------------------------------

    def _preview(self, text: str) -> str:
        parts = reply_parts(text, self.limit - 2)
        return parts[0] + " …" if len(parts) > 1 else parts[0]

    def _sendable(self, text: str) -> str:
        """The longest prefix of ``text`` (more may follow) that the stream can take now:
        no tail that could still become a mention (:func:`stream_cut`), and no more
        than the message limit once escaped."""
        piece = text[: self.limit]
        while True:
            piece = piece[: stream_cut(piece)]
            over = len(safe_markdown(piece)) - self.limit
            if over <= 0:
                return piece
            piece = piece[: len(piece) - over]

    async def _open(
        self,
        text: str,
        *,
        stream: bool = True,
        shown: str | None = None,
        chunks: list[dict[str, str]] | None = None,
    ) -> None:
        """Post the reply's message: a native stream if possible, else a plain message.

        If a queued notice was recorded since :meth:`_load`, edit that instead.
        ``chunks`` (task updates) open a native stream with no text yet; where that is
        not possible nothing is posted (the answer's text will be).
        """
        notice_ts = await self._recorded_ts()
        if notice_ts:
            if chunks is None:
                await self._adopt(notice_ts, shown or self._preview(text), final=not stream)
            return
        if stream and self._can_stream():
            first = self._sendable(text)
            if not first.strip() and not chunks:
                return  # only a tail that may become a mention so far: open later
            if await self._start_stream(text, first, chunks):
                return
        if chunks is not None:
            return
        kwargs: dict[str, Any] = {
            "channel": self.msg.channel,
            "markdown_text": shown or self._preview(text),
        }
        if self.thread:
            kwargs["thread_ts"] = self.thread
        try:
            resp = await self._call("chat_postMessage", **kwargs)
        except SlackApiError as e:
            error = str(e.response.get("error", ""))
            if self.msg.meta.get("response_url") and error in _NOT_IN_CHANNEL:
                self.mode = "url"
                await self._save(mode="url")
                return
            raise DeliveryError(f"chat.postMessage failed: {error}") from e
        ts = str(resp["ts"])
        notice_ts = await self._claim(ts, "post")
        if notice_ts:
            # A queued notice was posted meanwhile: answer in it, drop ours.
            await self._delete(ts)
            await self._adopt(notice_ts, kwargs["markdown_text"], final=not stream)
            return
        self.ts, self.mode = ts, "post"
        await self._may_edit(final=False)

    async def _start_stream(
        self, text: str, first: str, chunks: list[dict[str, str]] | None
    ) -> bool:
        """Open the native stream with ``first`` (and ``chunks``); ``False``: Slack refused."""
        extra: dict[str, Any] = {}
        if first:
            extra["markdown_text"] = safe_markdown(first)
        if chunks:
            extra["chunks"] = chunks
            extra["task_display_mode"] = "timeline"
        try:
            resp = await self._call(
                "chat_startStream",
                channel=self.msg.channel,
                thread_ts=self.thread,
                recipient_team_id=self.msg.tenant,
                recipient_user_id=self.msg.meta.get("recipient_user_id", self.msg.user),
                **extra,
            )
        except SlackApiError as e:
            error = str(e.response.get("error", ""))
            logger.info(
                "slack streaming refused team=%s (%s); editing instead", self.msg.tenant, error
            )
            if error in _STREAM_REFUSED:
                self.f.stream_refused.add(self.msg.tenant)
            return False
        ts = str(resp["ts"])
        notice_ts = await self._claim(ts, "stream")
        if notice_ts:
            # A queued notice was posted meanwhile: answer in it, drop the stream.
            with contextlib.suppress(SlackApiError):
                await self._call("chat_stopStream", channel=self.msg.channel, ts=ts)
            await self._delete(ts)
            if chunks is None:
                await self._adopt(notice_ts, self._preview(text), final=False)
            else:
                self.ts, self.mode, self.notice = notice_ts, "post", True
            return True
        self.ts, self.mode, self.streamed = ts, "stream", first
        await self._may_edit(final=False)
        return True

    async def _adopt(self, notice_ts: str, shown: str, *, final: bool) -> None:
        """Make the queued notice at ``notice_ts`` this reply's message, showing ``shown``."""
        self.ts, self.mode, self.notice = notice_ts, "post", True
        if await self._may_edit(final=final):
            await self._edit(shown)

    async def _append(self, text: str) -> None:
        sent = len(self.streamed)
        if len(text) <= sent or not text.startswith(self.streamed):
            return
        delta = self._sendable(text)[sent:]
        if not delta or not await self._may_edit(final=False):
            return
        try:
            await self._call(
                "chat_appendStream",
                channel=self.msg.channel,
                ts=self.ts,
                markdown_text=safe_markdown(delta),
            )
            self.streamed += delta
        except SlackApiError as e:
            if str(e.response.get("error", "")) not in _NOT_STREAMING:
                raise DeliveryError(f"chat.appendStream failed: {e}") from e
            logger.info("slack closed the stream job=%s; editing instead", self.job_id)
            self.mode = "post"
            await self._save(mode="post")

    async def _stop(self, text: str, parts: list[str]) -> None:
        """End the native stream with the rest of the text (or edit if Slack closed it)."""
        # The final text continues the stream unless it is too long for one message or
        # differs from what was streamed (e.g. an apology after a failed model call).
        fits = len(safe_markdown(text)) <= self.limit and text.startswith(self.streamed)
        delta = text[len(self.streamed) :] if fits else ""
        kwargs: dict[str, Any] = {"channel": self.msg.channel, "ts": self.ts}
        if delta:
            kwargs["markdown_text"] = safe_markdown(delta)
        try:
            await self._call("chat_stopStream", **kwargs)
            stopped = True
        except SlackApiError as e:
            if str(e.response.get("error", "")) not in _NOT_STREAMING:
                raise DeliveryError(f"chat.stopStream failed: {e}") from e
            stopped = False
        if not stopped or not fits:
            self.mode = "post"
            await self._may_edit(final=True)
            await self._edit(parts[0])

    async def _quietly_stop(self) -> None:
        try:
            await self._call("chat_stopStream", channel=self.msg.channel, ts=self.ts)
        except SlackApiError as e:
            logger.debug("stopStream on re-run job=%s: %s", self.job_id, e)
        self.mode = "post"

    async def _edit(self, text: str, *, notice: bool = False) -> None:
        try:
            if notice:  # Sluice's own plain text
                await self._call("chat_update", channel=self.msg.channel, ts=self.ts, text=text)
            else:
                await self._call(
                    "chat_update", channel=self.msg.channel, ts=self.ts, markdown_text=text
                )
        except SlackApiError as e:
            raise DeliveryError(f"chat.update failed: {e.response.get('error')}") from e
        if self.notice and not notice:
            self.notice = False
            await self._save(notice="0")

    async def _post_rest(self, parts: list[str]) -> None:
        for i, part in enumerate(parts[1:], start=1):
            if i in self.parts:
                continue
            kwargs: dict[str, Any] = {"channel": self.msg.channel, "markdown_text": part}
            if self.thread:
                kwargs["thread_ts"] = self.thread
            try:
                resp = await self._call("chat_postMessage", **kwargs)
            except SlackApiError as e:
                raise DeliveryError(f"chat.postMessage failed: {e.response.get('error')}") from e
            self.parts[i] = str(resp["ts"])
            await self._save(**{f"part:{i}": self.parts[i]})

    async def _respond_url(self, parts: list[str]) -> None:
        """``/ask`` where the bot cannot post: answer through the command's response_url."""
        url = self.msg.meta["response_url"]
        assert self.f.session is not None
        for i, part in enumerate(parts):
            if i in self.parts:
                continue
            # A markdown block renders the Markdown; ``text`` is the notification
            # fallback, escaped so that Slack's mrkdwn parser finds no markup in it.
            payload = {
                "response_type": "in_channel",
                "text": _escape_mrkdwn(part),
                "blocks": [{"type": "markdown", "text": part}],
            }
            try:
                async with self.f.session.post(url, json=payload) as resp:
                    if resp.status >= 500 or resp.status == 429:
                        raise DeliveryRetryableError(f"response_url answered {resp.status}")
                    if resp.status >= 400:
                        raise DeliveryError(f"response_url answered {resp.status}")
            except aiohttp.ClientError as e:
                raise DeliveryRetryableError(f"response_url unreachable: {e}") from e
            self.parts[i] = "url"
            await self._save(**{f"part:{i}": "url"})

"""Workers' side of Discord: deliver a reply over REST, without a gateway connection.

A reply to a message is posted as a Discord reply (``message_reference``) and streamed
by editing it; a reply to ``/ask`` edits the deferred interaction response and adds
follow-ups. Text over 2000 characters becomes several messages
(:func:`bots.discord.split.split_message`). Every send and edit carries
``allowed_mentions: {"parse": []}``, so model output can never ping ``@everyone``, a
role or a user.

Idempotent per job id: the ids of the messages already posted are kept in Redis
(:class:`core.responder.DeliveryState`, with its policy for a Redis error), so a job
re-run after a worker died edits them instead of posting again; each post also
carries a ``nonce`` with ``enforce_nonce`` so that Discord itself drops a second create
of the same part.

While the message waits in line, :meth:`DiscordResponder.queued` shows "⏳ Queued:
about N s" as the reply's first message (for ``/ask``, the deferred response
``@original``), posted with the first part's nonce and recorded in the same state;
the reply job edits it into the answer. A job whose state was read before the notice
was recorded still finds it: Discord answers the repeated nonce with the notice.

Failures: 403 and other 4xx are logged with the channel id and not retried (the job
finishes and the message stays in history); 429, 5xx and network errors are retried by
:class:`~bots.discord.rest.DiscordRest` a bounded number of times, after which
:meth:`DiscordResponder.finish` raises :class:`~core.errors.DeliveryRetryableError` and
the job delivers the kept reply again later (:mod:`workers.delivery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from typing import Any

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bots.discord.interactions import forget_token, load_token, token_ref
from bots.discord.rest import DiscordHTTPError, DiscordRest, Route
from bots.discord.split import split_message
from core.errors import DeliveryError, DeliveryRetryableError, FileRefusedError
from core.files.download import download, origin
from core.infra.logs import register_secret
from core.infra.redis import Keys
from core.messages import QUEUED_PREFIX, FileRef, IncomingMessage, Reply, queued_text
from core.responder import DeliveryState, Responder
from core.settings import Settings

logger = logging.getLogger(__name__)

NO_MENTIONS: dict[str, Any] = {"parse": []}
_TYPING_EVERY_S = 8.0  # Discord shows typing for 10 s after each trigger
_TYPING_MAX_S = 120.0
# Record the queued notice as the job's first message unless the reply recorded one
# or the job is done.
_CLAIM_IDS = """
if redis.call('hexists', KEYS[1], 'done') == 0
   and redis.call('hsetnx', KEYS[1], 'ids', ARGV[1]) == 1 then
  redis.call('hset', KEYS[1], 'texts', ARGV[2])
  redis.call('expire', KEYS[1], ARGV[3])
  return 1
end
return 0
"""


# Where Discord serves attachments.
DISCORD_FILE_HOSTS = frozenset({"cdn.discordapp.com", "media.discordapp.net"})


class DiscordResponderFactory:
    """Creates one :class:`DiscordResponder` per job; holds the shared REST client."""

    platform = "discord"

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self._settings = settings
        self._redis = redis
        self.rest = DiscordRest(settings, redis)
        # Attachments come from Discord's CDN, without the bot token: a session of its own.
        self._files: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the HTTP sessions."""
        await self.rest.start()
        if self._files is None:
            self._files = aiohttp.ClientSession()

    async def close(self) -> None:
        """Close the HTTP sessions."""
        await self.rest.close()
        if self._files is not None:
            await self._files.close()
            self._files = None

    async def fetch_file(
        self, msg: IncomingMessage, ref: FileRef, *, max_bytes: int, timeout_s: float
    ) -> bytes:
        """Download a message attachment from Discord's CDN (or the host of
        ``DISCORD_API_URL``, for a proxy or a test fake); no token is sent.

        Raises:
            FileRefusedError: not a Discord attachment URL, or the download failed.
        """
        if self._files is None:
            raise RuntimeError("DiscordResponderFactory.start() was not awaited")
        hosts = {*DISCORD_FILE_HOSTS, origin(self._settings.discord_api_url)[1]}
        if origin(ref.url)[1] not in hosts:
            raise FileRefusedError(f"{ref.name} is not a Discord attachment, so I did not open it.")
        data, _ = await download(
            self._files, ref.url, name=ref.name, max_bytes=max_bytes, timeout_s=timeout_s
        )
        return data

    def responder(self, msg: IncomingMessage, job_id: str) -> DiscordResponder:
        """The responder for one job."""
        return DiscordResponder(self._settings, self._redis, self.rest, msg, job_id)


class DiscordResponder(Responder):
    """Delivers one reply to Discord: typing, streamed edits, final parts."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        rest: DiscordRest,
        msg: IncomingMessage,
        job_id: str,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._rest = rest
        self._msg = msg
        self._job_id = job_id
        self._state = DeliveryState(redis, Keys(settings.key_prefix), job_id, settings.dedupe_ttl_s)
        self._key = self._state.key
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._done = False
        self._loaded = False
        self._last_update = 0.0
        self._typing: asyncio.Task[None] | None = None
        self._refused: DiscordHTTPError | None = None
        # A reply to /ask: the job holds a reference to the interaction's token, which
        # _load() reads from Redis (bots.discord.interactions). Jobs enqueued before
        # the token moved out of the payload still carry it in "interaction_token".
        self._ref = msg.meta.get("interaction")
        self._token = msg.meta.get("interaction_token")
        if self._token:
            register_secret(self._token)
            self._ref = token_ref(self._token)
        self._token_unread: RedisError | None = None
        self._app_id = msg.meta.get("application_id")

    # --- the Responder protocol ------------------------------------------------------

    async def begin(self) -> None:
        """Load what an earlier try posted; show typing until the first text is out."""
        await self._load()
        if self._done or self._ids or self._ref or not self._settings.discord_typing:
            return
        self._typing = asyncio.create_task(self._keep_typing())

    async def stream(self, text: str) -> None:
        """Show the answer so far, at most every ``SLUICE_DISCORD_STREAM_INTERVAL_S``.

        Streaming is best effort: when the channel's bucket has no free slot the
        update is skipped (the next one, or :meth:`finish`, shows the text).
        """
        if self._done or self._refused is not None:
            return
        now = time.monotonic()
        if now - self._last_update < self._settings.discord_stream_interval_s:
            return
        parts = _parts(text)
        if not parts:
            return
        self._last_update = now
        try:
            await self._sync(parts, best_effort=True)
        except DiscordHTTPError as e:
            self._refused = e  # e.g. 403: finish() reports it instead of trying again
            await self._stop_typing()
        except DeliveryError as e:
            logger.info(
                "discord stream update failed channel=%s job=%s: %s",
                self._msg.channel,
                self._job_id,
                e,
            )

    async def finish(self, reply: Reply) -> None:
        """Post or edit the final text (split over 2000 characters), exactly once.

        Raises:
            DeliveryRetryableError: Discord kept failing (429, 5xx, network); calling
                ``finish`` again, in this job or a re-run, completes the same messages.
        """
        await self._load()
        await self._stop_typing()
        if self._done:
            logger.info("discord reply already delivered job=%s", self._job_id)
            return
        parts = _parts(reply.text) or ["…"]
        try:
            if self._refused is not None:
                raise self._refused
            await self._sync(parts, best_effort=False)
            await self._delete_extra(len(parts))
        except DiscordHTTPError as e:
            # Missing permissions or a deleted channel: retrying cannot help.
            logger.error(
                "discord refused the reply platform=discord tenant=%s channel=%s message=%s "
                "job=%s status=%s code=%s: %s",
                self._msg.tenant,
                self._msg.channel,
                self._msg.message_id,
                self._job_id,
                e.status,
                e.code,
                e,
            )
        except DeliveryRetryableError as e:
            # 429/5xx/network outlasted the REST client's retries: the job keeps the
            # reply and calls finish() again later (workers.delivery); the ids saved so
            # far make that try edit these messages, and nonces stop a second create.
            logger.warning(
                "discord reply failed after retries tenant=%s channel=%s message=%s job=%s: %s",
                self._msg.tenant,
                self._msg.channel,
                self._msg.message_id,
                self._job_id,
                e,
            )
            raise
        else:
            self._done = True
            await self._save(done=True)
            await self._forget_token()
            logger.info(
                "discord reply delivered tenant=%s channel=%s message=%s job=%s parts=%d",
                self._msg.tenant,
                self._msg.channel,
                self._msg.message_id,
                self._job_id,
                len(parts),
            )

    async def queued(self, wait_s: float, place: int | None = None) -> None:
        """Show that the message waits in line, about ``wait_s`` seconds (``place`` in
        line when known).

        Posts "⏳ Queued: #N in line, about N s" as the reply's first message (a Discord reply to
        the user's message; for ``/ask`` the deferred response), or updates the
        notice this job already shows; the reply job's :meth:`stream` and
        :meth:`finish` edit it into the answer. Called by the ``notify_queued`` job
        (a separate responder of the same job id) or while the reply waits in the
        LLM budget's line. Does nothing once the reply is out or being written. A
        courtesy: sent best effort through the paced REST layer (skipped when the
        channel has no free slot), failures logged, never raised.
        """
        text = queued_text(wait_s, place)
        try:
            if not self._ids:
                self._loaded = False  # the reply may have been posted since: look again
            await self._load()
            if self._done or self._refused is not None:
                return
            if self._ids:
                showing_notice = self._texts[0].startswith(QUEUED_PREFIX)
                if (
                    showing_notice
                    and self._texts[0] != text
                    and await self._edit(self._ids[0], text, best_effort=True)
                ):
                    self._texts[0] = text
                    await self._save()
                return
            await self._post_notice(text)
        except (DeliveryError, RedisError) as e:
            logger.info("discord queued notice not shown %s: %s", self._context, e)

    async def withdraw_queued(self) -> None:
        """This message gets no reply of its own (merged into a later message's):
        delete its queued notice, and keep a late ``notify_queued`` from posting one."""
        try:
            await self._state.save({"done": "1"})
            self._loaded = False
            await self._load()
            if self._ids and self._texts[0].startswith(QUEUED_PREFIX):
                await self._delete(self._ids[0])
            await self._forget_token()
        except (DeliveryError, RedisError) as e:
            logger.info("discord queued notice not withdrawn %s: %s", self._context, e)

    async def _post_notice(self, text: str) -> None:
        body: dict[str, Any] = {"content": text, "allowed_mentions": NO_MENTIONS}
        if self._ref:
            route = self._webhook_route("PATCH", "@original")
        else:
            # The first part's nonce: the reply's own first post then finds this message.
            body.update(nonce=_nonce(self._job_id, 0), enforce_nonce=True)
            reply_to = self._msg.meta.get("reply_to")
            if reply_to:
                body["message_reference"] = {"message_id": reply_to, "fail_if_not_exists": False}
            route = Route(
                "POST",
                "/channels/{channel_id}/messages",
                self._msg.channel,
                f"/channels/{self._msg.channel}/messages",
            )
        data = await self._rest.request(route, json=body, best_effort=True, context=self._context)
        if data is None or data.get("content") != text:
            return  # skipped, or the nonce found the reply's first message: it is out
        message_id = "@original" if self._ref else str(data["id"])
        claimed = await self._redis.eval(  # type: ignore[misc]
            _CLAIM_IDS,
            1,
            self._key,
            json.dumps([message_id]),
            json.dumps([text]),
            str(self._settings.dedupe_ttl_s),
        )
        if not claimed:
            # The reply recorded its message meanwhile, or the job is done.
            self._loaded = False
            await self._load()
            if self._ref and self._texts:
                # @original may now show our notice over the answer: put the answer back.
                await self._edit("@original", self._texts[0], best_effort=False)
            elif not self._ids:
                await self._delete(message_id)  # withdrawn: this message gets no reply
            return
        self._ids, self._texts = [message_id], [text]
        logger.info("discord queued notice posted %s id=%s", self._context, message_id)

    # --- delivery --------------------------------------------------------------------

    async def _sync(self, parts: list[str], *, best_effort: bool) -> None:
        """Make the posted messages show ``parts``: edit changed ones, post new ones."""
        if not self._ids:
            # A queued notice may have been recorded since begin(): edit it rather than
            # post (the shared nonce finds it too, but only for a few minutes).
            self._loaded = False
            await self._load()
        for i, part in enumerate(parts):
            if i < len(self._ids):
                if self._texts[i] == part:
                    continue
                try:
                    ok = await self._edit(self._ids[i], part, best_effort=best_effort)
                except DiscordHTTPError as e:
                    if e.status != 404 or best_effort:
                        raise
                    # The message was deleted meanwhile: post the part again.
                    later = self._ids[i + 1 :], self._texts[i + 1 :]
                    self._ids, self._texts = self._ids[:i], self._texts[:i]
                    ok = await self._post(i, part, best_effort=False)
                    self._ids += later[0]
                    self._texts += later[1]
                if not ok:
                    return
                self._texts[i] = part
            elif not await self._post(i, part, best_effort=best_effort):
                return

    async def _post(self, index: int, text: str, *, best_effort: bool) -> bool:
        shown = text
        if self._ref and index == 0:
            # The deferred interaction response is the first part.
            data = await self._rest.request(
                self._webhook_route("PATCH", "@original"),
                json={"content": text, "allowed_mentions": NO_MENTIONS},
                best_effort=best_effort,
                context=self._context,
            )
            message_id = "@original"
        else:
            body: dict[str, Any] = {
                "content": text,
                "allowed_mentions": NO_MENTIONS,
                "nonce": _nonce(self._job_id, index),
                "enforce_nonce": True,
            }
            reply_to = self._msg.meta.get("reply_to")
            if index == 0 and reply_to:
                body["message_reference"] = {"message_id": reply_to, "fail_if_not_exists": False}
            if self._ref:
                route = Route(
                    "POST",
                    "/webhooks/{application_id}/{token}",
                    self._ref,
                    f"/webhooks/{self._app_id}/{self._webhook_token()}",
                )
                data = await self._rest.request(
                    route,
                    json=body,
                    params={"wait": "true"},
                    best_effort=best_effort,
                    context=self._context,
                )
            else:
                route = Route(
                    "POST",
                    "/channels/{channel_id}/messages",
                    self._msg.channel,
                    f"/channels/{self._msg.channel}/messages",
                )
                data = await self._rest.request(
                    route, json=body, best_effort=best_effort, context=self._context
                )
            if data is None:
                return False
            message_id = str(data["id"])
            shown = str(data.get("content", text))
            if shown != text and await self._edit(message_id, text, best_effort=best_effort):
                # The nonce found this job's queued notice: it becomes the answer.
                shown = text
        if data is None:
            return False
        self._ids.append(message_id)
        self._texts.append(shown)
        await self._stop_typing()
        await self._save()
        return True

    async def _edit(self, message_id: str, text: str, *, best_effort: bool) -> bool:
        body = {"content": text, "allowed_mentions": NO_MENTIONS}
        if self._ref:
            route = self._webhook_route("PATCH", message_id)
        else:
            route = Route(
                "PATCH",
                "/channels/{channel_id}/messages/{message_id}",
                self._msg.channel,
                f"/channels/{self._msg.channel}/messages/{message_id}",
            )
        data = await self._rest.request(
            route, json=body, best_effort=best_effort, context=self._context
        )
        return data is not None

    async def _delete_extra(self, keep: int) -> None:
        """Remove parts a longer streamed draft posted that the final text does not need."""
        while len(self._ids) > keep:
            message_id = self._ids.pop()
            self._texts.pop()
            await self._delete(message_id)
            await self._save()

    async def _delete(self, message_id: str) -> None:
        if self._ref:
            route = Route(
                "DELETE",
                "/webhooks/{application_id}/{token}/messages/{message_id}",
                self._ref,
                f"/webhooks/{self._app_id}/{self._webhook_token()}/messages/{message_id}",
            )
        else:
            route = Route(
                "DELETE",
                "/channels/{channel_id}/messages/{message_id}",
                self._msg.channel,
                f"/channels/{self._msg.channel}/messages/{message_id}",
            )
        with contextlib.suppress(DiscordHTTPError):  # already gone is fine
            await self._rest.request(route, context=self._context)

    def _webhook_route(self, method: str, message_id: str) -> Route:
        # The bucket is named by the token's reference: no token in Redis key names.
        return Route(
            method,
            "/webhooks/{application_id}/{token}/messages/{message_id}",
            self._ref or "",
            f"/webhooks/{self._app_id}/{self._webhook_token()}/messages/{message_id}",
        )

    def _webhook_token(self) -> str:
        if self._token_unread is not None:
            raise DeliveryRetryableError(
                f"discord cannot read the interaction token {self._context}: {self._token_unread}"
            )
        if not self._token:
            raise DeliveryError(
                f"discord /ask interaction token expired or missing {self._context} "
                "(Discord accepts it for 15 minutes)"
            )
        return self._token

    async def _forget_token(self) -> None:
        if not self._ref:
            return
        try:
            await forget_token(self._redis, Keys(self._settings.key_prefix), self._ref)
        except RedisError as e:
            # Harmless: the key expires with Discord's 15 minutes anyway.
            logger.warning("cannot drop the interaction token %s: %s", self._context, e)

    @property
    def _context(self) -> str:
        return f"channel={self._msg.channel} job={self._job_id}"

    # --- typing ----------------------------------------------------------------------

    async def _keep_typing(self) -> None:
        route = Route(
            "POST",
            "/channels/{channel_id}/typing",
            self._msg.channel,
            f"/channels/{self._msg.channel}/typing",
        )
        started = time.monotonic()
        while time.monotonic() - started < _TYPING_MAX_S:
            try:
                await self._rest.request(route, best_effort=True, context=self._context)
            except (DeliveryError, RedisError) as e:
                logger.info("discord typing failed %s: %s", self._context, e)
                return
            await asyncio.sleep(_TYPING_EVERY_S)

    async def _stop_typing(self) -> None:
        task, self._typing = self._typing, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- state in Redis --------------------------------------------------------------

    async def _load(self) -> None:
        if self._ref and not self._token:
            try:
                self._token = await load_token(
                    self._redis, Keys(self._settings.key_prefix), self._ref
                )
                self._token_unread = None
            except RedisError as e:
                # Read again by the next _load(); a send before then raises retryable.
                self._token_unread = e
                logger.warning("cannot read the interaction token %s: %s", self._context, e)
        if self._loaded:
            return
        state = await self._state.read()
        self._loaded = True
        if "ids" in state:
            self._ids = json.loads(state["ids"])
            self._texts = json.loads(state.get("texts", "[]"))
        self._done = state.get("done") == "1"

    async def _save(self, *, done: bool = False) -> None:
        mapping = {"ids": json.dumps(self._ids), "texts": json.dumps(self._texts)}
        if done:
            mapping["done"] = "1"
        await self._state.save(mapping)


def _parts(text: str) -> list[str]:
    return [p for p in split_message(text) if p.strip()]


def _nonce(job_id: str, index: int) -> str:
    # Discord nonces are at most 25 characters.
    return hashlib.sha256(f"{job_id}:{index}".encode()).hexdigest()[:25]

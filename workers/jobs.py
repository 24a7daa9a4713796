"""The worker's jobs. ``reply`` answers one accepted message."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from arq.worker import Retry
from redis.exceptions import RedisError

from core.errors import (
    DeliveryError,
    DeliveryRetryableError,
    HistoryError,
    LLMError,
    LLMRequestError,
    LLMUnavailableError,
)
from core.files.attach import Attachments, read_attachments
from core.framework.agent import Exchange, history_messages, run_tool_loop
from core.framework.bot import Bot
from core.framework.commands import split_invocation
from core.framework.context import MessageContext
from core.history.hot import HotHistory
from core.infra import metrics, tracing
from core.llm.client import ChatMessage, Completion, LLMProvider
from core.messages import IncomingMessage, Reply, Turn
from core.responder import (
    Responder,
    ResponderFactory,
    load_responder_factory,
)
from core.settings import Settings
from core.traffic import door
from core.traffic.cache import cache_enabled
from core.traffic.choices import Choices
from core.traffic.control import GAVE_UP, REDIS_RETRY_S, Traffic
from workers import delivery, reaper

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

APOLOGY = (
    "Sorry, I couldn't answer that just now: the language model did not respond. "
    "Please try again in a minute."
)
CUT_NOTE = "\n\n_(The answer was cut off. Please ask again.)_"
EMPTY_NOTICE = "I received an empty message. Type a question and I'll answer it."


def truncation_note(length: int, limit: int) -> str:
    """The visible note that a long message was cut for the model."""
    return f"_(Your message was {length:,} characters long; I read the first {limit:,}.)_\n\n"


async def get_responder_factory(ctx: dict[str, Any], platform: str) -> ResponderFactory:
    """The platform's responder factory, created on first use and kept in ``ctx``."""
    factories: dict[str, ResponderFactory] = ctx["responders"]
    if platform not in factories:
        async with ctx["responders_lock"]:
            if platform not in factories:
                factory = load_responder_factory(platform, ctx["settings"], ctx["redis"])
                await factory.start()
                factories[platform] = factory
    return factories[platform]


def build_context(
    bot: Bot,
    history: list[Turn],
    text: str,
    system_prompt: str | None = None,
    attachments: Attachments | None = None,
) -> list[ChatMessage]:
    """The messages sent to the model: persona, earlier turns, the new message (with
    the text and images of its attached files)."""
    system = system_prompt if system_prompt is not None else bot.system_prompt
    messages: list[ChatMessage] = [{"role": "system", "content": system}]
    messages.extend(history_messages(history))
    content = attachments.user_content(text) if attachments is not None else text
    messages.append({"role": "user", "content": content})
    return messages


@tracing.traced_job
async def reply(ctx: dict[str, Any], payload: dict[str, Any]) -> str:
    """Answer one message, in its conversation's turn (one reply at a time per
    conversation, in arrival order; a job whose conversation is busy parks).

    A reply that was made but not delivered by an earlier try (:mod:`workers.delivery`)
    is only delivered: no turn, no model call, no history write.
    """
    msg = IncomingMessage.model_validate(payload)
    answered: set[str] = ctx.get("answered_jobs", set())
    if ctx.get("job_id") in answered:
        # An earlier try delivered the reply and lost only its end (a Redis failover).
        answered.discard(ctx["job_id"])
        logger.info("message=%s job=%s was answered by an earlier try", msg.message_id, msg.job_id)
        return "answered"
    # The message's own job id: what conversation lines, merge markers and responders
    # key on. (arq's id is the same with SLUICE_KEY_PREFIX in front; see core.traffic.queue.)
    job_id = msg.job_id
    traffic: Traffic = ctx["traffic"]
    try:
        owed = await delivery.load(traffic.redis, traffic.keys, job_id)
    except (RedisError, OSError) as e:
        # Cannot tell whether the answer is already made: never risk a second one.
        logger.warning("cannot read delivery state of job=%s: %s", job_id, e)
        raise Retry(defer=REDIS_RETRY_S) from e
    if owed is not None:
        # Answered and in history already: only the delivery is left (no turn, no model).
        return await deliver_again(ctx, msg, job_id, owed)
    async with traffic.in_turn(msg, job_id) as turn:
        if turn.merged:
            logger.info("message=%s job=%s answered with its burst", msg.message_id, job_id)
            await _withdraw_queued(ctx, msg, job_id)
            return "merged"
        try:
            done_at_door = await door.answered_at_door(traffic.redis, traffic.keys, job_id)
        except (RedisError, OSError) as e:
            # Cannot tell whether the door answered it: never risk a second answer.
            logger.warning("cannot read the door mark of job=%s: %s", job_id, e)
            raise Retry(defer=REDIS_RETRY_S) from e
        if done_at_door:
            # Answered from the cache on the reserved path while this job waited.
            logger.info("message=%s job=%s answered at the door", msg.message_id, job_id)
            return "answered at the door"
        return await answer_message(ctx, turn.msg, job_id, turn.may_run)


async def _withdraw_queued(ctx: dict[str, Any], msg: IncomingMessage, job_id: str) -> None:
    """A merged message gets no reply of its own: take back its queued notice."""
    factory = await get_responder_factory(ctx, msg.platform)
    await factory.responder(msg, job_id).withdraw_queued()


async def answer_message(
    ctx: dict[str, Any],
    msg: IncomingMessage,
    job_id: str,
    may_run: bool = True,
    door_hit: Completion | None = None,
) -> str:
    """Answer one message: context from history, the model, the reply, history again.

    Every accepted message ends in exactly one visible reply: the answer, a short
    notice, or a short apology. When the platform keeps failing the final delivery
    (:class:`DeliveryRetryableError`), the reply is kept and recorded in history now,
    and the job is retried with a backoff to deliver it (:func:`deliver_again`).

    Raises:
        arq.worker.Retry: the final delivery is to be tried again later.
    """
    factory = await get_responder_factory(ctx, msg.platform)
    responder = factory.responder(msg, job_id)
    logger.info(
        "job start platform=%s tenant=%s message=%s job=%s lane=%s try=%s",
        msg.platform,
        msg.tenant,
        msg.message_id,
        job_id,
        msg.lane,
        ctx.get("job_try"),
    )
    started = time.monotonic()
    timing = metrics.JobTiming(msg.platform, msg.lane, ctx.get("enqueue_time"))
    msg, mctx, early = await _before_hooks(ctx, msg)
    # Recorded for SQL now (after the hooks, so only rewritten text is ever stored).
    await _record_incoming(ctx, msg)
    await _deliver(timing, msg.platform, responder.begin())
    exchange = Exchange()
    try:
        if not may_run:
            reply_, completion = Reply(text=GAVE_UP, kind="error"), None
        elif early is not None:
            reply_, completion = early, None
        else:
            reply_, completion = await _answer(
                ctx, msg, responder, mctx, exchange, timing, door_hit
            )
    except Exception:
        # A bug or an unforeseen failure still ends in a visible reply, never silence;
        # the traceback goes to the log, not to the user.
        logger.exception(
            "job failed platform=%s message=%s job=%s; sending an apology",
            msg.platform,
            msg.message_id,
            job_id,
        )
        reply_, completion = Reply(text=APOLOGY, kind="error"), None
    if await _superseded(ctx, msg, job_id):
        return "superseded"
    try:
        await _deliver(timing, msg.platform, responder.finish(reply_))
        await _mark_answered(ctx)
    except DeliveryRetryableError as e:
        # The platform is failing for now: keep the reply, record history at once (the
        # next message's context needs the answer), and deliver it in a later try.
        attempts = await _keep_undelivered(ctx, msg, job_id, reply_, e)
        await _remember(ctx, msg, reply_, completion, started, exchange.turns)
        await _retry_or_give_up(ctx, msg, job_id, attempts, e)
        return reply_.kind
    except DeliveryError as e:
        # The target is gone or refuses the bot (channel deleted, thread archived, app
        # removed): no retry can help. Log where, keep the history, end the job.
        logger.error(
            "reply not delivered platform=%s tenant=%s channel=%s message=%s job=%s: %s",
            msg.platform,
            msg.tenant,
            msg.channel,
            msg.message_id,
            job_id,
            e,
        )
    await _remember(ctx, msg, reply_, completion, started, exchange.turns)
    timing.done(reply_.kind)
    logger.info(
        "job done platform=%s tenant=%s message=%s job=%s kind=%s in %.2fs",
        msg.platform,
        msg.tenant,
        msg.message_id,
        job_id,
        reply_.kind,
        time.monotonic() - started,
    )
    return reply_.kind


async def _mark_answered(ctx: dict[str, Any]) -> None:
    """Record that this job's reply reached the platform (see ``Keys.job_answered``)."""
    arq_id = ctx.get("job_id")
    if arq_id is None or "worker_member" not in ctx:
        return
    settings: Settings = ctx["settings"]
    try:
        await ctx["redis"].set(ctx["keys"].job_answered(arq_id), b"1", ex=settings.dedupe_ttl_s)
    except (RedisError, OSError) as e:
        # The reply is out; only a re-run after a lost end could repeat it.
        logger.warning("cannot record that job=%s was answered: %s", arq_id, e)


async def _superseded(ctx: dict[str, Any], msg: IncomingMessage, job_id: str) -> bool:
    """Whether this try lost the job while its worker was cut off (handed back, see
    :mod:`workers.reaper`): then another try delivers, and this one must not."""
    member, arq_id = ctx.get("worker_member"), ctx.get("job_id")
    if member is None or arq_id is None or arq_id not in ctx.get("claimed_jobs", ()):
        return False  # not claimed: run by arq's own Worker, or called directly
    try:
        owns = await reaper.still_owns(ctx["redis"], ctx["keys"], member, arq_id)
    except (RedisError, OSError) as e:
        logger.warning(
            "cannot check ownership of job=%s (%s): not delivering, leaving it to a re-run",
            job_id,
            e,
        )
        owns = False
    else:
        if not owns:
            logger.warning(
                "job=%s message=%s was handed back while this worker was cut off: "
                "not delivering (the worker that took it over does)",
                job_id,
                msg.message_id,
            )
    if not owns:
        ctx.setdefault("superseded_jobs", set()).add(arq_id)
    return not owns


async def deliver_again(
    ctx: dict[str, Any], msg: IncomingMessage, job_id: str, owed: delivery.Undelivered
) -> str:
    """Deliver a reply an earlier try of the job made but the platform did not take.

    Raises:
        arq.worker.Retry: the platform still fails; the job runs again after a backoff.
    """
    settings: Settings = ctx["settings"]
    traffic: Traffic = ctx["traffic"]
    factory = await get_responder_factory(ctx, msg.platform)
    responder = factory.responder(msg, job_id)
    timing = metrics.JobTiming(msg.platform, msg.lane, ctx.get("enqueue_time"))
    logger.info(
        "delivering again platform=%s tenant=%s message=%s job=%s attempt=%d",
        msg.platform,
        msg.tenant,
        msg.message_id,
        job_id,
        owed.attempts + 1,
    )
    try:
        await _deliver(timing, msg.platform, responder.begin())
        await _deliver(timing, msg.platform, responder.finish(owed.reply))
    except DeliveryRetryableError as e:
        try:
            attempts = await delivery.count_failure(traffic.redis, traffic.keys, settings, job_id)
        except (RedisError, OSError) as redis_error:
            # Not counted this time; the kept reply is still there for the next try.
            logger.warning("cannot count a delivery attempt of job=%s: %s", job_id, redis_error)
            defer_s = delivery.backoff_s(settings, owed.attempts + 1, e.retry_after_s)
            raise Retry(defer=defer_s) from e
        await _retry_or_give_up(ctx, msg, job_id, attempts, e)
        return owed.reply.kind
    except DeliveryError as e:
        logger.error(
            "reply not delivered platform=%s tenant=%s channel=%s message=%s job=%s: %s",
            msg.platform,
            msg.tenant,
            msg.channel,
            msg.message_id,
            job_id,
            e,
        )
    try:
        await delivery.forget(traffic.redis, traffic.keys, job_id)
    except (RedisError, OSError):
        # Harmless: the job is over, and the key expires with SLUICE_DEDUPE_TTL_S.
        logger.warning("cannot drop the delivered reply of job=%s", job_id, exc_info=True)
    logger.info(
        "job done platform=%s tenant=%s message=%s job=%s kind=%s after %d delivery attempts",
        msg.platform,
        msg.tenant,
        msg.message_id,
        job_id,
        owed.reply.kind,
        owed.attempts + 1,
    )
    return owed.reply.kind


async def _keep_undelivered(
    ctx: dict[str, Any],
    msg: IncomingMessage,
    job_id: str,
    reply_: Reply,
    error: DeliveryRetryableError,
) -> int:
    """Keep the reply for a later try; the attempts so far (0 if it could not be kept)."""
    traffic: Traffic = ctx["traffic"]
    try:
        return await delivery.keep(traffic.redis, traffic.keys, ctx["settings"], job_id, reply_)
    except (RedisError, OSError):
        logger.exception("cannot keep the undelivered reply of job=%s", job_id)
        return 0


async def _retry_or_give_up(
    ctx: dict[str, Any],
    msg: IncomingMessage,
    job_id: str,
    attempts: int,
    error: DeliveryRetryableError,
) -> None:
    """Raise ``Retry`` with a backoff, or log once, loudly, that the reply is given up."""
    settings: Settings = ctx["settings"]
    traffic: Traffic = ctx["traffic"]
    if 0 < attempts < settings.delivery_max_tries:
        defer_s = delivery.backoff_s(settings, attempts, error.retry_after_s)
        logger.warning(
            "reply not delivered yet platform=%s tenant=%s channel=%s message=%s job=%s "
            "attempt=%d; again in %.1fs: %s",
            msg.platform,
            msg.tenant,
            msg.channel,
            msg.message_id,
            job_id,
            attempts,
            defer_s,
            error,
        )
        raise Retry(defer=defer_s) from error
    delivery.log_given_up(msg, job_id, max(attempts, 1), error)
    try:
        await delivery.forget(traffic.redis, traffic.keys, job_id)
    except (RedisError, OSError):
        logger.warning("cannot drop the undelivered reply of job=%s", job_id, exc_info=True)


@tracing.traced_delivery
async def _deliver(timing: metrics.JobTiming, platform: str, call: Awaitable[None]) -> None:
    """A responder call, timed; a delivery failure is counted, then raised."""
    try:
        async with timing.delivering():
            await call
    except DeliveryError:
        metrics.DELIVERY_ERRORS.labels(platform).inc()
        raise


async def _before_hooks(
    ctx: dict[str, Any], msg: IncomingMessage
) -> tuple[IncomingMessage, MessageContext, Reply | None]:
    """Run the bot's before-hooks first of all: text they rewrite (e.g. masked personal
    data) replaces the message's, so only the rewritten text is ever recorded, sent to
    the model or stored. A ``Reply`` from a hook answers the message instead."""
    mctx = _context(ctx, msg)
    text = mctx.text = msg.text.strip()
    if not text:
        return msg, mctx, None
    bot: Bot = ctx["bot"]
    early = await bot.run_before_hooks(mctx)
    if mctx.text != text:
        msg = msg.model_copy(update={"text": mctx.text})
    return msg, mctx, early


def _context(ctx: dict[str, Any], msg: IncomingMessage) -> MessageContext:
    """The context of ``msg`` with what only the worker knows: admin, the choices store."""
    settings: Settings = ctx["settings"]
    mctx = MessageContext.from_message(msg)
    mctx.is_admin = mctx.is_admin or msg.user in settings.admin_users
    mctx.choices = ctx["choices"]
    return mctx


async def _model_for(ctx: dict[str, Any], msg: IncomingMessage) -> str:
    """The model for ``msg``: the channel's or tenant's choice (``/model``), else the default."""
    choices: Choices = ctx["choices"]
    return await choices.model_for(msg.platform, msg.tenant, msg.channel)


async def _answer(
    ctx: dict[str, Any],
    msg: IncomingMessage,
    responder: Responder,
    mctx: MessageContext,
    exchange: Exchange,
    timing: metrics.JobTiming,
    door_hit: Completion | None = None,
) -> tuple[Reply, Completion | None]:
    """The reply to ``msg``; ``door_hit`` is the cached answer the door found for
    exactly this request (:func:`cached_at_door`), used instead of the first call."""
    settings: Settings = ctx["settings"]
    bot: Bot = ctx["bot"]
    text = msg.text.strip()
    # A platform command (meta["command"]) may come without arguments.
    if not text and not msg.meta.get("command") and not msg.files:
        return Reply(text=EMPTY_NOTICE, kind="notice"), None
    # A command is answered without the model.
    command_reply = await bot.run_command(mctx, msg.meta.get("command"))
    if command_reply is not None:
        return command_reply, None
    traffic: Traffic = ctx["traffic"]
    limited = await traffic.check_limits(msg)
    if limited is not None:
        return limited, None
    note, text = _cut(settings, text)
    attachments = await _attachments(ctx, msg)
    if attachments is not None and not attachments.used and not text:
        # Every file was refused and there is nothing else to answer.
        return Reply(text=attachments.note().strip(), kind="notice"), None
    note = (attachments.note() if attachments is not None else "") + note
    earlier = await _earlier(ctx, msg)

    async def on_text(so_far: str) -> None:
        await _deliver(timing, msg.platform, responder.stream(note + so_far))

    provider: LLMProvider = ctx["llm"]
    cached = False
    model = await _model_for(ctx, msg)

    async def call(messages: list[ChatMessage], extra: dict[str, Any]) -> Completion:
        # Through the response cache and the shared LLM budget (core.traffic.control).
        nonlocal cached, door_hit
        if door_hit is not None:
            hit, door_hit = door_hit, None
            cached = True
            return hit
        async with timing.calling_llm():
            completion, cached = await traffic.complete(
                msg,
                msg.job_id,
                responder,
                provider,
                messages,
                model=model,
                on_text=on_text,
                max_tokens=bot.max_tokens or settings.llm_max_tokens,
                temperature=bot.temperature,
                **{**bot.params, **extra},
            )
        return completion

    try:
        done = await run_tool_loop(
            call,
            build_context(bot, earlier, text, await bot.system_prompt_for(mctx), attachments),
            bot.tools,
            mctx,
            max_steps=_first(bot.tool_max_steps, settings.tool_max_steps),
            timeout_s=_first(bot.tool_timeout_s, settings.tool_timeout_s),
            call_timeout_s=settings.tool_call_timeout_s,
            max_result_chars=settings.tool_result_max_chars,
            # Platforms that can show tool calls (Slack: task updates) hear of each.
            on_tool=responder.tool_progress,
        )
    except LLMRequestError as e:
        logger.error("llm refused message=%s: %s", msg.message_id, e)
        return Reply(text=APOLOGY, kind="error"), None
    except LLMUnavailableError as e:
        logger.warning("llm unavailable message=%s: %s", msg.message_id, e)
        if e.partial_text:
            return Reply(text=note + e.partial_text + CUT_NOTE, kind="error"), None
        return await traffic.error_reply(e, APOLOGY), None
    except LLMError as e:
        logger.warning("llm failed message=%s: %s", msg.message_id, e)
        return Reply(text=APOLOGY, kind="error"), None
    exchange.turns = done.turns
    completion = done.completion
    if not completion.text.strip():
        return Reply(text=APOLOGY, kind="error"), completion
    return await bot.finish(mctx, Reply(text=note + completion.text, cached=cached)), completion


async def _attachments(ctx: dict[str, Any], msg: IncomingMessage) -> Attachments | None:
    """The message's files, downloaded and read (``None`` when it has none)."""
    if not msg.files:
        return None
    settings: Settings = ctx["settings"]
    bot: Bot = ctx["bot"]
    factory = await get_responder_factory(ctx, msg.platform)
    vision = bot.vision if bot.vision is not None else settings.vision
    return await read_attachments(factory, msg, settings, vision=vision)


def _cut(settings: Settings, text: str) -> tuple[str, str]:
    """The note for a text cut for the model, and the text the model gets."""
    if len(text) > settings.max_input_chars:
        return truncation_note(len(text), settings.max_input_chars), text[
            : settings.max_input_chars
        ]
    return "", text


async def _earlier(ctx: dict[str, Any], msg: IncomingMessage) -> list[Turn]:
    """The conversation's earlier turns the model sees with ``msg``."""
    settings: Settings = ctx["settings"]
    bot: Bot = ctx["bot"]
    history: HotHistory = ctx["history"]
    n = bot.context_turns if bot.context_turns is not None else settings.context_turns
    try:
        return await history.recent(
            msg.conversation_id, n, exclude={msg.message_id, f"{msg.message_id}:answer"}
        )
    except HistoryError:
        logger.exception("history unavailable for %s; answering without it", msg.message_id)
        return []


async def cached_at_door(ctx: dict[str, Any], msg: IncomingMessage) -> Completion | None:
    """The cached answer to ``msg`` if there is one, for the reserved path; looked up for
    exactly the request :func:`_answer` would send (same persona, history, text cut and
    parameters), without running anything of the bot's that may have effects.

    ``None`` (the reply job answers as usual) when the message is empty, a command, or
    the bot has before-hooks (they may rewrite the text; they run once, in the reply
    job) or tools, it has files (they are downloaded in the reply job), or the cache is
    off for it.
    """
    settings: Settings = ctx["settings"]
    bot: Bot = ctx["bot"]
    traffic: Traffic = ctx["traffic"]
    text = msg.text.strip()
    if (
        not text
        or msg.files
        or msg.meta.get("command")
        or bot.has_before_hooks
        or bot.tools
        or bot.merge_burst_s > 0
        or not cache_enabled(settings, bot, msg)
        or split_invocation(text, set(bot.commands), bot.bare_commands) is not None
    ):
        return None
    mctx = _context(ctx, msg)
    mctx.text = text
    _, text = _cut(settings, text)
    messages = build_context(bot, await _earlier(ctx, msg), text, await bot.system_prompt_for(mctx))
    return await traffic.cached(
        msg,
        messages,
        model=await _model_for(ctx, msg),
        max_tokens=bot.max_tokens or settings.llm_max_tokens,
        temperature=bot.temperature,
        **bot.params,
    )


def _first(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def _user_turn(msg: IncomingMessage) -> Turn:
    return Turn(
        role="user",
        text=msg.text,
        message_id=msg.message_id,
        ts=msg.ts,
        user=msg.user,
        lane=msg.lane,
        files=[f.stored() for f in msg.files] or None,
    )


async def _record_incoming(ctx: dict[str, Any], msg: IncomingMessage) -> None:
    """Record the accepted message for SQL now, before anything can fail."""
    history: HotHistory = ctx["history"]
    try:
        await history.record(msg, [_user_turn(msg)])
    except HistoryError:
        logger.exception("could not record message=%s", msg.message_id)


async def _remember(
    ctx: dict[str, Any],
    msg: IncomingMessage,
    reply_: Reply,
    completion: Completion | None,
    started: float,
    extra_turns: list[Turn] | None = None,
) -> None:
    history: HotHistory = ctx["history"]
    turns = [_user_turn(msg), *(extra_turns or [])]
    if reply_.kind == "answer":
        turns.append(
            Turn(
                role="assistant",
                text=reply_.text,
                message_id=f"{msg.message_id}:answer",
                user=msg.user,
                model=completion.model if completion else None,
                tokens_in=completion.tokens_in if completion else 0,
                tokens_out=completion.tokens_out if completion else 0,
                latency_ms=int((time.monotonic() - started) * 1000),
                lane=msg.lane,
                cached=reply_.cached,
            )
        )
    try:
        # History must be written even if the job is being cancelled at this point.
        # The user's message went to the backlog when the job started; only the
        # answer is recorded now (both join the hot window together, after the answer).
        await asyncio.shield(
            history.append(msg.conversation_id, turns, origin=msg, backlog=turns[1:])
        )
    except HistoryError:
        logger.exception("could not store turns of message=%s", msg.message_id)

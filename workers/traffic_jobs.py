"""The reserved path's jobs: what a user must see at once, whatever the backlog.

They run on the reserved queue (:func:`core.traffic.queue.notice_queue_name`), served by a
second arq loop in every worker process with its own slots (:mod:`workers.notices`), so
they never wait for a slot that reply jobs hold while they wait for the LLM budget.

- ``door_check``: a message just queued. If nothing earlier of its conversation is in
  flight and its answer is cached, answer it now (:func:`answer_at_door`); otherwise,
  when its expected wait passes ``SLUICE_QUEUED_NOTICE_AFTER_S``, show "Queued: #N in
  line, about N s" and, past ``SLUICE_NOTICE_REFRESH_AFTER_S``, keep it fresh.
- ``notify_queued``: show the queued notice. Its refreshes (every
  ``SLUICE_NOTICE_REFRESH_EVERY_S`` until the answer starts) are not jobs: every worker
  sweeps the due ones (:mod:`workers.refresher`, :func:`refresh_notice`).
- ``door_refuse``: the notice for a message refused at the door.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.exceptions import RedisError

from core.errors import DeliveryError
from core.messages import IncomingMessage, Reply
from core.settings import Settings
from core.traffic import door
from core.traffic.control import Traffic
from core.traffic.queue import (
    arq_job_id,
    queue_slot_now,
    reply_queues,
)
from workers.jobs import answer_message, cached_at_door, get_responder_factory
from workers.refresher import MAX_REFRESHES, schedule_refresh

logger = logging.getLogger(__name__)


async def door_check(
    ctx: dict[str, Any],
    payload: dict[str, Any],
    place: int,
    wait_s: int,
    try_cache: bool,
) -> str:
    """A message just queued: its cached answer now, or its queued notice."""
    msg = IncomingMessage.model_validate(payload)
    if try_cache and await answer_at_door(ctx, msg):
        return "answered"
    if wait_s > 0:
        await show_queued(ctx, msg, float(wait_s), place)
        settings: Settings = ctx["settings"]
        if wait_s > settings.notice_refresh_after_s:
            await _next_refresh(ctx, msg, 0)
        return "notice"
    return "queued"


async def notify_queued(
    ctx: dict[str, Any],
    payload: dict[str, Any],
    wait_s: int,
    place: int | None = None,
    refresh: int = 0,
) -> None:
    """Show "queued, about ``wait_s`` s" for a message whose reply job still waits.

    Only responders that can replace the notice with the answer have ``queued``
    (web chat, Slack, Discord); for the others this does nothing. The responder is
    this job's own, keyed by the reply's job id: Slack and Discord record the notice
    in that job's delivery state, where the reply job finds and edits it.

    ``refresh`` > 0: a refresh job queued by an older version (refreshes are now swept
    by :mod:`workers.refresher`): refresh once, and hand the rest to the sweep.
    """
    msg = IncomingMessage.model_validate(payload)
    if refresh > 0:
        if await refresh_notice(ctx, msg) and refresh < MAX_REFRESHES:
            await _next_refresh(ctx, msg, refresh)
        return
    await show_queued(ctx, msg, float(wait_s), place)


async def refresh_notice(ctx: dict[str, Any], msg: IncomingMessage) -> bool:
    """Show ``msg``'s queued notice again with the current estimate; ``False`` (nothing
    shown) once its answer is being made, or it is gone: no more refreshes then."""
    traffic: Traffic = ctx["traffic"]
    s = traffic.settings
    queue, _ = queue_slot_now(s, msg, 0)
    own = await door.line_of_job(
        traffic.redis, traffic.keys, s, queue, arq_job_id(s, msg), msg.job_id
    )
    if own is None:
        if not await door.waiting_for_turn(traffic.redis, traffic.keys, msg):
            return False  # the answer is being made (or gone): the notice is left to it
        own = door.Line(1, 0.0)  # started, but an earlier message goes first
    # Behind an earlier message of its conversation (maybe parked): that one's wait.
    line = await door.conversation_line(
        traffic.redis, traffic.keys, s, msg, own, queue=queue, queues=reply_queues(s)
    )
    if line.wait_s is None:
        return False
    await show_queued(ctx, msg, line.wait_s, line.place)
    return True


async def show_queued(
    ctx: dict[str, Any], msg: IncomingMessage, wait_s: float, place: int | None
) -> None:
    """The responder's ``queued`` notice."""
    factory = await get_responder_factory(ctx, msg.platform)
    await factory.responder(msg, msg.job_id).queued(wait_s, place)
    logger.info("queued notice message=%s place=%s wait=%.0fs", msg.message_id, place, wait_s)


async def _next_refresh(ctx: dict[str, Any], msg: IncomingMessage, done: int) -> None:
    """Have the workers' refresher (:mod:`workers.refresher`) refresh the notice one
    interval from now; ``done``: refreshes so far."""
    traffic: Traffic = ctx["traffic"]
    try:
        await schedule_refresh(traffic.redis, traffic.keys, traffic.settings, msg, done)
    except (RedisError, OSError) as e:
        logger.warning("queued notice of message=%s not refreshed: %s", msg.message_id, e)


async def door_refuse(ctx: dict[str, Any], payload: dict[str, Any], text: str) -> str:
    """Tell the sender that their message was refused at the door, and why."""
    msg = IncomingMessage.model_validate(payload)
    factory = await get_responder_factory(ctx, msg.platform)
    responder = factory.responder(msg, msg.job_id)
    try:
        await responder.begin()
        await responder.finish(Reply(text=text, kind="notice"))
    except DeliveryError as e:
        logger.error(
            "refusal not delivered platform=%s tenant=%s channel=%s message=%s: %s",
            msg.platform,
            msg.tenant,
            msg.channel,
            msg.message_id,
            e,
        )
        return "not delivered"
    logger.info("refusal delivered platform=%s message=%s", msg.platform, msg.message_id)
    return "refused"


async def answer_at_door(ctx: dict[str, Any], msg: IncomingMessage) -> bool:
    """Answer ``msg`` from the cache on the reserved path, if nothing earlier of its
    conversation is in flight and the whole request's answer is cached.

    It holds the conversation meanwhile (:func:`core.traffic.door.take_conversation`), records
    both turns in history like any answer, then marks the message answered and frees
    the conversation in one step, so its reply job ends without a second reply.
    Returns ``False`` (the reply job answers as usual) otherwise.
    """
    traffic: Traffic = ctx["traffic"]
    redis, keys, settings = traffic.redis, traffic.keys, traffic.settings
    if not await door.take_conversation(redis, keys, settings, msg):
        return False
    renewer = asyncio.create_task(_renew(ctx, msg))
    answered = False
    try:
        hit = await cached_at_door(ctx, msg)
        if hit is None:
            return False
        await answer_message(ctx, msg, msg.job_id, door_hit=hit)
        queue, _ = queue_slot_now(settings, msg, 0)
        answered = await door.answered(redis, keys, msg, queue, arq_job_id(settings, msg))
        if not answered:
            logger.warning(
                "door answer of message=%s outlived its hold on the conversation", msg.message_id
            )
        logger.info("answered at the door message=%s job=%s", msg.message_id, msg.job_id)
        return True
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        if not answered:
            await asyncio.shield(door.let_go(redis, keys, msg))


async def _renew(ctx: dict[str, Any], msg: IncomingMessage) -> None:
    traffic: Traffic = ctx["traffic"]
    while True:
        await asyncio.sleep(traffic.settings.conversation_lock_ttl_s / 3)
        try:
            s = traffic.settings
            if not await door.renew_conversation(traffic.redis, traffic.keys, s, msg):
                return
        except (RedisError, OSError) as e:
            logger.warning("cannot renew the door's hold on message=%s: %s", msg.message_id, e)

"""Small jobs of traffic control. ``notify_queued`` tells a user their message waits."""

from __future__ import annotations

import logging
from typing import Any

from core.messages import IncomingMessage
from workers.jobs import get_responder_factory

logger = logging.getLogger(__name__)


async def notify_queued(ctx: dict[str, Any], payload: dict[str, Any], wait_s: int) -> None:
    """Show "queued, about ``wait_s`` s" for a message whose reply job still waits.

    Only responders that can replace the notice with the answer have ``queued``
    (web chat, Slack, Discord); for the others this does nothing. The responder is
    this job's own, keyed by the reply's job id: Slack and Discord record the notice
    in that job's delivery state, where the reply job finds and edits it.
    """
    msg = IncomingMessage.model_validate(payload)
    factory = await get_responder_factory(ctx, msg.platform)
    responder = factory.responder(msg, msg.job_id)
    show = getattr(responder, "queued", None)
    if show is not None:
        await show(float(wait_s))
        logger.info("queued notice message=%s wait=%ds", msg.message_id, wait_s)

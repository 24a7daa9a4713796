"""The ``feedback`` job: record a 👍/👎 vote, then run the bot's ``@bot.on_feedback``."""

from __future__ import annotations

import logging
from typing import Any

from arq.worker import Retry

from core.errors import HistoryError
from core.framework.bot import Bot
from core.history.feedback import record
from core.messages import Feedback

logger = logging.getLogger(__name__)

RETRY_S = 5.0
MAX_TRIES = 5


async def feedback(ctx: dict[str, Any], payload: dict[str, Any]) -> str:
    """Store one vote (a user's new vote on an answer replaces the old one) and run the
    hooks when it changed anything. The database failing defers the job (arq retries
    it up to :data:`MAX_TRIES` times).

    Returns ``up``/``down``, or ``unchanged`` for the same vote twice.
    """
    fb = Feedback.model_validate(payload)
    try:
        previous = await record(ctx["db"], fb)
    except HistoryError as e:
        logger.warning(
            "feedback not recorded yet platform=%s tenant=%s message=%s try=%s: %s",
            fb.platform,
            fb.tenant,
            fb.message_id,
            ctx.get("job_try"),
            e,
        )
        raise Retry(defer=RETRY_S) from e
    logger.info(
        "feedback recorded platform=%s tenant=%s message=%s vote=%s previous=%s",
        fb.platform,
        fb.tenant,
        fb.message_id,
        fb.vote,
        previous,
    )
    if previous == fb.vote:
        return "unchanged"
    bot: Bot = ctx["bot"]
    await bot.run_feedback_hooks(fb.model_copy(update={"previous": previous}))
    return fb.vote

"""👍/👎 on Discord: buttons under each answer and the clicks on them.

The answer's last message carries an action row of two buttons whose ``custom_id``
is ``sluice_fb:<up|down>:<message id>`` (the message the answer replied to; at most
100 characters, as Discord allows). A click arrives as a component interaction: it is
acknowledged at once with a note only the user sees, checked
(:func:`core.history.feedback.parse_vote`: a custom id can be forged by any client),
and queued for a worker, which records it and runs ``@bot.on_feedback``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, cast

import discord
from arq.connections import ArqRedis

from core.errors import InputError, QueueError
from core.history import feedback
from core.messages import Feedback, Platform
from core.settings import Settings

logger = logging.getLogger(__name__)

PREFIX = "sluice_fb"
THANKS = "Thanks for the feedback."
NOT_RECORDED = "Sorry, I couldn't record that just now. Please try again in a minute."
_CUSTOM_ID = re.compile(rf"{PREFIX}:(up|down):(\d{{1,20}})")


def feedback_components(message_id: str) -> list[dict[str, Any]]:
    """The action row with the two buttons (Discord's raw component JSON)."""

    def button(vote: str, emoji: str) -> dict[str, Any]:
        # style 2: grey ("secondary")
        return {
            "type": 2,
            "style": 2,
            "emoji": {"name": emoji},
            "custom_id": f"{PREFIX}:{vote}:{message_id}",
        }

    return [{"type": 1, "components": [button("up", "👍"), button("down", "👎")]}]


def is_feedback_click(interaction: discord.Interaction) -> bool:
    """A click on one of Sluice's feedback buttons."""
    return interaction.type == discord.InteractionType.component and _custom_id(
        interaction
    ).startswith(PREFIX + ":")


def _custom_id(interaction: discord.Interaction) -> str:
    """The clicked component's custom id ("" when the interaction has none)."""
    data: Mapping[str, Any] = cast(Mapping[str, Any], interaction.data or {})
    return str(data.get("custom_id", ""))


def vote_of(interaction: discord.Interaction, tenant: str) -> Feedback:
    """The vote a click stands for.

    Raises:
        InputError: the custom id or an id of the interaction is malformed.
    """
    custom_id = _custom_id(interaction)[:120]
    match = _CUSTOM_ID.fullmatch(custom_id)
    if match is None:
        raise InputError("malformed feedback button id")
    return feedback.parse_vote(
        platform=Platform.DISCORD,
        tenant=tenant,
        channel=str(interaction.channel_id),
        user=str(interaction.user.id),
        vote=match.group(1),
        message_id=match.group(2),
    )


async def on_click(
    interaction: discord.Interaction, queue: ArqRedis, settings: Settings, tenant: str
) -> bool:
    """Acknowledge a feedback click (within Discord's 3 s), then queue the vote;
    ``True`` when it was queued."""
    try:
        fb = vote_of(interaction, tenant)
    except InputError as e:
        logger.warning("discord feedback dropped interaction=%s: %s", interaction.id, e)
        await interaction.response.defer()
        return False
    await interaction.response.send_message(THANKS, ephemeral=True)
    try:
        await feedback.enqueue(queue, settings, fb)
    except QueueError as e:
        logger.error("discord feedback lost tenant=%s message=%s: %s", fb.tenant, fb.message_id, e)
        await interaction.edit_original_response(content=NOT_RECORDED)
        return False
    logger.info(
        "discord feedback queued tenant=%s message=%s vote=%s", fb.tenant, fb.message_id, fb.vote
    )
    return True

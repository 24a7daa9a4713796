"""Block Kit for Sluice's answers: the 👍/👎 feedback buttons under each answer.

When a message has blocks, Slack shows the blocks and not its ``text``, so an answer
edited to carry the buttons repeats its text in ``section`` blocks (each at most
:data:`SECTION_LIMIT` characters of ``mrkdwn``) before the buttons. A natively
streamed answer gets the buttons alone, from ``chat.stopStream``'s ``blocks``.
"""

from __future__ import annotations

from typing import Any

from bots.slack.format import split_message

FEEDBACK_ACTION = "sluice_feedback"
"""Action ids are ``sluice_feedback_up`` and ``sluice_feedback_down``."""
SECTION_LIMIT = 3000


def feedback_actions(message_id: str) -> list[dict[str, Any]]:
    """The buttons; each carries the answered message's id as its value."""

    def button(vote: str, emoji: str, label: str) -> dict[str, Any]:
        return {
            "type": "button",
            "action_id": f"{FEEDBACK_ACTION}_{vote}",
            "text": {"type": "plain_text", "text": emoji, "emoji": True},
            "value": message_id,
            "accessibility_label": label,
        }

    return [
        {
            "type": "actions",
            "block_id": FEEDBACK_ACTION,
            "elements": [
                button("up", "👍", "Good answer"),
                button("down", "👎", "Bad answer"),
            ],
        }
    ]


def answer_blocks(mrkdwn: str, message_id: str) -> list[dict[str, Any]]:
    """An answer part (already ``mrkdwn``) as sections, then the feedback buttons."""
    sections = [
        {"type": "section", "text": {"type": "mrkdwn", "text": chunk}}
        for chunk in split_message(mrkdwn, SECTION_LIMIT)
    ]
    return [*sections, *feedback_actions(message_id)]

"""Block Kit for Sluice's answers: the 👍/👎 feedback buttons under each answer.

``markdown_text`` cannot be sent together with ``blocks``, so an answer part that
carries the buttons puts its (already escaped) Markdown into a ``markdown`` block
above them; Slack renders it as it renders ``markdown_text`` (same 12,000-character
limit). A natively streamed answer gets the buttons alone, from
``chat.stopStream``'s ``blocks``.
"""

from __future__ import annotations

from typing import Any

FEEDBACK_ACTION = "sluice_feedback"
"""Action ids are ``sluice_feedback_up`` and ``sluice_feedback_down``."""


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


def answer_blocks(markdown: str, message_id: str) -> list[dict[str, Any]]:
    """An answer part (already escaped Markdown) as a markdown block, then the buttons."""
    return [{"type": "markdown", "text": markdown}, *feedback_actions(message_id)]

"""The per-message context handed to commands, tools, hooks and prompt functions.

A :class:`MessageContext` says who wrote, where, on which platform, whether it is a
direct message, and in which lane the message is answered, so that a bot can behave
differently in DMs, per workspace or per channel::

    @bot.tool
    async def my_tickets(ctx: MessageContext) -> str:
        \"\"\"The open tickets of the person asking.\"\"\"
        return await tickets.open_for(ctx.user)

It never holds platform secrets: the adapter's ``meta`` stays with the responder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.messages import IncomingMessage
from core.traffic.choices import Choices


@dataclass
class MessageContext:
    """Who wrote, where, on which platform; one per message being answered.

    Attributes:
        platform: ``"slack"``, ``"discord"`` or ``"web"``.
        tenant: The workspace (Slack team), guild (Discord) or ``"web"``.
        channel: The channel (or DM channel, or web chat session).
        thread: The thread, or ``None`` when the conversation is the whole channel.
        user: The platform's id of the person who wrote.
        user_name: Their display name when the adapter knows it.
        is_dm: A direct message with the bot (the web chat counts as one).
        lane: The priority lane the message is answered in.
        message_id: The platform's id of the message.
        text: The text being answered; before-hooks may have rewritten it.
        command: The name of the command being run, if any.
        is_admin: The user may change the bot's settings here (``/model``, ``/listen``):
            listed in ``SLUICE_ADMIN_USERS``, or a Discord member with *Manage Server*.
        choices: The per-tenant and per-channel choices (model, listening) when the
            message is answered by a worker, else ``None``.
        state: Scratch space shared by the hooks, the command or tools of one message
            (e.g. a before-hook stores a flag that an after-hook reads).
    """

    platform: str
    tenant: str
    channel: str
    user: str
    message_id: str
    text: str = ""
    thread: str | None = None
    user_name: str | None = None
    is_dm: bool = False
    lane: str = "default"
    command: str | None = None
    is_admin: bool = False
    choices: Choices | None = None
    state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_message(cls, msg: IncomingMessage) -> MessageContext:
        """The context of an accepted message."""
        return cls(
            platform=msg.platform,
            tenant=msg.tenant,
            channel=msg.channel,
            thread=msg.thread,
            user=msg.user,
            user_name=msg.user_name,
            is_dm=msg.is_dm,
            lane=msg.lane,
            message_id=msg.message_id,
            text=msg.text,
            is_admin=msg.meta.get("admin") == "1",
        )

    @property
    def conversation_id(self) -> str:
        """The conversation this message belongs to (same id as the message's)."""
        return f"{self.platform}:{self.tenant}:{self.channel}:{self.thread or '-'}"

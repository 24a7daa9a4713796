"""The platform-neutral message, reply and history types.

Adapters in ``bots/`` turn platform payloads into :class:`IncomingMessage`; workers
turn a :class:`Reply` back into platform calls through a responder. Nothing here
knows about Slack or Discord.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Platform(StrEnum):
    """Where a message came from."""

    WEB = "web"
    SLACK = "slack"
    DISCORD = "discord"


class StoredFile(BaseModel):
    """What history keeps of a file a user sent: a reference, never its bytes.

    ``id`` is the platform's id of the file (a Slack file id, a Discord attachment id);
    ``size`` is the size the platform declared, in bytes.
    """

    model_config = ConfigDict(frozen=True)

    id: str = Field(max_length=255)
    name: str = Field(max_length=1024)
    mimetype: str = Field(default="", max_length=255)
    size: int = Field(default=0, ge=0)


class FileRef(StoredFile):
    """A file attached to an incoming message, as the job payload carries it.

    The worker downloads it from ``url`` (see :mod:`core.files`); the payload never
    carries the bytes. ``url`` is empty when the platform gave none (then the file is
    refused with a notice).
    """

    url: str = Field(default="", max_length=4096)

    def stored(self) -> StoredFile:
        """The reference history keeps (no URL: platform file URLs can be capabilities)."""
        return StoredFile(id=self.id, name=self.name, mimetype=self.mimetype, size=self.size)


class IncomingMessage(BaseModel):
    """One accepted user message, as enqueued for a worker.

    ``tenant`` is the workspace (Slack team), guild (Discord) or ``web``; it scopes
    caches, limits and history. ``thread`` is ``None`` when the conversation is the
    whole channel (a DM, the web chat). ``meta`` carries what the platform's responder
    needs to reply (for example a Slack ``response_url`` or a Discord interaction id);
    it is never logged and never stored in history. ``files`` are references to the
    files the user attached (downloaded by the worker, never carried in the payload).
    """

    model_config = ConfigDict(frozen=True)

    platform: str
    tenant: str
    channel: str
    thread: str | None = None
    user: str
    message_id: str
    text: str
    ts: float = Field(default_factory=time.time)
    user_name: str | None = None
    is_dm: bool = False
    lane: str = "default"
    meta: dict[str, str] = Field(default_factory=dict)
    files: list[FileRef] = Field(default_factory=list)
    # Its place in line, set when it is enqueued (core.traffic.schedule): fair start and the
    # time from which it counts as late, in ms since the epoch, and whether it came over
    # its user's share (served after the late messages).
    fair_ms: int | None = None
    late_at_ms: int | None = None
    over_share: bool = False

    @property
    def conversation_id(self) -> str:
        """One conversation: replies within it are ordered and share context."""
        return f"{self.platform}:{self.tenant}:{self.channel}:{self.thread or '-'}"

    @property
    def job_id(self) -> str:
        """The arq job id: one job per accepted message, so a second enqueue is a no-op."""
        return reply_job_id(self.platform, self.tenant, self.message_id)


def reply_job_id(platform: str, tenant: str, message_id: str) -> str:
    """The reply job id of a message (:attr:`IncomingMessage.job_id`)."""
    return f"reply:{platform}:{tenant}:{message_id}"


ReplyKind = Literal["answer", "notice", "error"]


class Reply(BaseModel):
    """What a worker sends back: an answer, a short notice, or a short apology."""

    model_config = ConfigDict(frozen=True)

    text: str
    kind: ReplyKind = "answer"
    cached: bool = False


Role = Literal["user", "assistant", "system", "tool"]


class Turn(BaseModel):
    """One stored message of a conversation (a user message, an answer, a tool call).

    An assistant turn that asked for tools has ``tool_calls`` (``{id, name,
    arguments}`` each); each result is a ``role="tool"`` turn with ``tool_call_id``
    and ``tool_name``. A user turn lists the files the user attached in ``files``
    (references only: name, type, size, platform id).
    """

    model_config = ConfigDict(frozen=True)

    role: Role
    text: str
    message_id: str
    ts: float = Field(default_factory=time.time)
    user: str | None = None
    model: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: int = 0
    lane: str = "default"
    cached: bool = False
    # Tool calling: an assistant turn that asked for tools, and each tool's result.
    tool_calls: list[dict[str, str]] | None = None
    tool_call_id: str | None = None
    tool_name: str | None = None
    files: list[StoredFile] | None = None


QUEUED_PREFIX = "⏳ Queued"


def queued_text(wait_s: float, place: int | None = None) -> str:
    """The notice a chat platform shows while a message waits in line.

    Seconds under 90 s, whole minutes above: "⏳ Queued: about 40 s", "… about 3 min";
    with the place in line: "⏳ Queued: #37 in line, about 40 s".
    Responders recognise a message still showing it by :data:`QUEUED_PREFIX`.
    """
    where = f" #{place:,} in line," if place is not None and place > 0 else ""
    if wait_s < 89.5:
        return f"{QUEUED_PREFIX}:{where} about {max(1, round(wait_s))} s"
    return f"{QUEUED_PREFIX}:{where} about {max(2, round(wait_s / 60))} min"


Vote = Literal["up", "down"]


class Feedback(BaseModel):
    """A 👍/👎 vote of one user on one answer (``@bot.on_feedback`` receives it).

    ``message_id`` is the id of the message the answer replied to (the answer is
    stored in history as ``<message_id>:answer``). ``previous`` is the user's earlier
    vote on the same answer, if they changed it; a user has one vote per answer.
    """

    model_config = ConfigDict(frozen=True)

    platform: str
    tenant: str
    channel: str
    message_id: str
    user: str
    vote: Vote
    ts: float = Field(default_factory=time.time)
    previous: Vote | None = None


class ThreadMessage(BaseModel):
    """One earlier message of a thread, as read from the platform for context.

    ``text`` is plain text with the platform's markup made inert (mentions become
    ``@name`` text); ``author`` is the platform's user id; ``is_bot`` marks a bot's
    message (this one's or another's).
    """

    model_config = ConfigDict(frozen=True)

    author: str
    text: str
    ts: float
    is_bot: bool = False


class FetchedThread(BaseModel):
    """What a platform returned for a thread: its earlier messages, oldest first.

    ``total`` is how many earlier messages the thread has, when the platform says
    (else how many were read); ``complete`` is ``False`` when reading stopped at
    ``SLUICE_THREAD_CONTEXT_FETCH_MAX`` with more left.
    """

    messages: list[ThreadMessage]
    total: int
    complete: bool = True

"""The tool-calling loop and the conversion of stored turns into model messages.

:func:`run_tool_loop` calls the model; while it asks for tools (and the bot has
some), the tools run (concurrently, each bounded in time) and their results go back
to the model. It is bounded twice:

- ``max_steps`` rounds of tool calls (``SLUICE_TOOL_MAX_STEPS``);
- ``timeout_s`` for all tool runs of one message (``SLUICE_TOOL_TIMEOUT_S``).

When either bound is reached, the model is called once more with
``tool_choice="none"`` and must answer with what it has; calls it asked for but that
were not run get an error result saying why. The model is reached only through the
``call`` function the worker passes in, so retries, budgets and caches around each
model call stay in one place. ``on_tool``, if given, hears each call start and end
(:class:`ToolProgress`), e.g. to show it on the platform while the answer streams.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.framework.context import MessageContext
from core.framework.tools import Tool, run_tool_call
from core.llm.client import ChatMessage, Completion
from core.messages import Turn

logger = logging.getLogger(__name__)

CallModel = Callable[[list[ChatMessage], dict[str, Any]], Awaitable[Completion]]


@dataclass(frozen=True)
class ToolProgress:
    """A tool call starting or ending, for ``run_tool_loop(on_tool=...)``.

    Attributes:
        call_id: The model's id of the call (unique within the answer).
        name: The tool's name as the model called it.
        status: ``in_progress`` when it starts, then ``complete`` or ``error``.
    """

    call_id: str
    name: str
    status: str


OnTool = Callable[[ToolProgress], Awaitable[None]]


async def _tell(on_tool: OnTool | None, progress: list[ToolProgress]) -> None:
    """Pass progress to ``on_tool``; showing progress never stops the answer."""
    if on_tool is None:
        return
    for p in progress:
        try:
            await on_tool(p)
        except Exception:
            logger.warning("tool progress not shown call=%s", p.call_id, exc_info=True)


@dataclass
class ToolLoopResult:
    """The final completion (tokens summed over every step) and the turns to store."""

    completion: Completion
    turns: list[Turn] = field(default_factory=list)
    steps: int = 0


@dataclass
class Exchange:
    """What a reply job keeps for history besides the user's message and the answer.

    Attributes:
        turns: Tool-call turns made while answering, in order.
    """

    turns: list[Turn] = field(default_factory=list)


def history_messages(turns: Sequence[Turn]) -> list[ChatMessage]:
    """Stored turns as Chat Completions messages.

    Tool calls are sent back only as whole groups (the assistant turn that asked and a
    result for each call), because the API rejects a tool result without its call; a
    group cut by the context window is left out, as are turns stored without their
    tool data. A user turn's attached files are named, not sent again.
    """
    out: list[ChatMessage] = []
    i = 0
    while i < len(turns):
        turn = turns[i]
        if turn.role == "assistant" and turn.tool_calls:
            j = i + 1
            results: list[Turn] = []
            while j < len(turns) and turns[j].role == "tool":
                results.append(turns[j])
                j += 1
            wanted = {c.get("id") for c in turn.tool_calls}
            if wanted == {r.tool_call_id for r in results} and len(results) == len(wanted):
                out.append(assistant_tool_message(turn.text, turn.tool_calls))
                out.extend(
                    {"role": "tool", "tool_call_id": r.tool_call_id, "content": r.text}
                    for r in results
                )
            i = j
            continue
        if turn.role == "user":
            out.append({"role": "user", "content": turn.text + _attached_note(turn)})
        elif turn.role == "assistant" and turn.text:
            out.append({"role": "assistant", "content": turn.text})
        i += 1
    return out


def _attached_note(turn: Turn) -> str:
    """An earlier user turn's files, by name: their content is not sent again."""
    if not turn.files:
        return ""
    names = ", ".join(f"{f.name} ({f.mimetype or 'file'})" for f in turn.files)
    return f"\n[Attached earlier: {names}]"


def assistant_tool_message(text: str, calls: Sequence[dict[str, Any]]) -> ChatMessage:
    """The assistant message that asked for ``calls``, as the API expects it back."""
    return {
        "role": "assistant",
        "content": text or None,
        "tool_calls": [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": c.get("arguments") or "{}"},
            }
            for c in calls
        ],
    }


async def run_tool_loop(
    call: CallModel,
    messages: Sequence[ChatMessage],
    tools: dict[str, Tool],
    ctx: MessageContext,
    *,
    max_steps: int,
    timeout_s: float,
    call_timeout_s: float,
    max_result_chars: int,
    on_tool: OnTool | None = None,
) -> ToolLoopResult:
    """Answer ``messages``, running the tools the model asks for (see the module docstring).

    Raises:
        LLMError: from ``call``; tool failures never raise.
    """
    sent = list(messages)
    schemas = [t.openai_schema() for t in tools.values()]
    deadline = time.monotonic() + timeout_s
    result = ToolLoopResult(completion=Completion(text="", model=""))
    tokens_in = tokens_out = 0
    while True:
        extra: dict[str, Any] = {}
        final = False
        if schemas:
            extra["tools"] = schemas
            if result.steps >= max_steps or time.monotonic() >= deadline:
                extra["tool_choice"] = "none"
                final = True
        completion = await call(sent, extra)
        tokens_in += completion.tokens_in
        tokens_out += completion.tokens_out
        if not completion.tool_calls or not schemas or final:
            completion.tokens_in, completion.tokens_out = tokens_in, tokens_out
            completion.tool_calls = []
            result.completion = completion
            return result
        result.steps += 1
        calls = completion.tool_calls
        sent.append(assistant_tool_message(completion.text, calls))
        result.turns.append(
            Turn(
                role="assistant",
                text=completion.text,
                message_id=f"{ctx.message_id}:step{result.steps}",
                # Tool turns carry their user, as answers do, so a purge finds them.
                user=ctx.user,
                model=completion.model,
                tokens_in=completion.tokens_in,
                tokens_out=completion.tokens_out,
                lane=ctx.lane,
                tool_calls=[
                    {"id": c["id"], "name": c["name"], "arguments": c.get("arguments") or "{}"}
                    for c in calls
                ],
            )
        )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            outputs = [
                (json.dumps({"error": "not run: the time allowed for tools is used up"}), False)
                for _ in calls
            ]
        else:
            await _tell(on_tool, [ToolProgress(c["id"], c["name"], "in_progress") for c in calls])
            outputs = list(
                await asyncio.gather(
                    *(
                        run_tool_call(
                            tools, ctx, c, min(call_timeout_s, remaining), max_result_chars
                        )
                        for c in calls
                    )
                )
            )
        await _tell(
            on_tool,
            [
                ToolProgress(c["id"], c["name"], "complete" if ok else "error")
                for c, (_text, ok) in zip(calls, outputs, strict=True)
            ],
        )
        for c, (text, _ok) in zip(calls, outputs, strict=True):
            sent.append({"role": "tool", "tool_call_id": c["id"], "content": text})
            result.turns.append(
                Turn(
                    role="tool",
                    text=text,
                    message_id=f"{ctx.message_id}:tool:{c['id']}",
                    user=ctx.user,
                    lane=ctx.lane,
                    tool_call_id=c["id"],
                    tool_name=c["name"],
                )
            )

"""The tool loop's bounds and the way stored tool turns go back to the model.

The loop reaches the model only through the ``call`` function the worker gives it;
here that function is a short script of completions, which is how the step and time
bounds can be driven (the simulator asks for tools once per user message).
"""

from __future__ import annotations

import asyncio
from typing import Any

from core.framework.agent import ToolProgress, history_messages, run_tool_loop
from core.framework.bot import Bot, MessageContext
from core.llm.client import ChatMessage, Completion
from core.messages import Turn


def _ctx() -> MessageContext:
    return MessageContext(platform="web", tenant="web", channel="c", user="u", message_id="m")


def _bot() -> Bot:
    bot = Bot()

    @bot.tool
    async def count(n: int) -> int:
        """Count."""
        return n + 1

    @bot.tool
    async def nap(seconds: float) -> str:
        """Sleep."""
        await asyncio.sleep(seconds)
        return "rested"

    return bot


class Script:
    """Answers every call with a tool call until told otherwise; records what it was sent."""

    def __init__(self, tool: str, arguments: str) -> None:
        self.tool, self.arguments = tool, arguments
        self.calls: list[tuple[list[ChatMessage], dict[str, Any]]] = []

    async def __call__(self, messages: list[ChatMessage], extra: dict[str, Any]) -> Completion:
        self.calls.append((list(messages), dict(extra)))
        if extra.get("tool_choice") == "none":
            return Completion(text="final answer", model="m", tokens_in=10, tokens_out=2)
        call = {"id": f"call{len(self.calls)}", "name": self.tool, "arguments": self.arguments}
        return Completion(text="", model="m", tokens_in=10, tokens_out=1, tool_calls=[call])


async def test_steps_are_bounded_and_the_model_must_then_answer():
    script = Script("count", '{"n": 1}')
    result = await run_tool_loop(
        script,
        [{"role": "user", "content": "go"}],
        _bot().tools,
        _ctx(),
        max_steps=3,
        timeout_s=30,
        call_timeout_s=5,
        max_result_chars=1000,
    )
    assert len(script.calls) == 4
    assert [c[1].get("tool_choice") for c in script.calls] == [None, None, None, "none"]
    assert result.completion.text == "final answer"
    assert (result.completion.tokens_in, result.completion.tokens_out) == (40, 5)
    assert [t.role for t in result.turns] == ["assistant", "tool"] * 3
    assert result.turns[1].text == "2" and result.turns[1].tool_name == "count"
    # What was sent last is a valid conversation: each call followed by its result.
    roles = [m["role"] for m in script.calls[-1][0]]
    assert roles == ["user"] + ["assistant", "tool"] * 3


async def test_time_for_tools_is_bounded():
    script = Script("nap", '{"seconds": 5}')
    started = asyncio.get_running_loop().time()
    result = await run_tool_loop(
        script,
        [{"role": "user", "content": "go"}],
        _bot().tools,
        _ctx(),
        max_steps=10,
        timeout_s=0.3,
        call_timeout_s=5,
        max_result_chars=1000,
    )
    assert asyncio.get_running_loop().time() - started < 2
    assert result.completion.text == "final answer"
    assert "did not finish within 0.3 s" in result.turns[1].text
    assert script.calls[-1][1]["tool_choice"] == "none"


async def test_unknown_tool_is_an_error_result_for_the_model():
    script = Script("nope", "{}")
    result = await run_tool_loop(
        script,
        [{"role": "user", "content": "go"}],
        _bot().tools,
        _ctx(),
        max_steps=1,
        timeout_s=5,
        call_timeout_s=5,
        max_result_chars=1000,
    )
    assert "there is no tool named 'nope' (tools: count, nap)" in result.turns[1].text


async def test_without_tools_the_model_is_called_once_without_tool_fields():
    script = Script("count", "{}")
    result = await run_tool_loop(
        script,
        [{"role": "user", "content": "go"}],
        {},
        _ctx(),
        max_steps=3,
        timeout_s=5,
        call_timeout_s=5,
        max_result_chars=1000,
    )
    assert script.calls[0][1] == {} and len(script.calls) == 1
    assert result.turns == [] and result.completion.tool_calls == []


def test_stored_tool_turns_go_back_only_as_whole_groups():
    call = {"id": "c1", "name": "count", "arguments": "{}"}
    turns = [
        Turn(role="tool", text="orphan", message_id="x", tool_call_id="c0"),
        Turn(role="user", text="q1", message_id="1"),
        Turn(role="assistant", text="", message_id="1:s", tool_calls=[call]),
        Turn(role="tool", text="2", message_id="1:t", tool_call_id="c1", tool_name="count"),
        Turn(role="assistant", text="a1", message_id="1:a"),
        Turn(role="user", text="q2", message_id="2"),
        Turn(role="assistant", text="", message_id="2:s", tool_calls=[{**call, "id": "c2"}]),
    ]
    messages = history_messages(turns)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "user"]
    assert messages[1]["tool_calls"][0]["id"] == "c1"
    assert messages[2] == {"role": "tool", "tool_call_id": "c1", "content": "2"}


async def test_on_tool_hears_each_call_start_and_end_and_cannot_stop_the_answer():
    heard: list[ToolProgress] = []

    async def on_tool(progress: ToolProgress) -> None:
        heard.append(progress)
        if progress.status != "in_progress":
            raise RuntimeError("the platform refused the update")

    script = Script("count", '{"n": 1}')
    result = await run_tool_loop(
        script,
        [{"role": "user", "content": "go"}],
        _bot().tools,
        _ctx(),
        max_steps=1,
        timeout_s=30,
        call_timeout_s=5,
        max_result_chars=1000,
        on_tool=on_tool,
    )
    assert result.completion.text == "final answer"
    assert heard == [
        ToolProgress("call1", "count", "in_progress"),
        ToolProgress("call1", "count", "complete"),
    ]
    failing = Script("nope", "{}")
    heard.clear()
    await run_tool_loop(
        failing,
        [{"role": "user", "content": "go"}],
        _bot().tools,
        _ctx(),
        max_steps=1,
        timeout_s=30,
        call_timeout_s=5,
        max_result_chars=1000,
        on_tool=on_tool,
    )
    assert [p.status for p in heard] == ["in_progress", "error"]

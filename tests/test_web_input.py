"""The web endpoints refuse bad input with a clear 4xx and enqueue nothing."""

from __future__ import annotations

import aiohttp
import pytest

from tests.webchat import web_adapter


async def _queued(redis, settings) -> int:
    return int(await redis.zcard(settings.queue_name))


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe{}", 400, "not valid UTF-8"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"session": "s1", "text": ""}', 400, "empty"),
        (b'{"session": "s1", "text": " \\n\\t "}', 400, "empty"),
        (b'{"session": "s1", "text": 5}', 400, "'text'"),
        (b'{"session": "../etc", "text": "hi"}', 400, "'session'"),
        (b'{"text": "hi"}', 400, "'session'"),
        (b'{"session": "s1", "text": "\\ud800"}', 400, "invalid Unicode"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "JSON"),
    ],
)
async def test_bad_input_gets_a_clear_400_and_no_job(settings, body, status, needle):
    async with web_adapter(settings) as (base, redis), aiohttp.ClientSession() as http:
        async with http.post(
            f"{base}/api/messages", data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == status
            assert needle in (await resp.json())["error"]
        assert await _queued(redis, settings) == 0


async def test_body_over_the_limit_gets_413(settings):
    small = settings.model_copy(update={"max_body_bytes": 2048})
    async with web_adapter(small) as (base, redis), aiohttp.ClientSession() as http:
        body = {"session": "s1", "text": "y" * 5000}
        async with http.post(f"{base}/api/messages", json=body) as resp:
            assert resp.status == 413
            assert "limit" in (await resp.json())["error"]
        assert await _queued(redis, small) == 0


async def test_odd_unicode_is_accepted_and_enqueued(settings):
    text = "zero\u200bwidth \u202eRTL\u202c emoji 🧪 and ctrl \x07 chars"
    async with web_adapter(settings) as (base, redis), aiohttp.ClientSession() as http:
        async with http.post(f"{base}/api/messages", json={"session": "s1", "text": text}) as resp:
            assert resp.status == 202
        assert await _queued(redis, settings) == 1


async def test_healthz_reports_ok(settings):
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
            assert (await resp.json())["ok"] is True


async def test_page_is_served(settings):
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with http.get(base + "/") as resp:
            assert resp.status == 200
            assert "Sluice web chat" in await resp.text()


async def test_a_resend_with_the_same_id_is_not_a_second_message(settings):
    body = {"session": "s1", "text": "once please", "id": "abcdef0123456789"}
    async with web_adapter(settings) as (base, redis), aiohttp.ClientSession() as http:
        for expected_duplicate in (False, True, True):
            async with http.post(f"{base}/api/messages", json=body) as resp:
                assert resp.status == 202
                assert (await resp.json()).get("duplicate", False) is expected_duplicate
        assert await _queued(redis, settings) == 1


async def test_a_malformed_id_is_refused(settings):
    async with web_adapter(settings) as (base, redis), aiohttp.ClientSession() as http:
        body = {"session": "s1", "text": "hi", "id": "../../x"}
        async with http.post(f"{base}/api/messages", json=body) as resp:
            assert resp.status == 400
            assert "'id'" in (await resp.json())["error"]
        assert await _queued(redis, settings) == 0


async def test_the_202_names_the_lane_the_bots_rules_chose(settings, monkeypatch):
    monkeypatch.setenv("BENCH_BULK_USERS", "heavy1")
    app = settings.model_copy(update={"app": "sluice.bench.bot:make_bot"})
    sent = [("s1", "my billing is wrong"), ("s1", "hello"), ("heavy1", "hello again")]
    async with web_adapter(app) as (base, _), aiohttp.ClientSession() as http:
        lanes = []
        for session, text in sent:
            async with http.post(
                f"{base}/api/messages", json={"session": session, "text": text}
            ) as resp:
                assert resp.status == 202
                lanes.append((await resp.json())["lane"])
    assert lanes == ["high", "default", "bulk"]

"""The web endpoints refuse bad input with a clear 4xx and enqueue nothing."""

from __future__ import annotations

import aiohttp
import pytest

from tests.webchat import open_session, web_adapter


async def _queued(redis, settings) -> int:
    return int(await redis.zcard(settings.queue_name))


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe{}", 400, "not valid UTF-8"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"text": ""}', 400, "empty"),
        (b'{"text": " \\n\\t "}', 400, "empty"),
        (b'{"text": 5}', 400, "'text'"),
        (b'{"session": "../etc", "text": "hi"}', 403, "'session'"),
        (b'{"session": 7, "text": "hi"}', 403, "'session'"),
        (b'{"text": "\\ud800"}', 400, "invalid Unicode"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "JSON"),
    ],
)
async def test_bad_input_gets_a_clear_4xx_and_no_job(settings, body, status, needle):
    async with web_adapter(settings) as (base, redis), aiohttp.ClientSession() as http:
        session = await open_session(http, base)
        headers = {"Content-Type": "application/json", **session.headers()}
        async with http.post(f"{base}/api/messages", data=body, headers=headers) as resp:
            assert resp.status == status
            assert needle in (await resp.json())["error"]
        assert await _queued(redis, settings) == 0


async def test_body_over_the_limit_gets_413(settings):
    small = settings.model_copy(update={"max_body_bytes": 2048})
    async with web_adapter(small) as (base, redis), aiohttp.ClientSession() as http:
        session = await open_session(http, base)
        body = {"text": "y" * 5000}
        async with http.post(f"{base}/api/messages", json=body, headers=session.headers()) as resp:
            assert resp.status == 413
            assert "limit" in (await resp.json())["error"]
        assert await _queued(redis, small) == 0


async def test_odd_unicode_is_accepted_and_enqueued(settings):
    text = "zero\u200bwidth \u202eRTL\u202c emoji 🧪 and ctrl \x07 chars"
    async with web_adapter(settings) as (base, redis), aiohttp.ClientSession() as http:
        session = await open_session(http, base)
        async with http.post(
            f"{base}/api/messages", json={"text": text}, headers=session.headers()
        ) as resp:
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
    body = {"text": "once please", "id": "abcdef0123456789"}
    async with web_adapter(settings) as (base, redis), aiohttp.ClientSession() as http:
        session = await open_session(http, base)
        for expected_duplicate in (False, True, True):
            async with http.post(
                f"{base}/api/messages", json=body, headers=session.headers()
            ) as resp:
                assert resp.status == 202
                assert (await resp.json()).get("duplicate", False) is expected_duplicate
        assert await _queued(redis, settings) == 1


async def test_a_malformed_id_is_refused(settings):
    async with web_adapter(settings) as (base, redis), aiohttp.ClientSession() as http:
        session = await open_session(http, base)
        body = {"text": "hi", "id": "../../x"}
        async with http.post(f"{base}/api/messages", json=body, headers=session.headers()) as resp:
            assert resp.status == 400
            assert "'id'" in (await resp.json())["error"]
        assert await _queued(redis, settings) == 0


async def test_the_202_names_the_lane_the_bots_rules_chose(settings, monkeypatch):
    # The bench's sign-in hook names the user, so its bulk users are known in advance.
    monkeypatch.setenv("BENCH_BULK_USERS", "web:heavy1")
    app = settings.model_copy(
        update={"app": "sluice.bench.bot:make_bot", "web_auth": "sluice.bench.bot:bench_user"}
    )
    sent = [("u1", "my billing is wrong"), ("u1", "hello"), ("heavy1", "hello again")]
    async with web_adapter(app) as (base, _), aiohttp.ClientSession() as http:
        lanes = []
        for user, text in sent:
            who = {"X-Bench-User": user}
            session = await open_session(http, base, headers=who)
            assert session.user == f"web:{user}"
            async with http.post(
                f"{base}/api/messages",
                json={"text": text},
                headers={**who, **session.headers()},
            ) as resp:
                assert resp.status == 202
                lanes.append((await resp.json())["lane"])
    assert lanes == ["high", "default", "bulk"]

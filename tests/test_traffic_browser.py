"""Headless Chromium shows a queued message's expected wait, then replaces it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from redis.asyncio import Redis

from bots.web.responder import publish
from core.infra.redis import Keys
from tests.test_browser import _driver, pytestmark  # noqa: F401 - same skip rules


def _read_bubble(driver, timeout_s: float, want: str) -> str:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        bots = driver.find_elements(By.CSS_SELECTOR, ".msg.bot")
        if bots and want in bots[-1].text:
            return str(bots[-1].text)
        time.sleep(0.02)
    raise AssertionError(f"{want!r} not shown; page: {driver.page_source[-1500:]}")


async def test_page_shows_queued_wait_and_replaces_it_with_the_answer(
    settings, redis: Redis, tmp_path: Path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.webchat import web_adapter

    keys = Keys(settings.key_prefix)
    async with web_adapter(settings) as (base, _):
        driver = await asyncio.to_thread(_driver, tmp_path)
        try:
            await asyncio.to_thread(driver.get, base)
            who = await asyncio.to_thread(
                WebDriverWait(driver, 30).until,
                ec.text_to_be_present_in_element((By.ID, "who"), "session "),
            )
            assert who
            session = driver.find_element(By.ID, "who").text.removeprefix("session ").strip()
            # Let the page's event stream connect, then play what a worker sends.
            await asyncio.sleep(0.5)
            for event in (
                {"type": "user", "message_id": "m1", "text": "hello"},
                {"type": "start", "message_id": "m1"},
                {"type": "queued", "message_id": "m1", "wait_s": 40},
            ):
                await publish(redis, keys, session, event)
            queued = await asyncio.to_thread(_read_bubble, driver, 10, "Queued")
            assert queued.startswith("Queued, about 40 s")
            # A refreshed estimate with the place in line replaces it.
            refresh = {"type": "queued", "message_id": "m1", "wait_s": 25, "place": 3}
            await publish(redis, keys, session, refresh)
            queued = await asyncio.to_thread(_read_bubble, driver, 10, "#3 in line")
            assert queued.startswith("Queued, #3 in line, about 25 s")
            await publish(redis, keys, session, {"type": "delta", "message_id": "m1", "text": "Hi"})
            streamed = await asyncio.to_thread(_read_bubble, driver, 10, "Hi")
            assert streamed == "Hi", "the queued text is replaced, not appended to"
            # A refresh that arrives after the answer started is ignored.
            late = {"type": "queued", "message_id": "m1", "wait_s": 10, "place": 1}
            await publish(redis, keys, session, late)
            more = {"type": "delta", "message_id": "m1", "text": " there"}
            await publish(redis, keys, session, more)
            streamed = await asyncio.to_thread(_read_bubble, driver, 10, "there")
            assert streamed == "Hi there", streamed
            await publish(
                redis,
                keys,
                session,
                {"type": "done", "message_id": "m1", "text": "Hi there!", "kind": "answer"},
            )
            assert await asyncio.to_thread(_read_bubble, driver, 10, "Hi there!") == "Hi there!"
        finally:
            await asyncio.to_thread(driver.quit)

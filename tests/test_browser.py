"""Headless Chromium opens the web chat, sends a message and sees the streamed reply."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from tests.webchat import web_adapter

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason="headless Chromium not installed (apt-get install chromium chromium-driver)",
    ),
]


def _driver(tmp_path: Path):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chrome'}",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _chat(base: str, tmp_path: Path, token: str | None = None) -> tuple[str, list[str], str]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _driver(tmp_path)
    try:
        driver.get(base)
        wait = WebDriverWait(driver, 30)
        if token is not None:
            # The page asks for the access token before it opens a session.
            field = wait.until(ec.visibility_of_element_located((By.ID, "token")))
            field.send_keys(token)
            driver.find_element(By.ID, "signin").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "who"), "session "))
        box = wait.until(ec.element_to_be_clickable((By.ID, "text")))
        box.send_keys("Hello from Chromium")
        driver.find_element(By.ID, "send").click()
        seen: list[str] = []
        deadline = time.monotonic() + 30
        done = None
        while time.monotonic() < deadline and done is None:
            bots = driver.find_elements(By.CSS_SELECTOR, ".msg.bot")
            if bots:
                seen.append(bots[-1].text)
                if bots[-1].get_attribute("data-done") == "1":
                    done = bots[-1].text
            time.sleep(0.02)
        user = driver.find_element(By.CSS_SELECTOR, ".msg.user").text
        driver.save_screenshot(str(tmp_path / "chat.png"))
        assert done is not None, f"no reply shown; page text: {driver.page_source[-2000:]}"
        return user, seen, done
    finally:
        driver.quit()


async def test_chromium_sends_a_message_and_sees_the_reply(
    settings, llm_sim, worker_process, tmp_path
):
    llm_sim.configure(tokens=30, token_latency_s=0.03)
    worker_process({"SLUICE_STREAM_MIN_INTERVAL_S": "0.05"})
    async with web_adapter(settings) as (base, _):
        user, seen, done = await asyncio.to_thread(_chat, base, tmp_path)
    assert user == "Hello from Chromium"
    assert done.startswith("Echo: Hello from Chromium")
    partial = {s for s in seen if s and s != done}
    assert partial, "the page should show the reply growing before it is complete"


async def test_chromium_signs_in_with_the_access_token_then_chats(
    settings, llm_sim, worker_process, tmp_path
):
    from pydantic import SecretStr

    token = "browser-token-0123456789"
    llm_sim.configure(tokens=10, token_latency_s=0.02)
    worker_process({"SLUICE_STREAM_MIN_INTERVAL_S": "0.05"})
    guarded = settings.model_copy(update={"web_token": SecretStr(token)})
    async with web_adapter(guarded) as (base, _):
        user, _seen, done = await asyncio.to_thread(_chat, base, tmp_path, token)
    assert user == "Hello from Chromium"
    assert done.startswith("Echo: Hello from Chromium")

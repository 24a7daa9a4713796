"""Headless Chromium: HTML the model writes, even cut across streamed chunks, stays text.

The simulator streams a scripted answer whose tags are cut between chunks; the page
must show it as text (no element created, no script run) while it streams and when
it is done (the web chat's side of "markup stays inert").
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.test_browser import CHROMEDRIVER, CHROMIUM, _driver, pytestmark  # noqa: F401
from tests.webchat import web_adapter

PIECES = [
    "Echo: <img src=x oner",
    "ror=\"document.title='pwned'\"> <",
    "b>bold</b> <scr",
    "ipt>document.title='pwned'</script> &amp; <!here>",
]


def _chat(base: str, tmp_path: Path) -> tuple[str, str, int]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _driver(tmp_path)
    try:
        driver.get(base)
        wait = WebDriverWait(driver, 30)
        box = wait.until(ec.element_to_be_clickable((By.ID, "text")))
        box.send_keys("show me markup")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.bot[data-done='1']"))
        done = driver.find_element(By.CSS_SELECTOR, ".msg.bot[data-done='1']")
        created = len(driver.find_elements(By.CSS_SELECTOR, "#log img, #log b, #log script"))
        return done.get_attribute("textContent") or "", driver.title, created
    finally:
        driver.quit()


async def test_markup_cut_across_chunks_is_shown_as_text(
    settings, llm_sim, worker_process, tmp_path
):
    llm_sim.configure(script=PIECES, token_latency_s=0.1)
    worker_process({"SLUICE_STREAM_MIN_INTERVAL_S": "0"})
    async with web_adapter(settings) as (base, _):
        text, title, created = await asyncio.to_thread(_chat, base, tmp_path)
    assert text == "".join(PIECES), text
    assert "pwned" not in title
    assert created == 0

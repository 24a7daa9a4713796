"""``sluice status --watch``: a live screen that refreshes until stopped."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from core.messages import IncomingMessage
from core.settings import Settings
from core.traffic.queue import connect_queue, enqueue_reply
from sluice.status import watch
from tests.helpers import ROOT, Proc, base_env, settings_env, wait_until

TITLE = "sluice status"


async def test_watch_redraws_in_place_on_a_terminal_and_follows_the_queue(
    settings: Settings,
) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    drawn = await watch(settings, interval_s=0.05, console=console, refreshes=2)
    assert drawn == 2
    screen = out.getvalue()
    # Two refreshes (Live draws the last one once more as it stops), each one after the
    # first drawn over the one before: the cursor goes back up and erases the lines.
    assert screen.count(TITLE) >= 2
    assert "\x1b[1A" in screen and "\x1b[2K" in screen
    assert "lane default" in screen and "0 waiting" in screen

    queue = await connect_queue(settings)
    try:
        msg = IncomingMessage(
            platform="web", tenant="t", channel="c", user="u", message_id="m1", text="hi"
        )
        await enqueue_reply(queue, settings, msg)
    finally:
        await queue.aclose()
    out.truncate(0)
    await watch(settings, interval_s=0.05, console=console, refreshes=1)
    assert "1 waiting" in out.getvalue()


async def test_status_watch_command_refreshes_until_interrupted(
    settings: Settings, tmp_path: Path
) -> None:
    env = {**base_env(), **settings_env(settings), "COLUMNS": "160"}
    proc = Proc(["status", "--watch", "--interval", "0.2"], env, tmp_path / "status.log")
    try:
        # Into a file, each refresh is printed after the last: wait for three.
        await wait_until(lambda: proc.output().count(TITLE) >= 3, 60, "three refreshes")
        stamps = re.findall(r"(\d\d:\d\d:\d\d) UTC", proc.output())
        assert len(stamps) >= 3
        assert proc.alive()
        proc.kill(signal.SIGINT)
        await wait_until(lambda: not proc.alive(), 30, "the watch to stop on Ctrl+C")
    finally:
        code = proc.stop()
    output = proc.log_path.read_text("utf-8")
    assert code == 0, output[-2000:]
    assert "Traceback" not in output


def test_watch_and_json_together_are_refused(settings: Settings) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sluice", "status", "--watch", "--json"],
        env={**base_env(), **settings_env(settings)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--watch and --json" in done.stderr

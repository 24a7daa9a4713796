"""A SIGTERM sent the moment a process says it is up stops it gracefully (exit 0).

Kubernetes, systemd and the tests all send SIGTERM as soon as they like; a process
that installs its handler only after its "ready" line dies with -15 in that gap,
skipping its drain.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings
from tests.helpers import Proc, base_env, free_port, settings_env

READY = {
    "web": ("web chat on http://",),
    "worker": ("worker ready:",),
}


@pytest.mark.parametrize("command", sorted(READY))
def test_a_sigterm_right_after_the_ready_line_is_a_graceful_stop(
    command: str, settings: Settings, tmp_path: Path
) -> None:
    env = {**base_env(), **settings_env(settings)}
    args = [command] + (["--port", str(free_port())] if command == "web" else [])
    proc = Proc(args, env, tmp_path / f"{command}.log")
    try:
        for needle in READY[command]:
            proc.wait_for_output(needle, timeout_s=60)
    finally:
        code = proc.stop()
    assert code == 0, proc.output()[-3000:]

"""`sluice dev` starts quietly: its banner comes first, without Alembic's plugin lines."""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings
from tests.helpers import Proc, base_env, free_port, settings_env


def test_sluice_dev_prints_its_banner_without_alembic_noise(
    settings: Settings, tmp_path: Path
) -> None:
    env = {**base_env(), **settings_env(settings)}
    # A fresh SQLite file: dev creates the schema at start-up, the noisy part.
    env["DATABASE_URL"] = f"sqlite:///{tmp_path}/fresh.db"
    proc = Proc(["dev", "--port", str(free_port())], env, tmp_path / "dev.log")
    try:
        proc.wait_for_output("Open http://", timeout_s=60)
        lines = proc.output().splitlines()
    finally:
        assert proc.stop() == 0
    before_banner = lines[: lines.index("Sluice dev")]
    assert not [line for line in before_banner if "alembic" in line], before_banner
    # What is left says what happened, in a line or two.
    assert any("created the history schema" in line for line in before_banner), before_banner
    assert len(before_banner) <= 3, before_banner

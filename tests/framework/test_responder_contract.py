"""The Responder protocol is complete: optional methods have no-op defaults, and the
worker calls them on every responder without probing for them."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from bots.discord.responder import DiscordResponder
from bots.slack.responder import SlackResponder
from bots.web.responder import WebResponder
from core.messages import IncomingMessage, Reply
from core.responder import Responder
from tests.helpers import ROOT
from workers.jobs import _withdraw_queued
from workers.traffic_jobs import show_queued

PROBE = re.compile(r"""(getattr|hasattr)\(.*["'](begin|stream|finish|queued|withdraw_queued)["']""")


class MinimalResponder(Responder):
    """Implements only the required methods."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    async def begin(self) -> None:
        self.calls.append("begin")

    async def stream(self, text: str) -> None:
        self.calls.append(f"stream:{text}")

    async def finish(self, reply: Reply) -> None:
        self.calls.append(f"finish:{reply.text}")


class MinimalFactory:
    platform = "web"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.made: list[str] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def responder(self, msg: IncomingMessage, job_id: str) -> Responder:
        self.made.append(job_id)
        return MinimalResponder(self.calls)


def _msg() -> IncomingMessage:
    return IncomingMessage(
        platform="web", tenant="t", channel="c", user="u", message_id="m1", text="hi"
    )


def test_platform_responders_inherit_the_protocol_and_implement_the_optional_methods():
    for cls in (WebResponder, SlackResponder, DiscordResponder):
        assert Responder in cls.__mro__, cls
        # Every platform shows and withdraws queued notices: its own code, not the no-op.
        assert cls.queued is not Responder.queued, cls
        assert cls.withdraw_queued is not Responder.withdraw_queued, cls


async def test_a_responder_without_queued_notices_gets_the_no_op_defaults_through_the_worker():
    factory = MinimalFactory()
    ctx: dict[str, Any] = {"responders": {"web": factory}, "responders_lock": asyncio.Lock()}
    msg = _msg()
    await show_queued(ctx, msg, 12.0, 3)
    await _withdraw_queued(ctx, msg, "job-1")
    # The worker asked for a responder each time and called the defaults: nothing shown.
    assert factory.made == [msg.job_id, "job-1"]
    assert factory.calls == []
    responder = MinimalResponder([])
    assert await responder.queued(5.0) is None
    assert await responder.withdraw_queued() is None


@pytest.mark.parametrize("path", ["core", "workers"])
def test_no_caller_probes_a_responder_with_getattr(path: str):
    probes = []
    for file in (ROOT / path).rglob("*.py"):
        for n, line in enumerate(file.read_text("utf-8").splitlines(), 1):
            if PROBE.search(line):
                probes.append(f"{file.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not probes, "\n".join(probes)

"""Builders shared by the history tests."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from core.history.hot import HotHistory
from core.infra.redis import Keys
from core.messages import IncomingMessage, Turn
from core.settings import Settings
from tests.helpers import ROOT, base_env, settings_env


def make_history(redis: object, settings: Settings, **kw: object) -> HotHistory:
    """A HotHistory with the test's settings."""
    return HotHistory(
        redis,  # type: ignore[arg-type]
        Keys(settings.key_prefix),
        max_turns=settings.history_max_turns,
        ttl_s=settings.history_ttl_s,
        backlog_max=settings.history_backlog_max,
        compress_min_bytes=settings.history_compress_min_bytes,
        **kw,  # type: ignore[arg-type]
    )


def message(
    i: int,
    *,
    user: str = "U1",
    tenant: str = "T1",
    channel: str = "C1",
    thread: str | None = None,
    text: str | None = None,
) -> IncomingMessage:
    """An accepted message number ``i``."""
    return IncomingMessage(
        platform="slack",
        tenant=tenant,
        channel=channel,
        thread=thread,
        user=user,
        message_id=f"m{i}",
        text=text if text is not None else f"question {i}",
        ts=1_700_000_000 + i,
    )


def exchange(msg: IncomingMessage, answer: str | None = None) -> list[Turn]:
    """The user's turn and an answer to it."""
    return [
        Turn(role="user", text=msg.text, message_id=msg.message_id, ts=msg.ts, user=msg.user),
        Turn(
            role="assistant",
            text=answer or f"answer to {msg.text}",
            message_id=f"{msg.message_id}:answer",
            ts=msg.ts + 0.5,
            user=msg.user,
            model="sim",
            tokens_in=10,
            tokens_out=20,
            latency_ms=300,
        ),
    ]


async def buffer_messages(history: HotHistory, n_messages: int, *, seed: int = 1) -> set[str]:
    """Append ``n_messages`` turns (user + answer pairs) over many conversations."""
    rnd = random.Random(seed)
    ids: set[str] = set()
    for i in range(n_messages // 2):
        msg = message(i, user=f"U{i % 37}", channel=f"C{i % 211}", text="x" * rnd.randint(5, 400))
        turns = exchange(msg)
        await history.append(msg.conversation_id, turns, origin=msg)
        ids.update(t.message_id for t in turns)
    return ids


def run_flush_process(
    settings: Settings, log: Path, pause: str | None = None, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m workers.flush`` in a subprocess (optionally pausing at a crash point)."""
    env = {**base_env(), **settings_env(settings), **(extra_env or {})}
    if pause:
        env["SLUICE_TEST_FLUSH_PAUSE"] = pause
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "workers.flush"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

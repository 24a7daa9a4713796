"""Helpers shared by tests: free ports, settings as environment, subprocess control."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from core.settings import Settings
from sluice.bench.procs import Proc as BenchProc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nothing listens on right now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment variables that reproduce ``settings`` in a subprocess."""
    env: dict[str, str] = {}
    for name, field in type(settings).model_fields.items():
        value: Any = getattr(settings, name)
        if value is None:
            continue
        alias = field.validation_alias
        if alias is not None and hasattr(alias, "choices"):
            key = str(alias.choices[0])
        else:
            key = f"SLUICE_{name.upper()}"
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list | dict):
            import json

            value = json.dumps(value, default=_jsonable)
        env[key] = str(value)
    return env


def _jsonable(value: Any) -> Any:
    """Nested settings (e.g. ``SLUICE_PROVIDERS`` entries) as JSON, secrets revealed."""
    if hasattr(value, "get_secret_value"):
        return value.get_secret_value()
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True)
    raise TypeError(f"cannot pass {type(value).__name__} to a subprocess")


def base_env() -> dict[str, str]:
    """The test process's environment without any Sluice, Slack, Discord or OpenAI variable."""
    prefixes = ("SLUICE_", "OPENAI_", "SLACK_", "DISCORD_")
    drop = {"REDIS_URL", "DATABASE_URL"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k not in drop}
    env["PYTHONUNBUFFERED"] = "1"
    # The suite starts hundreds of sluice processes: let them cache the compiled project
    # modules (__pycache__ is git-ignored) even where the shell says not to.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def wait_port(port: int, timeout_s: float = 15.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


class Proc(BenchProc):
    """A subprocess running a ``sluice`` command, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        super().__init__(
            "sluice " + " ".join(args[:1]),
            ["sluice", *args],
            env,
            log_path.parent,
            log_path=log_path,
            cwd=ROOT,
        )

    def wait_for_output(self, needle: str, timeout_s: float = 20.0) -> None:
        """Block until ``needle`` appears in the output (or the process dies)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.output():
                return
            if self.popen.poll() is not None:
                raise RuntimeError(f"sluice {' '.join(self.args)} exited:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{needle!r} not printed in {timeout_s}s:\n{self.output()[-3000:]}")


def stop_all(procs: list[Proc], timeout_s: float = 10.0) -> None:
    """Stop processes together: SIGTERM to all first, then wait for each (SIGKILL after
    ``timeout_s``), so that their graceful stops overlap instead of adding up."""
    for proc in procs:
        if proc.popen.poll() is None:
            proc.kill(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill(signal.SIGKILL)
            proc.popen.wait(5)
        proc.stop()  # it has exited: this closes its log


@contextlib.contextmanager
def running(args: list[str], env: dict[str, str], log_path: Path) -> Iterator[Proc]:
    """Run a ``sluice`` subprocess for the duration of a block."""
    proc = Proc(args, env, log_path)
    try:
        yield proc
    finally:
        proc.stop()


async def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms until it is true; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_jobs_done(
    redis: Any, settings: Settings, timeout_s: float = 60.0, *, queues: list[str] | None = None
) -> None:
    """Wait until no job of this deployment (``SLUICE_KEY_PREFIX``) is queued, deferred
    or running: after that no reply, retry or notice can still arrive. The history
    cron's jobs do not count (a worker queues them all the time)."""
    names = queues or [settings.queue_name]
    prefix = f"arq:in-progress:{settings.key_prefix}:"
    deadline = time.monotonic() + timeout_s
    while True:
        left: list[str] = []
        for queue in names:
            left += [
                j.decode() if isinstance(j, bytes) else str(j)
                for j in await redis.zrange(queue, 0, -1)
            ]
        left = [j for j in left if not j.startswith("cron:")]
        left += [
            k.decode() if isinstance(k, bytes) else str(k)
            async for k in redis.scan_iter(match=prefix + "*", count=1000)
        ]
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs still queued or running after {timeout_s}s: {left[:5]}")
        await asyncio.sleep(0.1)


def unique_slack_ts() -> str:
    """A unique Slack ts: arq job ids are global on the shared test Redis."""
    return f"{int(time.time())}.{uuid.uuid4().int % 1_000_000:06d}"

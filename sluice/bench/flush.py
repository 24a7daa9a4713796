"""Benchmarks of the history write path (called by ``sluice bench``, or run directly).

- :func:`bench_flush`: flush throughput (messages/s) from the Redis backlog into
  SQLite and Postgres, and SQL transactions per 10,000 messages, beside the naive
  design (one INSERT and one COMMIT per message) measured in the same run.
- :func:`bench_compression`: Redis memory and CPU per message for none / zlib /
  zstd on realistic message sizes, which is how ``history_compress_min_bytes`` was
  chosen.

``python -m sluice.bench.flush --redis-url redis://127.0.0.1:6379/0
--postgres postgresql://postgres@127.0.0.1:5432/test`` prints both as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import random
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import zstandard
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from core.history.hot import HotHistory, make_record, pack_record
from core.history.store import Record, count_rows, ensure_schema, insert_one_naive, make_engine
from core.infra.redis import Keys
from core.messages import IncomingMessage, Turn
from core.settings import Settings
from workers.flush import Flusher


def corpus() -> str:
    """Realistic chat text: English prose with code and lists (stdlib documentation)."""
    import asyncio as m1
    import collections as m2
    import json as m3
    import logging as m4
    import pathlib as m5
    import subprocess as m6

    parts: list[str] = []
    for mod in (m1, m2, m3, m4, m5, m6):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(parts)


def sample_texts(text: str, size: int, n: int, seed: int = 7) -> list[str]:
    """``n`` windows of ``size`` characters from ``text``."""
    rnd = random.Random(seed)
    return [text[(s := rnd.randrange(0, len(text) - size)) : s + size] for _ in range(n)]


def _record(i: int, text: str, tenant: str = "T1") -> Record:
    msg = IncomingMessage(
        platform="slack",
        tenant=tenant,
        channel=f"C{i % 500}",
        user=f"U{i % 997}",
        message_id=f"b{i}",
        text=text,
        ts=time.time(),
    )
    role = "user" if i % 2 == 0 else "assistant"
    turn = Turn(
        role=role,
        text=text,
        message_id=msg.message_id,
        ts=msg.ts,
        user=msg.user,
        model=None if role == "user" else "gpt-4o-mini",
        tokens_in=120,
        tokens_out=80,
    )
    return make_record(turn, msg.conversation_id, msg)


# --- Compression ------------------------------------------------------------------------


async def bench_compression(
    redis: Redis, *, sizes: tuple[int, ...] = (200, 1000, 4000, 16000), n: int = 2000
) -> list[dict[str, Any]]:
    """Redis bytes and CPU microseconds per message for none / zlib / zstd.

    Each codec's backlog entries for ``n`` messages are written to a real Redis
    stream, and ``MEMORY USAGE`` of the stream (divided by ``n``) is the memory per
    message; CPU is compress and decompress time per message in this process.
    """
    text = corpus()
    zc = zstandard.ZstdCompressor(level=3)
    zd = zstandard.ZstdDecompressor()
    codecs: dict[str, tuple[Any, Any]] = {
        "none": (lambda b: b, lambda b: b),
        "zlib-1": (lambda b: zlib.compress(b, 1), zlib.decompress),
        "zlib-6": (lambda b: zlib.compress(b, 6), zlib.decompress),
        "zstd-3": (zc.compress, zd.decompress),
    }
    out: list[dict[str, Any]] = []
    for size in sizes:
        # The backlog's own encoding, uncompressed (compress_min_bytes beyond any size).
        raws = [
            pack_record(_record(i, t), 1 << 30) for i, t in enumerate(sample_texts(text, size, n))
        ]
        for name, (comp, decomp) in codecs.items():
            t0 = time.perf_counter()
            blobs = [comp(r) for r in raws]
            t1 = time.perf_counter()
            for b in blobs:
                decomp(b)
            t2 = time.perf_counter()
            key = f"bench:{uuid.uuid4().hex}"
            try:
                for i in range(0, n, 500):
                    async with redis.pipeline(transaction=False) as pipe:
                        for b in blobs[i : i + 500]:
                            pipe.xadd(key, {"r": b})
                        await pipe.execute()
                mem = int(await redis.memory_usage(key, samples=0) or 0)
            finally:
                await redis.delete(key)
            out.append(
                {
                    "size_chars": size,
                    "codec": name,
                    "payload_bytes": round(sum(map(len, raws)) / n),
                    "stored_bytes": round(sum(map(len, blobs)) / n),
                    "redis_bytes_per_msg": round(mem / n),
                    "compress_us": round((t1 - t0) / n * 1e6, 2),
                    "decompress_us": round((t2 - t1) / n * 1e6, 2),
                }
            )
    return out


# --- Flush throughput -------------------------------------------------------------------


async def _fill_backlog(redis: Redis, settings: Settings, records: list[Record]) -> None:
    keys = Keys(settings.key_prefix)
    for i in range(0, len(records), 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for rec in records[i : i + 1000]:
                pipe.xadd(
                    keys.history_backlog(),
                    {"r": pack_record(rec, settings.history_compress_min_bytes)},
                )
            await pipe.execute()


async def _drop_prefix(redis: Redis, prefix: str) -> None:
    batch = [k async for k in redis.scan_iter(f"{prefix}:*", count=1000)]
    if batch:
        await redis.delete(*batch)


def _commits() -> float:
    """SQL transactions committed by this process so far (``core.history.store`` counts them)."""
    return REGISTRY.get_sample_value("sluice_db_transactions_total") or 0.0


async def bench_one_database(
    redis: Redis,
    settings: Settings,
    *,
    n: int = 10_000,
    naive_n: int = 2000,
    label: str = "",
) -> dict[str, Any]:
    """Flush ``n`` messages from the backlog; then ``naive_n`` one-commit-per-message."""
    text = corpus()
    rnd = random.Random(3)
    # Realistic sizes: mostly short questions and medium answers, a few long ones.
    sizes = [rnd.choice((60, 120, 300, 600, 1200, 2500)) for _ in range(n + naive_n)]
    texts = [text[(s := rnd.randrange(0, len(text) - z)) : s + z] for z in sizes]
    records = [_record(i, t) for i, t in enumerate(texts)]
    engine = make_engine(settings)
    try:
        await ensure_schema(settings, engine)
        await _fill_backlog(redis, settings, records[:n])
        flusher = Flusher(redis, settings, engine)
        commits = _commits()
        t0, c0 = time.perf_counter(), time.process_time()
        result = await flusher.run(max_s=600, ignore_backoff=True)
        flush_s = time.perf_counter() - t0
        flush_cpu_s = time.process_time() - c0
        flush_commits = _commits() - commits
        rows, distinct = await count_rows(engine)
        naive = records[n:]
        commits = _commits()
        t0 = time.perf_counter()
        for rec in naive:
            await insert_one_naive(engine, rec)
        naive_s = time.perf_counter() - t0
        naive_commits = _commits() - commits
    finally:
        await engine.dispose()
        await _drop_prefix(redis, settings.key_prefix)
    return {
        "database": label or settings.database_url.split(":", 1)[0],
        "messages": n,
        "batch": settings.history_flush_batch,
        "flush_s": round(flush_s, 3),
        "flush_msgs_per_s": round(n / flush_s),
        "flush_client_cpu_s": round(flush_cpu_s, 3),
        "flush_transactions_per_10k": round(flush_commits * 10_000 / n, 1),
        "stored_once": rows == distinct == n and result.inserted == n,
        "naive_messages": naive_n,
        "naive_msgs_per_s": round(naive_n / naive_s),
        "naive_transactions_per_10k": round(naive_commits * 10_000 / naive_n, 1),
        "speedup": round((n / flush_s) / (naive_n / naive_s), 1),
    }


async def bench_flush(
    redis_url: str,
    *,
    postgres_url: str | None,
    n: int = 10_000,
    naive_n: int = 2000,
    batch: int = 2000,
) -> list[dict[str, Any]]:
    """Flush throughput into SQLite (a temp file) and Postgres (its own schema, dropped)."""
    redis: Redis = Redis.from_url(redis_url)
    out: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            s = Settings(
                _env_file=None,
                redis_url=redis_url,
                database_url=f"sqlite:///{Path(tmp) / 'bench.db'}",
                key_prefix=f"bench{uuid.uuid4().hex[:8]}",
                history_flush_batch=batch,
            )
            out.append(await bench_one_database(redis, s, n=n, naive_n=naive_n, label="sqlite"))
        if postgres_url:
            schema = f"bench_{uuid.uuid4().hex[:8]}"
            s = Settings(
                _env_file=None,
                redis_url=redis_url,
                database_url=postgres_url,
                db_schema=schema,
                key_prefix=f"bench{uuid.uuid4().hex[:8]}",
                history_flush_batch=batch,
            )
            try:
                out.append(
                    await bench_one_database(redis, s, n=n, naive_n=naive_n, label="postgres")
                )
            finally:
                engine = make_engine(s)
                async with engine.begin() as conn:
                    await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                await engine.dispose()
    finally:
        await redis.aclose()
    return out


async def bench_append(redis_url: str, n: int = 10_000) -> dict[str, Any]:
    """Hot-path cost of recording: appends per second through :class:`HotHistory`."""
    redis: Redis = Redis.from_url(redis_url)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    try:
        history = HotHistory(redis, Keys(prefix), max_turns=50, ttl_s=3600)
        msg = IncomingMessage(
            platform="slack",
            tenant="T",
            channel="C",
            user="U",
            message_id="x",
            text="hello there, how are you?",
        )
        t0 = time.perf_counter()
        for i in range(n // 2):
            turns = [
                Turn(role="user", text=msg.text, message_id=f"q{i}"),
                Turn(role="assistant", text="Fine, thanks! " * 20, message_id=f"a{i}"),
            ]
            await history.append(msg.conversation_id, turns, origin=msg)
        dt = time.perf_counter() - t0
    finally:
        await _drop_prefix(redis, prefix)
        await redis.aclose()
    return {
        "appends": n // 2,
        "turns": n,
        "turns_per_s": round(n / dt),
        "ms_per_append": round(dt / (n // 2) * 1000, 3),
    }


def main() -> None:
    """Command line: run the benchmarks and print JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--postgres", default=None, help="Postgres URL (omit to skip Postgres).")
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--naive", type=int, default=2000)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--only", choices=("flush", "compression", "append"), default=None)
    a = p.parse_args()

    async def run() -> dict[str, Any]:
        res: dict[str, Any] = {}
        if a.only in (None, "flush"):
            res["flush"] = await bench_flush(
                a.redis_url, postgres_url=a.postgres, n=a.messages, naive_n=a.naive, batch=a.batch
            )
        if a.only in (None, "append"):
            res["append"] = await bench_append(a.redis_url)
        if a.only in (None, "compression"):
            r: Redis = Redis.from_url(a.redis_url)
            try:
                res["compression"] = await bench_compression(r)
            finally:
                await r.aclose()
        return res

    print(json.dumps(asyncio.run(run()), indent=2))


if __name__ == "__main__":
    main()

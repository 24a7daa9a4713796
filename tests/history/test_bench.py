"""The flush benchmark runs and reports what `sluice bench` shows (small sizes here)."""

from __future__ import annotations

from redis.asyncio import Redis

from sluice.bench.flush import bench_compression, bench_flush
from tests.history.conftest import PG_URL, postgres_reachable


async def test_flush_bench_reports_throughput_and_transactions_beside_the_naive_design(
    redis_url: str,
) -> None:
    pg = PG_URL if postgres_reachable() else None
    rows = await bench_flush(redis_url, postgres_url=pg, n=600, naive_n=20, batch=200)
    assert [r["database"] for r in rows] == (["sqlite", "postgres"] if pg else ["sqlite"])
    for r in rows:
        assert r["stored_once"]
        # Counted from the engine's commits: 600 messages in batches of 200, and one
        # commit per message for the naive design.
        assert r["flush_transactions_per_10k"] == 10_000 * 3 / 600
        assert r["naive_transactions_per_10k"] == 10_000
        assert r["flush_msgs_per_s"] > 0 and r["naive_msgs_per_s"] > 0


async def test_compression_bench_measures_each_codec_in_redis(redis: Redis) -> None:
    rows = await bench_compression(redis, sizes=(1000,), n=50)
    by_codec = {r["codec"]: r for r in rows}
    assert set(by_codec) == {"none", "zlib-1", "zlib-6", "zstd-3"}
    assert by_codec["zstd-3"]["redis_bytes_per_msg"] < by_codec["none"]["redis_bytes_per_msg"]

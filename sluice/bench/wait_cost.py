"""What ``SLUICE_REDIS_WAIT_REPLICAS`` costs an adapter's ack: the time of
:func:`core.traffic.queue.accept_message` with ``WAIT`` off and on, against a Redis that has
a replica.

``python -m sluice.bench.wait_cost --redis redis://HOST:PORT/0 [--messages N]``
prints the p50/p95/p99 ack time for ``WAIT 0`` (off) and ``WAIT 1``, and the
messages per second one adapter coroutine reaches. Results: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from core.messages import IncomingMessage
from core.settings import Settings
from core.traffic.queue import accept_message, connect_queue


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * len(ordered)))]


async def measure(redis_url: str, messages: int, wait_replicas: int) -> dict[str, float]:
    """Accept ``messages`` messages one after another; ack times in ms."""
    settings = Settings(
        _env_file=None,
        redis_url=redis_url,
        key_prefix=f"wc{uuid.uuid4().hex[:8]}",
        redis_wait_replicas=wait_replicas,
        queued_notice_after_s=0,
    )
    queue = await connect_queue(settings)
    times: list[float] = []
    started = time.perf_counter()
    try:
        for i in range(messages):
            msg = IncomingMessage(
                platform="web",
                tenant="web",
                channel=f"c{i % 50}",
                user=f"u{i % 50}",
                message_id=uuid.uuid4().hex,
                text=f"question {i}",
                ts=time.time(),
                is_dm=True,
            )
            t0 = time.perf_counter()
            await accept_message(queue, settings, msg)
            times.append((time.perf_counter() - t0) * 1000)
        total_s = time.perf_counter() - started
        # Leave nothing behind: the jobs would be answered by any worker on this Redis.
        keys = [k async for k in queue.scan_iter(f"{settings.key_prefix}*", count=1000)]
        keys += [k async for k in queue.scan_iter(f"arq:job:{settings.key_prefix}*", count=1000)]
        if keys:
            await queue.delete(*keys)
        await queue.delete(settings.queue_name)
    finally:
        await queue.aclose()
    return {
        "p50_ms": _pct(times, 0.50),
        "p95_ms": _pct(times, 0.95),
        "p99_ms": _pct(times, 0.99),
        "per_s": messages / total_s,
    }


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", required=True, help="A Redis primary with a replica.")
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    print("WAIT  p50 ms  p95 ms  p99 ms  acks/s (one coroutine)")
    for replicas in (0, 1, 0, 1):
        r = asyncio.run(measure(args.redis, args.messages, replicas))
        print(
            f"{replicas:>4}  {r['p50_ms']:6.2f}  {r['p95_ms']:6.2f}  {r['p99_ms']:6.2f}  "
            f"{r['per_s']:8.0f}"
        )


if __name__ == "__main__":
    main()

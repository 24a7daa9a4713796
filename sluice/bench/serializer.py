"""``sluice bench --scenario serializer``: JSON vs msgpack on the reply job payload.

arq serializes the whole job (function, args, tries, enqueue time) on every enqueue
and every pick-up; this measures both candidates on a realistic Slack message.
"""

from __future__ import annotations

import json
import time
import timeit
from collections.abc import Callable
from typing import Any

import msgpack

from core.messages import IncomingMessage


def _job() -> dict[str, Any]:
    msg = IncomingMessage(
        platform="slack",
        tenant="T0123ABCD",
        channel="C0456EFGH",
        thread="1732650000.123456",
        user="U0789IJKL",
        message_id="C0456EFGH:1732650001.000200",
        text="How do I reset my password for the billing portal? I tried twice and the "
        "link keeps saying it expired.",
        user_name="Ada Lovelace",
        meta={"assistant": "1"},
    )
    return {
        "t": 1,
        "f": "reply",
        "a": [msg.model_dump(mode="json")],
        "k": {},
        "et": int(time.time() * 1000),
    }


def _best_us(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def run_serializer_bench(number: int = 100_000) -> dict[str, dict[str, float]]:
    """Size in bytes and best-of-5 µs per serialize / deserialize, per format."""
    job = _job()
    codecs: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] = {
        "json": (
            lambda o: json.dumps(o, separators=(",", ":")).encode(),
            lambda b: json.loads(b),
        ),
        "msgpack": (
            lambda o: msgpack.packb(o, use_bin_type=True),
            lambda b: msgpack.unpackb(b, raw=False, strict_map_key=False),
        ),
    }
    return {name: _measure(job, dump, load, number) for name, (dump, load) in codecs.items()}


def _measure(
    job: dict[str, Any], dump: Callable[[Any], bytes], load: Callable[[bytes], Any], number: int
) -> dict[str, float]:
    data = dump(job)
    if load(data) != job:
        raise RuntimeError("codec does not round-trip the job")
    return {
        "bytes": len(data),
        "serialize_us": round(_best_us(lambda: dump(job), number), 3),
        "deserialize_us": round(_best_us(lambda: load(data), number), 3),
    }

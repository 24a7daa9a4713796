"""A tool that raises with secrets in its exception (a DSN with a password, an API
key in the chained cause): the model reads only that the tool failed, with an error
id; the worker's log has the traceback under that id, masked. A real worker process,
the simulator scripted to call the tool, the web chat.
"""

from __future__ import annotations

import json
import uuid

from redis.asyncio import Redis

from core.settings import Settings
from tests.framework.chat import chat

BOT = "tests.reliability.secret_bot:bot"


async def _prefix_dump(redis: Redis, prefix: str) -> bytes:
    """Every key holding the test's prefix (Sluice's and arq's) and its value."""
    out: list[bytes] = []
    async for key in redis.scan_iter(match=f"*{prefix}*", count=1000):
        out.append(key)
        kind = (await redis.type(key)).decode()
        if kind == "string":
            out.append(await redis.get(key) or b"")
        elif kind == "hash":
            for k, v in (await redis.hgetall(key)).items():
                out += [k, v]
        elif kind == "list":
            out += await redis.lrange(key, 0, -1)
        elif kind == "set":
            out += list(await redis.smembers(key))
        elif kind == "zset":
            out += [m for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for _, fields in await redis.xrange(key):
                for k, v in fields.items():
                    out += [k, v]
    return b"\n".join(out)


async def test_a_failing_tools_secrets_reach_neither_the_model_nor_the_user_nor_the_log(
    settings: Settings, llm_sim, worker_process, redis: Redis
):
    password = f"pw{uuid.uuid4().hex}"
    api_key = f"key{uuid.uuid4().hex}"
    dsn = f"postgresql://orders:{password}@db-primary.internal:5432/orders"
    worker = worker_process(
        {"SLUICE_APP": BOT, "TEST_ORDERS_DSN": dsn, "TEST_ORDERS_API_KEY": api_key}
    )
    async with chat(settings) as c:
        done = await c.ask('Where is my order? [[tool:order_status {"order": "A-17"}]]')
        follow_up = await c.ask("And now?")
        events = c.tab.events
    assert done["kind"] == "answer" and follow_up["kind"] == "answer"
    requests = llm_sim.requests()
    assert len(requests) == 3  # the tool call, the answer after it, the follow-up
    tool_msg = requests[1]["messages"][-1]
    assert tool_msg["role"] == "tool"
    error = json.loads(tool_msg["content"])["error"]
    assert error.startswith("the tool order_status failed (error id ")
    error_id = error.split("error id ")[1].split(")")[0]
    # The follow-up's context holds the stored tool turn: from history, still generic.
    stored = [m for m in requests[2]["messages"] if m["role"] == "tool"]
    assert stored and stored[0]["content"] == tool_msg["content"]

    worker.wait_for_output(f"error_id={error_id}")
    log = worker.output()
    assert "tool order_status raised" in log
    # The traceback is there, chained cause included, with the secrets masked.
    assert "OrdersDatabaseError: cannot look up order A-17: connect to " in log
    assert "postgresql://orders:***@db-primary.internal:5432/orders" in log
    assert "ConnectionRefusedError: orders-api.internal refused Authorization: Bearer ***" in log

    places = {
        "model requests": json.dumps(requests).encode(),
        "replies": json.dumps(events).encode(),
        "redis (history, jobs, results)": await _prefix_dump(redis, settings.key_prefix),
        "worker log": log.encode(),
    }
    assert b"order_status" in places["redis (history, jobs, results)"]
    assert b"arq:result:" in places["redis (history, jobs, results)"]
    leaks = [
        f"{name} in {where}"
        for name, value in {"DSN password": password, "API key": api_key}.items()
        for where, blob in places.items()
        if value.encode() in blob
    ]
    assert not leaks, leaks
    assert b"db-primary.internal" not in places["model requests"] + places["replies"]

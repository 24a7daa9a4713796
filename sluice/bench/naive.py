"""The naive design the benchmark compares against, as a real HTTP server.

What a first version of a chat bot usually looks like: the HTTP handler loads the
conversation from SQL, calls the LLM itself (the openai SDK with its defaults:
two retries, no shared budget), streams the answer back as the response body, and
commits the turns to SQL, one transaction per message. No queue, no cache, no
limits. SQLite through the standard ``sqlite3`` module, called from the event loop
as such code does.

``POST /api/messages`` ``{"session", "text"}`` answers ``application/x-ndjson``:
``{"type": "delta", "text": ...}`` lines, then ``{"type": "done", "kind": ...}``.
``GET /metrics`` exposes the same metric names as Sluice (platform ``naive``).

Run: ``python -m sluice.bench.naive --port P --llm-url URL --db PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import time
from typing import Any

import openai
from aiohttp import web

from core.infra import metrics

APOLOGY = "Sorry, something went wrong. Please try again."
CONTEXT_TURNS = 20

DB: web.AppKey[sqlite3.Connection] = web.AppKey("db", sqlite3.Connection)
LLM: web.AppKey[openai.AsyncOpenAI] = web.AppKey("llm", openai.AsyncOpenAI)


def open_db(path: str) -> sqlite3.Connection:
    """The SQLite database with one table of turns."""
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE IF NOT EXISTS turns (id INTEGER PRIMARY KEY, session TEXT, role TEXT, "
        "text TEXT, ts REAL)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS turns_session ON turns (session, id)")
    db.commit()
    return db


async def send_message(request: web.Request) -> web.StreamResponse:
    """Answer one message inside the request, the naive way."""
    started = time.monotonic()
    data = await request.json()
    session, text = str(data["session"]), str(data["text"])
    db = request.app[DB]
    rows = db.execute(
        "SELECT role, text FROM turns WHERE session = ? ORDER BY id DESC LIMIT ?",
        (session, CONTEXT_TURNS),
    ).fetchall()
    messages: list[Any] = [{"role": "system", "content": "You are a helpful assistant."}]
    messages += [{"role": r, "content": t} for r, t in reversed(rows)]
    messages.append({"role": "user", "content": text})
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    parts: list[str] = []
    kind = "answer"
    model_s = 0.0
    delivery_s = 0.0
    t_llm = time.monotonic()
    try:
        stream = await request.app[LLM].chat.completions.create(
            model="gpt-4o-mini", messages=messages, stream=True
        )
        async with stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        parts.append(choice.delta.content)
                        t_w = time.monotonic()
                        line = {"type": "delta", "text": choice.delta.content}
                        await resp.write(json.dumps(line).encode() + b"\n")
                        delivery_s += time.monotonic() - t_w
        metrics.record_llm_call("ok", time.monotonic() - t_llm)
    except openai.RateLimitError:
        metrics.record_llm_call("rate_limited", time.monotonic() - t_llm)
        kind = "error"
    except openai.OpenAIError:
        metrics.record_llm_call("error", time.monotonic() - t_llm)
        kind = "error"
    model_s = time.monotonic() - t_llm - delivery_s
    answer = "".join(parts) if kind == "answer" else APOLOGY
    now = time.time()
    db.execute(
        "INSERT INTO turns (session, role, text, ts) VALUES (?, 'user', ?, ?)", (session, text, now)
    )
    if kind == "answer":
        db.execute(
            "INSERT INTO turns (session, role, text, ts) VALUES (?, 'assistant', ?, ?)",
            (session, answer, now),
        )
    db.commit()
    metrics.DB_TRANSACTIONS.inc()
    await resp.write(json.dumps({"type": "done", "kind": kind, "text": answer}).encode() + b"\n")
    await resp.write_eof()
    total = time.monotonic() - started
    metrics.JOB_SECONDS.labels("naive", kind).observe(total)
    metrics.JOB_OVERHEAD_SECONDS.labels("naive").observe(max(0.0, total - model_s))
    metrics.REPLIES.labels("naive", kind).inc()
    return resp


async def healthz(request: web.Request) -> web.Response:
    """Always 200 while the process runs."""
    return web.json_response({"ok": True})


def create_naive_app(llm_url: str, db_path: str) -> web.Application:
    """The naive server's app."""
    app = web.Application()
    app[DB] = open_db(db_path)
    app[LLM] = openai.AsyncOpenAI(api_key="sk-bench-naive", base_url=llm_url)

    async def close(app: web.Application) -> None:
        await app[LLM].close()
        app[DB].close()

    app.on_cleanup.append(close)
    app.router.add_post("/api/messages", send_message)
    app.router.add_get("/healthz", healthz)
    metrics.metrics_routes(app)
    return app


def main() -> None:
    """Entry point for the benchmark's subprocess."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--llm-url", required=True)
    parser.add_argument("--db", required=True)
    args = parser.parse_args()
    web.run_app(
        create_naive_app(args.llm_url, args.db),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        backlog=4096,
        shutdown_timeout=2,
        loop=asyncio.new_event_loop(),
    )


if __name__ == "__main__":
    main()

"""An adapter host for the network-namespace test: accepts web messages through
:func:`core.traffic.queue.accept_message`, as the web adapter does, and records each one once
it is acknowledged.

``python -m tests.scale.netns_adapter OUT COUNT RATE SESSIONS TAG`` (settings from the
environment): ``COUNT`` messages at ``RATE`` a second over ``SESSIONS`` conversations;
one line ``session message_id`` per acked message in ``OUT``. An unacked delivery (a
``QueueError``) is delivered again, as a platform does.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

from core.errors import QueueError
from core.messages import IncomingMessage
from core.settings import Settings
from core.traffic.queue import accept_message, connect_queue


async def main(out: Path, count: int, rate: float, sessions: int, tag: str) -> None:
    """Send ``count`` messages, writing each acked one to ``out``."""
    settings = Settings()
    queue = await connect_queue(settings)
    names = [f"{tag}s{i}" for i in range(sessions)]
    started = time.monotonic()
    try:
        with out.open("a", encoding="utf-8") as f:
            for i in range(count):
                session = names[i % sessions]
                msg = IncomingMessage(
                    platform="web",
                    tenant="web",
                    channel=session,
                    user=session,
                    message_id=uuid.uuid4().hex,
                    text=f"{tag} question {i}",
                    ts=time.time(),
                    is_dm=True,
                )
                deadline = time.monotonic() + 60
                while True:
                    try:
                        await accept_message(queue, settings, msg)
                        break
                    except QueueError as e:
                        if time.monotonic() > deadline:
                            raise SystemExit(f"no ack for 60 s: {e}") from e
                        await asyncio.sleep(0.2)
                f.write(f"{session} {msg.message_id}\n")
                f.flush()
                pause = started + (i + 1) / rate - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
    finally:
        await queue.aclose()
    print(f"acked {count} messages", flush=True)


if __name__ == "__main__":
    path, n, r, s, t = sys.argv[1:6]
    asyncio.run(main(Path(path), int(n), float(r), int(s), t))

"""👍/👎 on Slack: buttons under every answer, a click through the real Bolt adapter
(a signed ``block_actions`` request) recorded by a real worker, a changed vote, the
``@bot.on_feedback`` hook, and hostile ids that are refused."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from typing import Any
from urllib.parse import urlencode

from redis.asyncio import Redis

from core.settings import Settings
from tests.fakes.slack_api import FakeSlackAPI
from tests.slack.conftest import mention, message, worker_env
from tests.slack.feedback_bot import votes_key

APP = "tests.slack.feedback_bot:bot"


def click(
    value: str, *, vote: str = "up", user: str = "U2", channel: str = "C1", team: str = "T1"
) -> dict[str, Any]:
    """A ``block_actions`` payload as Slack sends it for a click on a feedback button."""
    return {
        "type": "block_actions",
        "team": {"id": team, "domain": "t1"},
        "user": {"id": user, "team_id": team},
        "api_app_id": "AFAKE",
        "token": "legacy",
        "trigger_id": f"trig-{time.monotonic_ns()}",
        "container": {"type": "message", "channel_id": channel, "message_ts": "1.1"},
        "channel": {"id": channel, "name": "general"},
        "message": {"type": "message", "ts": "1.1", "text": "answer"},
        "response_url": "http://127.0.0.1:9/respond",
        "actions": [
            {
                "type": "button",
                "action_id": f"sluice_feedback_{vote}",
                "block_id": "sluice_feedback",
                "value": value,
                "action_ts": str(time.time()),
            }
        ],
    }


def button_values(fake: FakeSlackAPI) -> list[str]:
    """The values of the feedback buttons the bot sent (stopStream or chat.update)."""
    out = []
    for call in fake.calls_of("chat.stopStream") + fake.calls_of("chat.update"):
        blocks = call.params.get("blocks")
        if isinstance(blocks, str):
            blocks = json.loads(blocks)
        for block in blocks or []:
            if block.get("type") == "actions":
                out += [e["value"] for e in block["elements"]]
    return out


def stored_votes(settings: Settings) -> list[tuple[str, str, str, int]]:
    path = settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT tenant, message_id, user, vote FROM feedback ORDER BY user"
        ).fetchall()
    return [tuple(r) for r in rows]


async def wait_until(predicate: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_answers_carry_buttons_and_a_click_is_recorded_once_per_user_and_can_change(
    slack_settings: Settings, adapter: Any, worker_process: Any, fake_slack: FakeSlackAPI
) -> None:
    settings = slack_settings.model_copy(update={"app": APP})
    worker_process({**worker_env(settings), "SLUICE_APP": APP})
    redis: Redis = Redis.from_url(settings.redis_url or "")
    try:
        async with adapter(settings) as a:
            # A streamed answer in a thread, and a posted one in a DM: both get buttons.
            await a.send.event(mention("rate me", "400.000100"))
            await a.send.event(message("me too", "401.000100", channel="D1", channel_type="im"))
            await fake_slack.wait_for(
                lambda: {"C1:400.000100", "D1:401.000100"} <= set(button_values(fake_slack)), 30
            )

            async def send(payload: dict[str, Any]) -> int:
                body = urlencode({"payload": json.dumps(payload)}).encode()
                status, _ = await a.send.post_raw(
                    body, content_type="application/x-www-form-urlencoded"
                )
                return status

            assert await send(click("C1:400.000100", vote="up")) == 200
            await wait_until(lambda: stored_votes(settings) == [("T1", "C1:400.000100", "U2", 1)])
            # The same user changes their mind: still one vote, now 👎.
            assert await send(click("C1:400.000100", vote="down")) == 200
            await wait_until(lambda: stored_votes(settings) == [("T1", "C1:400.000100", "U2", -1)])
            # Hostile clicks are acked and dropped: another channel's message, markup,
            # a huge value, a user id with a newline.
            for bad in (
                click("C9:400.000100"),
                click("<!here>"),
                click("C1:" + "9" * 5000),
                click("C1:400.000100", user="U2\nU3"),
            ):
                assert await send(bad) == 200
            # A last good click shows that the hostile ones before it left nothing behind.
            assert await send(click("D1:401.000100", channel="D1", user="U3")) == 200
            await wait_until(lambda: len(stored_votes(settings)) == 2)
            assert stored_votes(settings) == [
                ("T1", "C1:400.000100", "U2", -1),
                ("T1", "D1:401.000100", "U3", 1),
            ]
        key = votes_key(settings.key_prefix)
        await wait_until_async(redis, key, 3)
        hooks = [json.loads(v) for v in await redis.lrange(key, 0, -1)]  # type: ignore[misc]
        assert [(h["user"], h["vote"], h["previous"]) for h in hooks] == [
            ("U2", "up", None),
            ("U2", "down", "up"),
            ("U3", "up", None),
        ]
    finally:
        await redis.aclose()


async def wait_until_async(redis: Redis, key: str, n: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await redis.llen(key) < n:  # type: ignore[misc]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)

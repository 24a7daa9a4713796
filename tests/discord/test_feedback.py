"""👍/👎 on Discord: buttons under every answer (real worker, fake REST), clicks through
the real discord.py client acknowledged at once and recorded once per user, a changed
vote, the ``@bot.on_feedback`` hook, and forged button ids that are refused."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from typing import Any

from pydantic import SecretStr
from redis.asyncio import Redis

from core.settings import Settings
from tests.discord.conftest import CHANNEL, GUILD, running_adapter
from tests.fakes.discord_fake import DiscordFake
from tests.helpers import settings_env
from tests.slack.feedback_bot import votes_key

APP = "tests.slack.feedback_bot:bot"
ALICE = DiscordFake.user(610000000000000001, "alice")
BOB = DiscordFake.user(610000000000000002, "bob")


def stored_votes(settings: Settings) -> list[tuple[str, str, str, int]]:
    path = settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT tenant, message_id, user, vote FROM feedback ORDER BY user"
        ).fetchall()
    return [tuple(r) for r in rows]


async def until(predicate: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def buttons(msg: dict[str, Any]) -> list[str]:
    return [c["custom_id"] for row in msg.get("components") or [] for c in row["components"]]


async def test_answers_carry_buttons_and_clicks_are_acked_recorded_and_can_change(
    fake: DiscordFake, settings: Settings, worker_process: Any, redis: Redis
) -> None:
    s = settings.model_copy(
        update={
            "discord_token": SecretStr(fake.token),
            "discord_api_url": fake.api_url,
            "discord_stream_interval_s": 0.3,
            "app": APP,
        }
    )
    worker_process({**settings_env(s), "SLUICE_APP": APP})
    async with running_adapter(s.model_copy(update={"discord_message_content": True}), fake):
        asked = await fake.send_user_message(CHANNEL, ALICE, "rate this", mention_bot=True)
        await until(
            lambda: any(buttons(m) for m in fake.bot_messages(CHANNEL)),
        )
        [answer] = [m for m in fake.bot_messages(CHANNEL) if buttons(m)]
        assert answer["content"].startswith("Echo: rate this")
        up, down = f"sluice_fb:up:{asked['id']}", f"sluice_fb:down:{asked['id']}"
        assert buttons(answer) == [up, down]

        click = await fake.click_button(answer, BOB, up)
        await until(lambda: stored_votes(s) == [(GUILD, asked["id"], BOB["id"], 1)])
        # Acknowledged within Discord's 3 s with a note only Bob sees (type 4, ephemeral).
        assert click.callback_type == 4 and click.callback_after_s is not None
        assert click.callback_after_s < 3.0
        await fake.click_button(answer, BOB, down)
        await until(lambda: stored_votes(s) == [(GUILD, asked["id"], BOB["id"], -1)])
        # Forged ids: not ours, markup, too long, not a snowflake. Acked, not recorded.
        for forged in (
            "sluice_fb:up:<@&1>",
            "sluice_fb:sideways:" + asked["id"],
            "sluice_fb:up:" + "9" * 90,
            "sluice_fb:up:12ab",
        ):
            inter = await fake.click_button(answer, ALICE, forged)
            await until(lambda i=inter: i.callback_type is not None)
        await fake.click_button(answer, ALICE, up)
        await until(lambda: len(stored_votes(s)) == 2)
    assert sorted(stored_votes(s)) == sorted(
        [
            (GUILD, asked["id"], BOB["id"], -1),
            (GUILD, asked["id"], ALICE["id"], 1),
        ]
    )
    key = votes_key(s.key_prefix)
    await until(lambda: _hooks(redis, key, 3), 30)
    hooks = [json.loads(v) for v in await redis.lrange(key, 0, -1)]
    assert [(h["user"], h["vote"], h["previous"]) for h in hooks] == [
        (BOB["id"], "up", None),
        (BOB["id"], "down", "up"),
        (ALICE["id"], "up", None),
    ]


async def _hooks(redis: Redis, key: str, n: int) -> bool:
    return int(await redis.llen(key)) >= n

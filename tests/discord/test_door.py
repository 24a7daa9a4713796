"""Discord: the queued notice shows while no worker slot is free, and becomes the answer.

discord.py adapter against the fake gateway, a real ``sluice worker`` process against
the fake REST API, simulator; the one reply slot is held by a job waiting for the closed
LLM budget (see tests/test_door.py).
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import SecretStr
from redis.asyncio import Redis

from core.settings import Settings
from tests.discord.conftest import CHANNEL, running_adapter
from tests.door_util import close_budget, open_budget, until
from tests.fakes.discord_fake import DiscordFake
from tests.helpers import Proc, settings_env


def _replies_to(fake: DiscordFake, message_id: str) -> list[dict]:
    return [
        m
        for m in fake.bot_messages(CHANNEL)
        if (m.get("message_reference") or {}).get("message_id") == message_id
    ]


async def test_queued_notice_is_posted_while_no_slot_is_free_then_edited_into_the_answer(
    fake: DiscordFake, settings: Settings, worker_process: Callable[..., Proc], redis: Redis
):
    s = settings.model_copy(
        update={
            "discord_token": SecretStr(fake.token),
            "discord_api_url": fake.api_url,
            "discord_stream_interval_s": 0.3,
            "llm_rpm": 60,
            "queued_notice_after_s": 1.0,
            "worker_max_jobs": 1,
        }
    )
    worker_process(settings_env(s))
    await close_budget(redis, s.key_prefix, 120)
    alice = DiscordFake.user(610000000000000011, "alice")
    bob = DiscordFake.user(610000000000000012, "bob")
    async with running_adapter(s, fake):
        await fake.send_user_message(CHANNEL, alice, "first in line", mention_bot=True)

        async def slot_held() -> bool:
            return bool(await redis.zcard(f"{s.key_prefix}:llm:waiters"))

        await until(slot_held, 20, "the only slot held by a job waiting for the budget")
        second = await fake.send_user_message(CHANNEL, bob, "second in line", mention_bot=True)

        async def notice_shown() -> bool:
            return any(
                m["content"].startswith("⏳ Queued: #2 in line, about")
                for m in _replies_to(fake, second["id"])
            )

        await until(notice_shown, 20, "the queued notice on Discord")
        [notice] = _replies_to(fake, second["id"])
        await open_budget(redis, s.key_prefix)

        async def answered() -> bool:
            return any(
                m["content"].startswith("Echo: second in line")
                for m in _replies_to(fake, second["id"])
            )

        await until(answered, 30, "the answer on Discord")
    [answer] = _replies_to(fake, second["id"])  # the notice became the answer
    assert answer["id"] == notice["id"]
    assert answer["edit_history"][0].startswith("⏳ Queued: #2 in line")

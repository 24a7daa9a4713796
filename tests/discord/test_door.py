"""Discord: the queued notice shows while no worker slot is free, and becomes the answer.

discord.py adapter against the fake gateway, a real ``sluice worker`` process against
the fake REST API, simulator; the one reply slot is held by a job waiting for the closed
LLM budget (see tests/test_door.py).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import REGISTRY
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


def _busy_refusals() -> float:
    return REGISTRY.get_sample_value("sluice_door_refusals_total", {"reason": "busy"}) or 0.0


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


async def test_a_message_over_the_wait_bound_is_refused_with_one_notice(
    fake: DiscordFake, settings: Settings, worker_process: Callable[..., Proc], redis: Redis
):
    """Discord, like the web chat: over ``SLUICE_MAX_WAIT_S`` the door refuses the
    message at once with a reply saying when to try again; the same user's next
    refusal in the window gets none; neither is queued or reaches the model."""
    s = settings.model_copy(
        update={
            "discord_token": SecretStr(fake.token),
            "discord_api_url": fake.api_url,
            "llm_rpm": 60,
            "max_wait_s": 10.0,
            "queued_notice_after_s": 1.0,
            # Notices count per limit window, aligned to the clock: a day-long one, so
            # that no window edge falls between the two refusals.
            "user_window_s": 86_400,
        }
    )
    worker_process(settings_env(s))
    await close_budget(redis, s.key_prefix, 120)
    alice = DiscordFake.user(610000000000000021, "alice")
    refusals_before = _busy_refusals()
    async with running_adapter(s, fake):
        first = await fake.send_user_message(CHANNEL, alice, "are you there?", mention_bot=True)

        async def refused() -> bool:
            return any(
                m["content"] == "Very busy right now, please try again in about 2 min."
                for m in _replies_to(fake, first["id"])
            )

        await until(refused, 20, "the refusal on Discord")
        second = await fake.send_user_message(CHANNEL, alice, "hello??", mention_bot=True)

        async def both_handled() -> bool:
            # The adapter runs in this process: its door counts each refusal.
            return _busy_refusals() >= refusals_before + 2

        await until(both_handled, 20, "the door to handle the second message")
        refused_jobs = [k async for k in redis.scan_iter(match=f"arq:*{s.key_prefix}:refused:*")]
    assert len(_replies_to(fake, first["id"])) == 1
    assert _replies_to(fake, second["id"]) == []
    # One notice job in the window (arq keeps a job's key, retry count, result...).
    assert len({k.split(b":refused:", 1)[1] for k in refused_jobs}) == 1, refused_jobs
    queued = await redis.zrange(s.queue_name, 0, -1)
    assert [j for j in queued if b":reply:" in j] == [], queued

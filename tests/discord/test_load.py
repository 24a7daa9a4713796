"""Many users in one channel at once: all answered within Discord's rate limits.

Run with ``-s`` to see the numbers (also written to ``discord-load.json`` in the test's
temporary folder).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from core.settings import Settings
from tests.discord.conftest import CHANNEL, running_adapter
from tests.fakes.discord_fake import DiscordFake
from tests.helpers import Proc, settings_env, wait_jobs_done


@pytest.mark.slow
async def test_300_users_in_one_channel_all_answered_within_rate_limits(
    fake: DiscordFake, settings: Settings, worker_process: Callable[..., Proc], tmp_path: Path
) -> None:
    # Per-channel buckets roomy enough that the global 50/s limit binds too.
    fake.limits.update(
        {
            "POST /channels/{channel_id}/messages": (30, 1.0),
            "PATCH /channels/{channel_id}/messages/{message_id}": (30, 1.0),
        }
    )
    await _load(fake, settings, worker_process, tmp_path, users=300)


@pytest.mark.slow
async def test_users_in_one_channel_with_discords_own_channel_limits(
    fake: DiscordFake, settings: Settings, worker_process: Callable[..., Proc], tmp_path: Path
) -> None:
    # Discord's real limits: 5 messages and 5 edits per 5 s in a channel.
    # Twelve users: more than twice the channel bucket, so pacing must hold across windows.
    await _load(fake, settings, worker_process, tmp_path, users=12)


async def _load(
    fake: DiscordFake,
    settings: Settings,
    worker_process: Callable[..., Proc],
    tmp_path: Path,
    *,
    users: int,
) -> None:
    s = settings.model_copy(
        update={"discord_token": SecretStr(fake.token), "discord_api_url": fake.api_url}
    )
    # Two worker processes share the pacing state in Redis (started together).
    workers = [worker_process(settings_env(s), wait=False) for _ in range(2)]
    for w in workers:
        w.wait_for_output("worker ready", timeout_s=90)
    started = time.monotonic()
    async with running_adapter(s, fake):
        sent = []
        for i in range(users):
            user = DiscordFake.user(620000000000000000 + i, f"user{i}")
            sent.append(
                await fake.send_user_message(CHANNEL, user, f"question {i}", mention_bot=True)
            )
        by_ref: dict[str, list[dict[str, object]]] = {}

        def answered() -> bool:
            by_ref.clear()
            for m in fake.bot_messages(CHANNEL):
                ref = (m.get("message_reference") or {}).get("message_id")
                by_ref.setdefault(ref, []).append(m)
            return all(
                len(by_ref.get(m["id"], [])) == 1
                and by_ref[m["id"]][0]["content"].startswith(f"Echo: question {i}")
                for i, m in enumerate(sent)
            )

        deadline = time.monotonic() + 100
        while not answered():
            assert time.monotonic() < deadline, f"{len(by_ref)} of {users} answered"
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - started
        redis = Redis.from_url(s.redis_url)
        try:
            await wait_jobs_done(redis, s, 60)  # every job has ended: nothing more comes
        finally:
            await redis.aclose()
        assert answered()  # and nothing more arrived
    rest_calls = [
        c
        for c in fake.calls
        if c.route not in ("GET /users/@me", "GET /oauth2/applications/@me", "GET /gateway/bot")
    ]
    numbers = {
        "users": users,
        "channel_post_limit": fake.limits["POST /channels/{channel_id}/messages"],
        "seconds_until_all_answered": round(elapsed, 1),
        "rest_requests": len(rest_calls),
        "max_requests_in_any_second": fake.max_requests_in_any_second(),
        "responses_429": sum(1 for c in fake.calls if c.status == 429),
        "max_429_per_bucket_window": fake.max_429_per_bucket_window(),
        "posts": len(fake.calls_to("POST", "/channels/{channel_id}/messages")),
        "edits": len(fake.calls_to("PATCH", "/channels/{channel_id}/messages")),
        "typing": len(fake.calls_to("POST", "/channels/{channel_id}/typing")),
    }
    print("discord load:", json.dumps(numbers))
    (tmp_path / "discord-load.json").write_text(json.dumps(numbers))
    assert numbers["max_requests_in_any_second"] <= 50
    assert numbers["max_429_per_bucket_window"] <= 1

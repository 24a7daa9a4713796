"""Discord attachments: MESSAGE_CREATE with attachments -> discord.py adapter -> a
`sluice worker` process that downloads each from the fake's CDN (no token) -> the
simulator gets the image part and the file text -> one reply, with a notice for each
refused attachment."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import SecretStr
from redis.asyncio import Redis

from core.settings import Settings
from tests.discord.conftest import CHANNEL, DM_CHANNEL, running_adapter
from tests.discord.test_e2e import ALICE, _current, settled, until
from tests.fakes.discord_fake import DiscordFake
from tests.files.samples import BROKEN_PDF, png
from tests.helpers import Proc, settings_env


def file_settings(settings: Settings, fake: DiscordFake, **changes: Any) -> Settings:
    _current[:] = [fake]  # what test_e2e's helpers look at
    return settings.model_copy(
        update={
            "discord_token": SecretStr(fake.token),
            "discord_api_url": fake.api_url,
            "discord_stream_interval_s": 0.3,
            **changes,
        }
    )


def answer_with(fake: DiscordFake, marker: str) -> list[str]:
    return [m["content"] for m in fake.bot_messages() if marker in m["content"]]


def last_user_content(sim_requests: list[dict[str, Any]], marker: str) -> list[Any]:
    found = []
    for body in sim_requests:
        users = [m for m in body.get("messages", []) if m.get("role") == "user"]
        if users and marker in json.dumps(users[-1].get("content")):
            found.append(users[-1]["content"])
    return found


async def test_an_attachment_with_a_mention_reaches_the_model_as_an_image_part_and_text(
    fake: DiscordFake,
    settings: Settings,
    worker_process: Callable[..., Proc],
    llm_sim: Any,
    redis: Redis,
) -> None:
    s = file_settings(settings, fake, vision=True)
    worker_process(settings_env(s))
    attachments = [
        fake.add_attachment(CHANNEL, "diagram.png", png(320, 200), "image/png"),
        fake.add_attachment(CHANNEL, "todo.md", b"- ship the release", None),
    ]
    async with running_adapter(s, fake):
        await fake.send_user_message(
            CHANNEL, ALICE, "disc-marker-1 read these", mention_bot=True, attachments=attachments
        )
        await until(lambda: any("[image 320x200]" in c for c in answer_with(fake, "disc-marker-1")))
        await settled(redis, s)
    [content] = last_user_content(llm_sim.requests(), "disc-marker-1")
    assert [p["type"] for p in content] == ["text", "image_url"]
    assert "- ship the release" in content[0]["text"]
    # From the CDN, once each, and never with the bot token.
    assert sorted(f.key for f in fake.file_server.fetches) == sorted(a["id"] for a in attachments)
    assert all(f.authorization is None for f in fake.file_server.fetches)


async def test_a_dm_of_only_bad_attachments_gets_the_notices_without_calling_the_model(
    fake: DiscordFake,
    settings: Settings,
    worker_process: Callable[..., Proc],
    llm_sim: Any,
    redis: Redis,
) -> None:
    s = file_settings(settings, fake, file_max_bytes=500_000, discord_dm_policy="everyone")
    worker = worker_process(settings_env(s))
    dm = await fake.dm_channel(DM_CHANNEL, ALICE)
    attachments = [
        fake.add_attachment(dm, "scan.pdf", BROKEN_PDF, "application/pdf"),
        fake.add_attachment(dm, "big.log", b"x" * 2_000_000, "text/plain", size=10, chunked=True),
        fake.add_attachment(dm, "selfie.jpg", png(), "image/jpeg"),  # no vision
    ]
    async with running_adapter(s, fake):
        await fake.send_user_message(dm, ALICE, "", attachments=attachments)
        await until(lambda: bool(answer_with(fake, "selfie.jpg")))
        await settled(redis, s)
    [notice] = answer_with(fake, "selfie.jpg")
    assert "scan.pdf` could not be read" in notice
    assert "big.log` is too large (more than 500 KB" in notice
    assert "can't see images with this model, so I left `selfie.jpg` out" in notice
    assert "Echo:" not in notice
    assert not last_user_content(llm_sim.requests(), "scan.pdf")
    assert "Traceback" not in worker.output()

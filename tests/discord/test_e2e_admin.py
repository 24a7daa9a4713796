"""End to end on Discord: admins run ``/model`` and ``/listen`` through a real worker;
a reply to the bot with the ping off is answered.

discord.py adapter -> Redis queue -> ``sluice worker`` -> the fake's REST API; the
simulator logs the model each request asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from core.settings import Settings
from tests.discord.conftest import CHANNEL, GUILD, OTHER_CHANNEL, running_adapter
from tests.discord.test_e2e import replies, until
from tests.fakes.discord_fake import DiscordFake
from tests.helpers import Proc, settings_env

ADMIN = DiscordFake.user(640000000000000001, "admin")
MEMBER = DiscordFake.user(640000000000000002, "member")
MANAGERS = "410000000000000010"


@pytest.fixture
def e2e_settings(settings: Settings, fake: DiscordFake) -> Settings:
    """The harness's settings (simulator, unique prefix) pointed at the fake Discord."""
    return settings.model_copy(
        update={
            "discord_token": SecretStr(fake.token),
            "discord_api_url": fake.api_url,
            "discord_stream_interval_s": 0.3,
            "discord_message_content": True,
        }
    )


@pytest.fixture
def discord_worker(
    worker_process: Callable[..., Proc], e2e_settings: Settings
) -> Callable[..., Proc]:
    """Start a real ``sluice worker`` with the Discord settings and ``extra`` env."""

    def start(**extra: str) -> Proc:
        return worker_process({**settings_env(e2e_settings), **extra})

    return start


async def _answer(fake: DiscordFake, channel: str, sent: dict[str, Any], expect: str) -> str:
    """Wait until the bot's reply to ``sent`` holds ``expect`` (answers stream by edits)."""

    def text() -> str:
        got = [m for m in fake.bot_messages(channel) if _replies(m, sent)]
        return str(got[0]["content"]) if len(got) == 1 else ""

    await until(lambda: expect in text())
    return text()


def _replies(m: dict[str, Any], sent: dict[str, Any]) -> bool:
    ref = m.get("message_reference")
    return isinstance(ref, dict) and ref.get("message_id") == sent["id"]


async def test_server_manager_chooses_the_model_members_cannot(
    fake: DiscordFake,
    e2e_settings: Settings,
    discord_worker: Callable[..., Proc],
    redis: Redis,
    llm_sim,
) -> None:
    fake.add_role(GUILD, MANAGERS, permissions=1 << 5)  # Manage Server
    discord_worker(SLUICE_ALLOWED_MODELS="sim-small,sim-large")
    settings = e2e_settings
    async with running_adapter(settings, fake):
        sent = await fake.send_user_message(CHANNEL, MEMBER, "/model sim-small", mention_bot=True)
        await _answer(fake, CHANNEL, sent, "only admins can change the model")
        sent = await fake.send_user_message(
            CHANNEL, ADMIN, "/model sim-large", mention_bot=True, roles=[MANAGERS]
        )
        await _answer(fake, CHANNEL, sent, "is now `sim-large`")
        sent = await fake.send_user_message(CHANNEL, MEMBER, "which model?", mention_bot=True)
        await _answer(fake, CHANNEL, sent, "Echo: which model?")
        assert llm_sim.requests()[-1]["model"] == "sim-large"
        # Another channel of the server keeps the default.
        sent = await fake.send_user_message(OTHER_CHANNEL, MEMBER, "and here?", mention_bot=True)
        await _answer(fake, OTHER_CHANNEL, sent, "Echo: and here?")
        assert llm_sim.requests()[-1]["model"] == settings.model


async def test_listen_on_then_plain_messages_and_ping_off_replies_are_answered(
    fake: DiscordFake,
    e2e_settings: Settings,
    discord_worker: Callable[..., Proc],
    redis: Redis,
) -> None:
    fake.add_role(GUILD, MANAGERS, permissions=1 << 5)
    discord_worker()
    settings = e2e_settings
    async with running_adapter(settings, fake):
        sent = await fake.send_user_message(
            OTHER_CHANNEL, ADMIN, "/listen on", mention_bot=True, roles=[MANAGERS]
        )
        await _answer(fake, OTHER_CHANNEL, sent, "I now answer every message in this channel")
        plain = await fake.send_user_message(OTHER_CHANNEL, MEMBER, "no mention needed")
        await _answer(fake, OTHER_CHANNEL, plain, "Echo: no mention needed")
        [bot_msg] = await replies(fake, OTHER_CHANNEL, plain["id"])
        follow = await fake.send_user_message(
            CHANNEL, MEMBER, "a follow-up", reply_to=bot_msg, ping=False
        )
        await _answer(fake, CHANNEL, follow, "Echo: a follow-up")

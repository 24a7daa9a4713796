"""``/model``: admins choose the model per channel or tenant from SLUICE_ALLOWED_MODELS.

A real ``sluice worker`` answers through the web chat adapter; the simulator logs the
model each request asked for.
"""

from __future__ import annotations

import json

import aiohttp
import pytest

from core.infra.redis import Keys
from core.settings import Settings
from core.traffic.choices import Choices
from tests.webchat import ChatSession, web_adapter

ALLOWED = "sim-small,sim-large"


async def _ask(tab: ChatSession, text: str) -> str:
    done = await tab.reply(await tab.send(text))
    return str(done["text"])


async def test_admin_chooses_the_model_per_channel_and_tenant_others_are_refused(
    settings: Settings, llm_sim, worker_process
) -> None:
    async with (
        web_adapter(settings) as (base, _redis),
        aiohttp.ClientSession() as http,
        ChatSession(http, base) as admin,
        ChatSession(http, base) as user,
    ):
        worker_process(
            {
                "SLUICE_ALLOWED_MODELS": ALLOWED,
                "SLUICE_ADMIN_USERS": json.dumps([admin.session.user]),
            }
        )
        shown = await _ask(admin, "/model")
        assert f"`{settings.model}` (the default)" in shown
        assert "Allowed: `sim-small`, `sim-large`" in shown

        assert "Model for this channel is now `sim-large`" in await _ask(admin, "/model sim-large")
        await _ask(admin, "hello")
        assert llm_sim.requests()[-1]["model"] == "sim-large"

        refused = await _ask(admin, "/model gpt-99<@U1>")
        assert "is not an allowed model" in refused and "<@U1>" not in refused

        # Not an admin: may look, may not change.
        assert "only admins can change the model" in await _ask(user, "/model sim-small")
        await _ask(user, "hi")
        assert llm_sim.requests()[-1]["model"] == settings.model

        # The tenant's choice reaches every channel without its own.
        assert "is now `sim-small`" in await _ask(admin, "/model sim-small tenant")
        await _ask(user, "hi again")
        assert llm_sim.requests()[-1]["model"] == "sim-small"
        await _ask(admin, "and me?")
        assert llm_sim.requests()[-1]["model"] == "sim-large"  # the channel's choice wins
        assert "reset to the default" in await _ask(admin, "/model default")
        await _ask(admin, "now?")
        assert llm_sim.requests()[-1]["model"] == "sim-small"

        # A bare "model ..." is an ordinary message for the assistant.
        answer = await _ask(admin, "model sim-large")
        assert answer.startswith("Echo: model sim-large")


async def test_without_allowed_models_the_command_says_it_is_off(
    settings: Settings, llm_sim, worker_process
) -> None:
    async with (
        web_adapter(settings) as (base, _redis),
        aiohttp.ClientSession() as http,
        ChatSession(http, base) as admin,
    ):
        worker_process({"SLUICE_ADMIN_USERS": json.dumps([admin.session.user])})
        answer = await _ask(admin, "/model sim-large")
        assert "SLUICE_ALLOWED_MODELS" in answer
        await _ask(admin, "hello")
        assert llm_sim.requests()[-1]["model"] == settings.model


async def test_a_model_removed_from_the_allow_list_is_no_longer_used(redis, settings) -> None:
    keys = Keys(settings.key_prefix)
    before = Choices(redis, keys, ["sim-small", "sim-large"], "default-model")
    await before.set_model("slack", "T1", None, "sim-large")
    await before.set_model("slack", "T1", "C1", "sim-small")
    assert await before.model_for("slack", "T1", "C1") == "sim-small"
    assert await before.model_for("slack", "T1", "C2") == "sim-large"
    assert await before.model_for("slack", "T2", "C1") == "default-model"
    after = Choices(redis, keys, ["sim-large"], "default-model")
    assert await after.model_for("slack", "T1", "C1") == "sim-large"
    with pytest.raises(ValueError, match="not an allowed model"):
        await after.set_model("slack", "T1", "C1", "sim-small")
    await after.set_model("slack", "T1", None, None)
    assert await after.model_for("slack", "T1", "C1") == "default-model"

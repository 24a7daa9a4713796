"""``/model`` on Slack: the slash command, answered by a real worker; admins only.

Real slack_bolt adapter (signed HTTP requests) -> Redis -> ``sluice worker`` -> the fake
Slack Web API; the simulator logs the model each request asked for.
"""

from __future__ import annotations

import json

from tests.slack.conftest import mention, worker_env
from tests.slack.test_slack_e2e import wait_reply


def _slash(text: str, user: str, trigger: str) -> dict[str, str]:
    return {
        "command": "/model",
        "text": text,
        "team_id": "T1",
        "channel_id": "C1",
        "user_id": user,
        "trigger_id": trigger,
        "response_url": "http://127.0.0.1:9/r",
    }


async def test_slash_model_lets_admins_choose_the_channels_model(
    slack_settings, adapter, worker_process, fake_slack, llm_sim
):
    worker_process(
        {
            **worker_env(slack_settings),
            "SLUICE_ALLOWED_MODELS": "sim-small,sim-large",
            "SLUICE_ADMIN_USERS": json.dumps(["U1"]),
        }
    )
    async with adapter(slack_settings) as a:
        status, _ = await a.send.command(_slash("sim-small", "U2", "trig-1"))
        assert status == 200
        await wait_reply(fake_slack, "Sorry, only admins can change the model", slack_settings)
        status, _ = await a.send.command(_slash("sim-large", "U1", "trig-2"))
        assert status == 200
        await wait_reply(fake_slack, "Model for this channel is now `sim-large`", slack_settings)
        await a.send.event(mention("which model now?", "400.1", user="U2"))
        await wait_reply(fake_slack, "Echo: which model now?", slack_settings)
    assert llm_sim.requests()[-1]["model"] == "sim-large"

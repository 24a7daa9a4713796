"""`sluice dev` starts the Slack adapter too when Slack's tokens are set."""

from __future__ import annotations

from tests.fakes.slack_api import EventSender
from tests.helpers import Proc, base_env, free_port, settings_env
from tests.slack.conftest import SIGNING_SECRET, mention


async def test_dev_runs_the_slack_adapter_when_tokens_are_set(slack_settings, fake_slack, tmp_path):
    import aiohttp

    slack_port, web_port = free_port(), free_port()
    env = {**base_env(), **settings_env(slack_settings), "SLUICE_SLACK_PORT": str(slack_port)}
    proc = Proc(["dev", "--port", str(web_port)], env, tmp_path / "dev.log")
    try:
        proc.wait_for_output("slack:", timeout_s=30)
        url = f"http://127.0.0.1:{slack_port}/slack/events"
        assert url in proc.output()
        async with aiohttp.ClientSession() as http:
            send = EventSender(http, url, SIGNING_SECRET)
            status, _ = await send.event(mention("dev question", "500.1"))
            assert status == 200
            await fake_slack.wait_for(
                lambda: any(
                    m.text.startswith("Echo: dev question") and not m.streaming
                    for m in fake_slack.replies()
                ),
                timeout_s=20,
            )
    finally:
        proc.stop()

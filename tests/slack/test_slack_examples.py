"""The example bots on a platform: the FAQ bot answers through the fake Slack API,
calling its tool in a separate worker process."""

from __future__ import annotations

from tests.slack.conftest import mention, worker_env
from tests.slack.test_slack_e2e import wait_reply

FAQ_APP = "examples.faq_bot.bot:bot"


async def test_faq_example_answers_a_slack_mention_by_calling_its_tool(
    slack_settings, adapter, worker_process, fake_slack, llm_sim
):
    settings = slack_settings.model_copy(update={"app": FAQ_APP})
    worker_process({**worker_env(settings), "SLUICE_APP": FAQ_APP})
    async with adapter(settings) as a:
        question = 'How do I install it? [[tool:faq_lookup {"question": "install"}]]'
        await a.send.event(mention(question, "700.1"))
        [reply] = await wait_reply(fake_slack, "Echo: How do I install it?", settings)
    assert reply.channel == "C1" and reply.thread_ts == "700.1"
    assert "Tool result: Q: How do I install Sluice?" in reply.text
    offered = [t["function"]["name"] for t in llm_sim.requests()[0]["tools"]]
    assert offered == ["faq_lookup"]

"""Tenants kept apart, and hostile text carried end to end without live pings.

Two Slack workspaces use the same channel id and thread ts (ids are only unique within
a workspace): neither workspace's history, from the Redis hot window or from SQL, may
reach the other's prompt. Export and purge scoping is in
``tests/history/test_data_management.py``.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from core.history.store import count_rows, make_engine
from core.infra.redis import Keys
from core.messages import IncomingMessage
from tests.fakes.slack_api import FakeSlackAPI
from tests.helpers import settings_env, wait_jobs_done
from tests.helpers import unique_slack_ts as _ts
from tests.slack.conftest import mention, message

# Slack's live markup: <!channel>, <!here>, <!everyone>, <!subteam^…>, <@U…>, <#C…>.
# Live Slack markup: bracketed mentions, and broadcasts written without brackets.
_LIVE = re.compile(r"<[!@#]|@(?:here|channel|everyone)(?!\w)", re.IGNORECASE)


def _prompt_for(llm_sim, text: str) -> str:
    """Every message of the request whose last user message is ``text``, joined."""
    for req in reversed(llm_sim.requests()):
        msgs = req["messages"]
        if msgs[-1]["content"] == text:
            return "\n".join(str(m["content"]) for m in msgs)
    raise AssertionError(f"no request ended with {text!r}")


async def _answered(fake: FakeSlackAPI, prefix: str, timeout_s: float = 20.0) -> None:
    await fake.wait_for(
        lambda: [m for m in fake.replies() if m.text.startswith(prefix) and not m.streaming],
        timeout_s,
    )


async def _wait_rows(settings, n: int, timeout_s: float = 30.0) -> None:
    engine = make_engine(settings)
    try:
        deadline = time.monotonic() + timeout_s
        while (await count_rows(engine))[0] < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {n} rows in SQL")
            await asyncio.sleep(0.2)
    finally:
        await engine.dispose()


@pytest.mark.slow
async def test_same_channel_and_thread_ids_in_two_workspaces_never_share_history(
    slack_settings, adapter, worker_process, fake_slack, llm_sim, redis
):
    env = {**settings_env(slack_settings), "SLUICE_HISTORY_FLUSH_INTERVAL_S": "1"}
    worker_process(env)
    thread = _ts()
    secrets = {"T1": "PINEAPPLE-7731", "T2": "MANGO-4410"}
    async with adapter(slack_settings) as a:
        for team, secret in secrets.items():
            ev = mention(f"{team} says the code is {secret}", thread)
            await a.send.event(ev, team_id=team, event_id=f"Ev{team}{thread}")
            await _answered(fake_slack, f"Echo: {team} says")
        # Follow-ups in the "same" thread of each workspace see only their own turns.
        for team in secrets:
            ask = f"{team} asks for the code"
            await a.send.event(
                mention(ask, _ts(), thread_ts=thread), team_id=team, event_id=f"Ev{team}{_ts()}"
            )
            await _answered(fake_slack, f"Echo: {ask}")
        for team, secret in secrets.items():
            prompt = _prompt_for(llm_sim, f"{team} asks for the code")
            other = next(s for t, s in secrets.items() if t != team)
            assert secret in prompt and other not in prompt, team
        # Redis loses the hot windows: the context now comes from SQL, still per tenant.
        await _wait_rows(slack_settings, 8)
        for team in secrets:
            conv = IncomingMessage(
                platform="slack", tenant=team, channel="C1", thread=thread, user="U1",
                message_id="x", text="",
            ).conversation_id  # fmt: skip
            await redis.delete(Keys(slack_settings.key_prefix).history(conv))
        for team in secrets:
            ask = f"{team} asks again after the loss"
            await a.send.event(
                mention(ask, _ts(), thread_ts=thread), team_id=team, event_id=f"Ev{team}{_ts()}"
            )
            await _answered(fake_slack, f"Echo: {ask}")
    for team, secret in secrets.items():
        prompt = _prompt_for(llm_sim, f"{team} asks again after the loss")
        other = next(s for t, s in secrets.items() if t != team)
        assert secret in prompt and other not in prompt, team


async def test_another_users_dm_is_never_in_a_prompt(
    slack_settings, adapter, worker_process, fake_slack, llm_sim
):
    worker_process(settings_env(slack_settings))
    async with adapter(slack_settings) as a:
        await a.send.event(
            message("my password is HUNTER2-991", _ts(), channel="DALICE", user="UALICE",
                    channel_type="im"),
        )  # fmt: skip
        await _answered(fake_slack, "Echo: my password is")
        await a.send.event(
            message("what was the password?", _ts(), channel="DBOB", user="UBOB",
                    channel_type="im"),
        )  # fmt: skip
        await _answered(fake_slack, "Echo: what was the password?")
    assert "HUNTER2" not in _prompt_for(llm_sim, "what was the password?")


HOSTILE = (
    "@everyone @here <!channel> <!here> <!everyone> <!subteam^S0123|@devs> <@U0OTHER> "
    "<@&123456> <#C0SECRET> \u202eevil\u202c \u200bzero\u200dwidth \x07bell\x1b[31m "
    "مرحبا بالعالم \u2066isolated\u2069"
)


@pytest.mark.parametrize("where", ["thread", "dm"])
async def test_pings_control_and_bidi_text_echoed_by_the_model_never_ping_anyone_on_slack(
    slack_settings, adapter, worker_process, fake_slack, llm_sim, redis, where
):
    worker_process(settings_env(slack_settings))
    ts = _ts()
    async with adapter(slack_settings) as a:
        if where == "thread":
            ev = mention(HOSTILE, ts)
        else:
            ev = message(HOSTILE, ts, channel="DHOST", channel_type="im")
        assert (await a.send.event(ev))[0] == 200
        # "@everyone" arrives broken by a zero-width space (bots/slack/format.py).
        await _answered(fake_slack, "Echo: @\u200beveryone")
        await wait_jobs_done(redis, slack_settings, 60)  # the reply is complete
    # The model saw the text as the user wrote it (the simulator echoes it back) ...
    prompt = _prompt_for(llm_sim, HOSTILE)
    assert "<!channel>" in prompt and "\u202e" in prompt and "\u200b" in prompt
    # ... and nothing the bot sent to Slack is live markup.
    sent = [
        str(c.params.get(k))
        for c in fake_slack.calls
        for k in ("text", "markdown_text")
        if c.params.get(k)
    ]
    assert sent and not [s for s in sent if _LIVE.search(s)]
    [reply] = [m for m in fake_slack.replies() if not m.streaming]
    assert "مرحبا" in reply.text and "everyone" in reply.text
    assert not _LIVE.search(reply.text)

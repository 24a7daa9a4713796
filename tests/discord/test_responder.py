"""The worker-side responder against the fake Discord REST API (no gateway)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from bots.discord.responder import DiscordResponderFactory
from bots.discord.split import FENCE
from core.errors import DeliveryRetryableError
from core.messages import IncomingMessage, Reply
from core.settings import Settings
from tests.discord.conftest import CHANNEL, GUILD
from tests.fakes.discord_fake import DiscordFake
from tests.helpers import free_port

USER_MSG = "700000000000000001"


@pytest.fixture
async def factory(
    discord_settings: Settings, redis: Redis
) -> AsyncIterator[DiscordResponderFactory]:
    f = DiscordResponderFactory(discord_settings, redis)
    await f.start()
    yield f
    await f.close()


@pytest.fixture(autouse=True)
def user_message(fake: DiscordFake) -> None:
    """The user's message the replies refer to."""
    fake.messages[USER_MSG] = {
        "id": USER_MSG,
        "channel_id": CHANNEL,
        "guild_id": GUILD,
        "author": DiscordFake.user(1, "u"),
        "content": "q",
    }


def incoming(message_id: str = USER_MSG, **meta: str) -> IncomingMessage:
    return IncomingMessage(
        platform="discord",
        tenant=GUILD,
        channel=CHANNEL,
        user="1",
        message_id=message_id,
        text="q",
        meta=meta or {"reply_to": message_id},
    )


async def answer(
    factory: DiscordResponderFactory,
    msg: IncomingMessage,
    chunks: list[str],
    job_id: str | None = None,
) -> None:
    """What the reply job does: begin, stream the text so far, finish."""
    responder = factory.responder(msg, job_id or msg.job_id)
    await responder.begin()
    text = ""
    for chunk in chunks:
        text += chunk
        await responder.stream(text)
    await responder.finish(Reply(text=text))


async def test_reply_is_a_discord_reply_streamed_by_edits_without_mentions(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    await answer(factory, incoming(), ["Hello", " there", ", @everyone and <@&400000000000000001>"])
    [msg] = fake.bot_messages(CHANNEL)
    assert msg["content"] == "Hello there, @everyone and <@&400000000000000001>"
    assert msg["message_reference"]["message_id"] == USER_MSG
    assert msg["edits"] >= 1 and msg["edit_history"][0] == "Hello"
    sends = fake.calls_to("POST", "/channels/{channel_id}/messages") + fake.calls_to(
        "PATCH", "/channels/{channel_id}/messages"
    )
    assert sends and all(c.body["allowed_mentions"] == {"parse": []} for c in sends)


async def test_a_retried_job_never_posts_twice(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    msg = incoming()
    await answer(factory, msg, ["first try"])
    await answer(factory, msg, ["second try"])  # the same job id run again
    assert [m["content"] for m in fake.bot_messages(CHANNEL)] == ["first try"]


async def test_a_job_that_died_after_posting_edits_its_message_on_retry(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    msg = incoming()
    first = factory.responder(msg, msg.job_id)
    await first.begin()
    await first.stream("partial answ")  # ... and the worker dies here
    await answer(factory, msg, ["complete answer"])
    [posted] = fake.bot_messages(CHANNEL)
    assert posted["content"] == "complete answer"


async def test_long_answer_with_code_arrives_as_several_messages_with_intact_code(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    code = "```python\n" + "".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(120))
    text = (
        "Intro paragraph.\n\n"
        + "Some prose here. " * 120
        + "\n\n"
        + code
        + "```\n\n"
        + "Between.\n\n```js\n"
        + "console.log(1);\n" * 150
        + "```\nThe end."
    )
    text = text[:9000] if len(text) > 9000 else text + "\n\n" + "x " * ((9000 - len(text)) // 2)
    assert len(text) >= 8990
    await answer(factory, incoming(), [text[:3000], text[3000:]])
    posted = fake.bot_messages(CHANNEL)
    assert len(posted) >= 5
    for m in posted:
        assert len(m["content"]) <= 2000
        assert (
            sum(1 for line in m["content"].splitlines() if line.strip().startswith(FENCE)) % 2 == 0
        ), m["content"]
    assert posted[0]["message_reference"]["message_id"] == USER_MSG
    assert all("message_reference" not in m for m in posted[1:])
    joined = "".join(m["content"] for m in posted)
    assert "def f119(x):" in joined and joined.rstrip().endswith("x")


async def test_403_on_send_is_logged_with_the_channel_and_not_retried(
    factory: DiscordResponderFactory, fake: DiscordFake, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail("POST", r"/channels/\d+/messages$", 403, times=10)
    with caplog.at_level(logging.ERROR, logger="bots.discord.responder"):
        await answer(factory, incoming(), ["nope"])
    assert len(fake.calls_to("POST", "/channels/{channel_id}/messages")) == 1
    assert any(CHANNEL in r.getMessage() and "403" in r.getMessage() for r in caplog.records)


async def test_5xx_on_send_is_retried_and_then_delivered(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    fake.fail("POST", r"/channels/\d+/messages$", 502, times=2)
    await answer(factory, incoming(), ["after a hiccup"])
    assert [m["content"] for m in fake.bot_messages(CHANNEL)] == ["after a hiccup"]
    statuses = [c.status for c in fake.calls_to("POST", "/channels/{channel_id}/messages")]
    assert statuses == [502, 502, 200]


async def test_persistent_5xx_raises_retryable_after_bounded_retries_and_logs(
    factory: DiscordResponderFactory,
    fake: DiscordFake,
    discord_settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.fail("POST", r"/channels/\d+/messages$", 500, times=100)
    with (
        caplog.at_level(logging.WARNING, logger="bots.discord.responder"),
        pytest.raises(DeliveryRetryableError),
    ):
        await answer(factory, incoming(), ["lost"])
    tries = len(fake.calls_to("POST", "/channels/{channel_id}/messages"))
    # One best-effort try while streaming, then the final send with its retries.
    assert tries == 1 + discord_settings.discord_retries + 1
    assert any(CHANNEL in r.getMessage() for r in caplog.records)
    assert fake.bot_messages(CHANNEL) == []


async def test_a_retried_finish_after_5xx_completes_the_same_message(
    factory: DiscordResponderFactory, fake: DiscordFake, discord_settings: Settings
) -> None:
    msg = incoming()
    first = factory.responder(msg, msg.job_id)
    await first.begin()
    await first.stream("the answer so")  # posted while streaming
    [posted] = fake.bot_messages(CHANNEL)
    fake.fail(
        "PATCH", r"/channels/\d+/messages/\d+$", 503, times=discord_settings.discord_retries + 1
    )
    with pytest.raises(DeliveryRetryableError):
        await first.finish(Reply(text="the answer so far, complete"))
    # A later try of the job (a new responder, as on a re-run) finishes the same message.
    again = factory.responder(msg, msg.job_id)
    await again.begin()
    await again.finish(Reply(text="the answer so far, complete"))
    assert [m["content"] for m in fake.bot_messages(CHANNEL)] == ["the answer so far, complete"]
    assert fake.bot_messages(CHANNEL)[0]["id"] == posted["id"]
    assert len(fake.calls_to("POST", "/channels/{channel_id}/messages")) == 1


async def test_ask_edits_the_deferred_response_and_adds_followups(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    inter = await fake.invoke_ask(CHANNEL, DiscordFake.user(1, "u"), "q")
    inter.callback_type = 5  # deferred by the adapter
    msg = incoming(inter.id, interaction_token=inter.token, application_id=fake.application_id)
    await answer(factory, msg, ["short", " then " + "long " * 500])
    assert inter.original is not None
    assert inter.original["content"].startswith("short then")
    assert len(inter.followups) == 1
    webhook_calls = [c for c in fake.calls if c.route.split(" ", 1)[1].startswith("/webhooks/")]
    assert all(
        c.body["allowed_mentions"] == {"parse": []}
        for c in webhook_calls
        if c.method in ("PATCH", "POST")
    )


async def test_typing_is_shown_while_the_answer_is_prepared(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    responder = factory.responder(incoming(), incoming().job_id)
    await responder.begin()
    await asyncio.sleep(0.1)
    await responder.finish(Reply(text="done"))
    assert len(fake.calls_to("POST", "/channels/{channel_id}/typing")) == 1


async def test_a_streamed_message_deleted_before_the_end_is_posted_again(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    msg = incoming()
    responder = factory.responder(msg, msg.job_id)
    await responder.begin()
    await responder.stream("draft")
    [draft] = fake.bot_messages(CHANNEL)
    del fake.messages[draft["id"]]  # a moderator deleted it
    await responder.finish(Reply(text="final"))
    assert [m["content"] for m in fake.bot_messages(CHANNEL)] == ["final"]


# --- the queued notice -----------------------------------------------------------------


def _message_posts(fake: DiscordFake) -> int:
    return len(fake.calls_to("POST", "/channels/{channel_id}/messages"))


async def test_queued_notice_is_posted_then_edited_into_the_answer(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    msg = incoming()
    responder = factory.responder(msg, msg.job_id)
    await responder.begin()
    await responder.queued(40.3)
    [notice] = fake.bot_messages(CHANNEL)
    assert notice["content"] == "⏳ Queued: about 40 s"
    assert notice["message_reference"]["message_id"] == USER_MSG
    await responder.stream("Hello")
    await responder.finish(Reply(text="Hello there."))
    [reply] = fake.bot_messages(CHANNEL)
    assert reply["id"] == notice["id"]
    assert reply["content"] == "Hello there."
    assert fake.messages[reply["id"]]["edit_history"][0] == "⏳ Queued: about 40 s"
    assert _message_posts(fake) == 1


async def test_queued_notice_of_the_notify_job_is_reused_by_the_reply_job(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    msg = incoming()
    await factory.responder(msg, msg.job_id).queued(150)  # notify_queued's own responder
    [notice] = fake.bot_messages(CHANNEL)
    assert notice["content"] == "⏳ Queued: about 2 min"
    await answer(factory, msg, ["The ", "answer."])
    [reply] = fake.bot_messages(CHANNEL)
    assert (reply["id"], reply["content"]) == (notice["id"], "The answer.")
    assert _message_posts(fake) == 1


async def test_notice_posted_after_the_reply_began_is_still_the_one_message(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    msg = incoming()
    reply_job = factory.responder(msg, msg.job_id)
    await reply_job.begin()  # read an empty state
    await factory.responder(msg, msg.job_id).queued(30)  # the notify job runs late
    await reply_job.finish(Reply(text="done"))
    [reply] = fake.bot_messages(CHANNEL)
    assert reply["content"] == "done"
    assert fake.messages[reply["id"]]["edit_history"] == ["⏳ Queued: about 30 s", "done"]


async def test_queued_after_the_answer_posts_and_changes_nothing(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    msg = incoming()
    await answer(factory, msg, ["an answer"])
    calls = len(fake.calls)
    await factory.responder(msg, msg.job_id).queued(30)
    [reply] = fake.bot_messages(CHANNEL)
    assert reply["content"] == "an answer"
    assert len(fake.calls) == calls


async def test_queued_ask_shows_the_notice_in_the_deferred_response_then_the_answer(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    inter = await fake.invoke_ask(CHANNEL, DiscordFake.user(1, "u"), "q")
    inter.callback_type = 5
    msg = incoming(inter.id, interaction_token=inter.token, application_id=fake.application_id)
    await factory.responder(msg, msg.job_id).queued(20)
    assert inter.original is not None
    assert inter.original["content"] == "⏳ Queued: about 20 s"
    await answer(factory, msg, ["the", " answer"])
    assert inter.original["content"] == "the answer"
    assert not inter.followups
    await factory.responder(msg, msg.job_id).queued(20)  # too late: nothing changes
    assert inter.original["content"] == "the answer"


async def test_withdrawn_notice_of_a_merged_message_is_deleted_and_not_posted_again(
    factory: DiscordResponderFactory, fake: DiscordFake
) -> None:
    msg = incoming()
    await factory.responder(msg, msg.job_id).queued(30)
    assert len(fake.bot_messages(CHANNEL)) == 1
    await factory.responder(msg, msg.job_id).withdraw_queued()  # merged into a later reply
    assert not fake.bot_messages(CHANNEL)
    await factory.responder(msg, msg.job_id).queued(30)  # a late notify job
    assert not fake.bot_messages(CHANNEL)
    assert _message_posts(fake) == 1


async def test_unreadable_delivery_state_fails_the_try_retryably_and_posts_nothing(
    discord_settings: Settings, fake: DiscordFake
) -> None:
    """One policy with Slack's (core.responder.DeliveryState): a responder that cannot
    read what it already posted does not post; the job tries again later."""
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    f = DiscordResponderFactory(discord_settings, dead)
    try:
        responder = f.responder(incoming(), incoming().job_id)
        with pytest.raises(DeliveryRetryableError, match="cannot read delivery state"):
            await responder.begin()
        with pytest.raises(DeliveryRetryableError, match="cannot read delivery state"):
            await responder.finish(Reply(text="an answer"))
    finally:
        await f.close()
        await dead.aclose()
    assert fake.bot_messages(CHANNEL) == []

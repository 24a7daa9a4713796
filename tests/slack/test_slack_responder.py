"""The worker side: the Slack responder against the fake Web API (real slack_sdk, real Redis)."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator

import pytest

from bots.slack.format import ZWSP
from bots.slack.responder import SERVER_ERROR_RETRIES, SlackResponderFactory
from core.errors import DeliveryError, DeliveryRetryableError
from core.messages import IncomingMessage, Reply
from tests.slack.conftest import TEAM


@pytest.fixture
async def factory(slack_settings, redis) -> AsyncIterator[SlackResponderFactory]:
    f = SlackResponderFactory(slack_settings, redis)
    await f.start()
    try:
        yield f
    finally:
        await f.close()


def msg(
    ts: str, *, channel: str = "C1", thread: str | None = None, kind: str = "mention", **meta: str
) -> IncomingMessage:
    m = {"kind": kind, "recipient_user_id": "U1", **meta}
    if thread:
        m["reply_thread"] = thread
    return IncomingMessage(
        platform="slack",
        tenant=TEAM,
        channel=channel,
        thread=thread,
        user="U1",
        message_id=f"{channel}:{ts}",
        text="q",
        is_dm=channel.startswith("D"),
        meta=m,
    )


async def deliver(
    factory, m: IncomingMessage, pieces: list[str], final: str | None = None, gap_s: float = 0.0
) -> None:
    import asyncio

    r = factory.responder(m, m.job_id)
    await r.begin()
    text = ""
    for piece in pieces:
        text += piece
        await r.stream(text)
        if gap_s:
            await asyncio.sleep(gap_s)
    await r.finish(Reply(text=final if final is not None else text))


async def test_thread_reply_is_streamed_natively(factory, fake_slack):
    await deliver(factory, msg("1.1", thread="1.1"), ["Hello", " there", ", friend."], gap_s=0.35)
    [reply] = fake_slack.replies("C1")
    assert reply.text == "Hello there, friend."
    assert reply.thread_ts == "1.1"
    assert not reply.streaming
    start = fake_slack.calls_of("chat.startStream")[0]
    assert start.params["recipient_user_id"] == "U1"
    assert start.params["recipient_team_id"] == TEAM
    assert fake_slack.calls_of("chat.appendStream")
    assert len(fake_slack.calls_of("chat.stopStream")) == 1
    assert not fake_slack.calls_of("chat.postMessage")


async def test_top_level_dm_is_posted_then_edited_at_most_once_per_interval(
    factory, fake_slack, slack_settings
):
    pieces = [f"word{i} " for i in range(40)]
    started = time.monotonic()
    await deliver(factory, msg("2.1", channel="D1", kind="dm"), pieces, gap_s=0.02)
    [reply] = fake_slack.replies("D1")
    assert reply.text == "".join(pieces)
    assert reply.thread_ts is None
    edits = fake_slack.calls_of("chat.update")
    assert len(fake_slack.calls_of("chat.postMessage")) == 1
    # One post, then edits no closer together than the interval (pacing in Redis).
    times = [fake_slack.calls_of("chat.postMessage")[0].at] + [c.at for c in edits]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= slack_settings.slack_edit_interval_s * 0.9
    assert len(edits) <= (time.monotonic() - started) / slack_settings.slack_edit_interval_s + 1


async def test_markdown_is_posted_as_markdown_text_and_mentions_are_defused(factory, fake_slack):
    await deliver(
        factory,
        msg("3.1", channel="D1", kind="dm"),
        [],
        final="**Bold** and [docs](https://example.com) <!channel> <@U2> @here `a < b`",
    )
    [reply] = fake_slack.replies("D1")
    assert reply.markdown
    assert reply.text == (
        f"**Bold** and [docs](https://example.com) <{ZWSP}!channel> <{ZWSP}@U2> @{ZWSP}here `a < b`"
    )
    [post] = fake_slack.calls_of("chat.postMessage")
    assert "text" not in post.params and post.params["markdown_text"] == reply.text


async def test_stream_closed_by_slack_falls_back_to_chat_update(factory, fake_slack):
    fake_slack.close_streams_after_appends = 1
    await deliver(factory, msg("4.1", thread="4.1"), ["one ", "two ", "three ", "four"], gap_s=0.35)
    [reply] = fake_slack.replies("C1")
    assert reply.text == "one two three four"
    assert fake_slack.calls_of("chat.update")


async def test_workspace_without_streaming_gets_an_edited_message(factory, fake_slack):
    fake_slack.stream_error = "not_allowed"
    await deliver(factory, msg("5.1", thread="5.1"), ["Hi", " you"])
    [reply] = fake_slack.replies("C1")
    assert reply.text == "Hi you"
    assert reply.thread_ts == "5.1"
    assert len(fake_slack.calls_of("chat.postMessage")) == 1


async def test_429_on_post_and_update_is_waited_out_and_reply_arrives_once(factory, fake_slack):
    fake_slack.fail("chat.postMessage", status=429, retry_after_s=1, times=2)
    fake_slack.fail("chat.update", status=429, retry_after_s=1, times=1)
    started = time.monotonic()
    await deliver(factory, msg("6.1", channel="D1", kind="dm"), ["a", "b"], final="ab!")
    [reply] = fake_slack.replies("D1")
    assert reply.text == "ab!"
    assert time.monotonic() - started >= 2.0  # two Retry-After: 1 waits before the post
    assert len(fake_slack.calls_of("chat.postMessage")) == 3  # two 429s, one success


async def test_5xx_is_retried(factory, fake_slack):
    fake_slack.fail(
        "chat.postMessage", status=503, retry_after_s=None, times=2, error="service_unavailable"
    )
    await deliver(factory, msg("7.1", channel="D1", kind="dm"), [], final="ok")
    assert [r.text for r in fake_slack.replies("D1")] == ["ok"]


async def test_progress_update_failing_past_retries_does_not_lose_the_answer(factory, fake_slack):
    fake_slack.fail(
        "chat.appendStream",
        status=500,
        error="internal_error",
        retry_after_s=None,
        times=SERVER_ERROR_RETRIES + 1,
    )
    await deliver(factory, msg("7.2", thread="7.2"), ["one ", "two ", "three"], gap_s=0.35)
    [reply] = fake_slack.replies("C1")
    assert reply.text == "one two three" and not reply.streaming
    assert len(fake_slack.calls_of("chat.appendStream")) == SERVER_ERROR_RETRIES + 1


async def test_final_edit_failing_past_retries_raises_and_a_retried_finish_edits_once(
    factory, fake_slack
):
    m = msg("7.3", channel="D1", kind="dm")
    first = factory.responder(m, m.job_id)
    await first.begin()
    await first.stream("the answer so")  # posted
    fake_slack.fail(
        "chat.update",
        status=503,
        error="service_unavailable",
        retry_after_s=None,
        times=SERVER_ERROR_RETRIES + 1,
    )
    with pytest.raises(DeliveryRetryableError):
        await first.finish(Reply(text="the answer so far, complete"))
    again = factory.responder(m, m.job_id)  # the job's next try
    await again.begin()
    await again.finish(Reply(text="the answer so far, complete"))
    [reply] = fake_slack.replies("D1")
    assert reply.text == "the answer so far, complete"
    assert len(fake_slack.calls_of("chat.postMessage")) == 1


async def test_rerun_job_edits_its_message_instead_of_posting_again(factory, fake_slack):
    m = msg("8.1", thread="8.1")
    first = factory.responder(m, m.job_id)
    await first.begin()
    await first.stream("partial answer")  # the worker dies here
    second = factory.responder(m, m.job_id)
    await second.begin()
    await second.stream("partial answer, now longer")
    await second.finish(Reply(text="the whole answer"))
    third = factory.responder(m, m.job_id)  # a third try after delivery: nothing new
    await third.begin()
    await third.finish(Reply(text="the whole answer"))
    [reply] = fake_slack.replies("C1")
    assert reply.text == "the whole answer"
    assert len(fake_slack.calls_of("chat.startStream")) == 1
    assert not fake_slack.calls_of("chat.postMessage")


async def test_long_reply_is_split_into_parts_in_the_thread(factory, fake_slack, slack_settings):
    paragraph = "lorem ipsum dolor sit amet " * 20
    text = "\n\n".join([paragraph] * 30)  # about 16,000 characters: two parts
    await deliver(factory, msg("9.1", thread="9.1"), [text[:500], text], final=text)
    replies = fake_slack.replies("C1")
    assert len(replies) >= 2
    assert all(len(r.text) <= slack_settings.slack_message_limit for r in replies)
    assert all(r.thread_ts == "9.1" for r in replies)
    joined = " ".join(r.text for r in replies)
    assert joined.split() == text.split()


async def test_retried_long_reply_does_not_repost_parts(factory, fake_slack):
    text = "\n\n".join(["x" * 11000] * 3)
    m = msg("10.1", channel="D1", kind="dm")
    await deliver(factory, m, [], final=text)
    posts = len(fake_slack.calls_of("chat.postMessage"))
    # arq re-runs the job after delivery (e.g. the worker died before recording the
    # result): the responder knows it already posted everything.
    await deliver(factory, m, [], final=text)
    assert len(fake_slack.calls_of("chat.postMessage")) == posts == 3


async def test_ask_command_without_channel_access_answers_via_response_url(
    factory, fake_slack, response_sink
):
    fake_slack.fail("chat.postMessage", status=200, retry_after_s=None, error="not_in_channel")
    m = msg("11.1", channel="C9", kind="command", response_url=response_sink.url("a"))
    await deliver(factory, m, ["thinking"], final="the answer")
    assert [p["text"] for p in response_sink.posts] == ["the answer"]
    assert response_sink.posts[0]["response_type"] == "in_channel"
    assert response_sink.posts[0]["blocks"] == [{"type": "markdown", "text": "the answer"}]


async def test_unknown_token_is_a_delivery_error(slack_settings, redis, fake_slack):
    from pydantic import SecretStr

    bad = slack_settings.model_copy(update={"slack_bot_token": SecretStr("xoxb-nope")})
    f = SlackResponderFactory(bad, redis)
    await f.start()
    try:
        with pytest.raises(DeliveryError):
            await deliver(f, msg("12.1", channel="D1", kind="dm"), [], final="x")
    finally:
        await f.close()


async def test_apology_after_a_partial_stream_replaces_the_partial_text(factory, fake_slack):
    m = msg("13.1", thread="13.1")
    r = factory.responder(m, m.job_id)
    await r.begin()
    await r.stream("The answer starts like th")
    await r.finish(Reply(text="Sorry, I couldn't answer that just now.", kind="error"))
    [reply] = fake_slack.replies("C1")
    assert reply.text == "Sorry, I couldn't answer that just now."
    assert not reply.streaming


async def test_workspace_update_budget_limits_intermediate_edits(slack_settings, redis, fake_slack):
    settings = slack_settings.model_copy(
        update={"slack_updates_per_minute": 2, "slack_edit_interval_s": 0.05}
    )
    f = SlackResponderFactory(settings, redis)
    await f.start()
    first_minute = int(time.time() // 60)
    try:
        await deliver(
            f, msg("14.1", channel="D1", kind="dm"), [f"w{i} " for i in range(30)], gap_s=0.06
        )
    finally:
        await f.close()
    # The budget is per clock minute: a delivery that crossed into the next minute had
    # a second one.
    windows = int(time.time() // 60) - first_minute + 1
    [reply] = fake_slack.replies("D1")
    assert reply.text == "".join(f"w{i} " for i in range(30))
    # The post counts as one use of the budget, one intermediate edit, then only the final.
    assert len(fake_slack.calls_of("chat.update")) <= 2 * windows


# --- the queued notice -----------------------------------------------------------------


async def test_queued_notice_is_posted_then_edited_into_the_answer(factory, fake_slack):
    m = msg("20.1", thread="20.1")
    r = factory.responder(m, m.job_id)
    await r.begin()
    await r.queued(40.3)
    [notice] = fake_slack.replies("C1")
    assert notice.text == "⏳ Queued: about 40 s"
    assert notice.thread_ts == "20.1"
    await r.stream("Hello")
    await r.finish(Reply(text="Hello there."))
    [reply] = fake_slack.replies("C1")
    assert reply.ts == notice.ts
    assert reply.text == "Hello there."
    # The notice was posted, then the answer replaced it by edits, not a new stream.
    assert [c.params["text"] for c in fake_slack.calls_of("chat.postMessage")] == [
        "⏳ Queued: about 40 s"
    ]
    assert fake_slack.calls_of("chat.update")[-1].params["markdown_text"] == "Hello there."
    assert reply.markdown
    assert not fake_slack.calls_of("chat.startStream")


async def test_queued_notice_of_the_notify_job_is_reused_by_the_reply_job(factory, fake_slack):
    m = msg("21.1", thread="21.1")
    notify = factory.responder(m, m.job_id)  # the notify_queued job's own responder
    await notify.queued(150)
    [notice] = fake_slack.replies("C1")
    assert notice.text == "⏳ Queued: about 2 min"
    await deliver(factory, m, ["The ", "answer"], final="The answer.")
    [reply] = fake_slack.replies("C1")
    assert (reply.ts, reply.text) == (notice.ts, "The answer.")
    assert len(fake_slack.calls_of("chat.postMessage")) == 1


async def test_notice_posted_after_the_reply_began_is_still_the_one_message(factory, fake_slack):
    m = msg("22.1", channel="D1", kind="dm")
    reply_job = factory.responder(m, m.job_id)
    await reply_job.begin()  # loads an empty state
    await factory.responder(m, m.job_id).queued(30)  # the notify job runs late
    await reply_job.finish(Reply(text="done"))
    assert [r.text for r in fake_slack.replies("D1")] == ["done"]
    assert len(fake_slack.calls_of("chat.postMessage")) == 1


async def test_queued_after_the_answer_posts_and_changes_nothing(factory, fake_slack):
    m = msg("23.1", channel="D1", kind="dm")
    await deliver(factory, m, ["an"], final="an answer")
    calls = len(fake_slack.calls)
    await factory.responder(m, m.job_id).queued(30)
    assert [r.text for r in fake_slack.replies("D1")] == ["an answer"]
    assert len(fake_slack.calls) == calls


async def test_queued_in_an_assistant_thread_sets_the_status_and_the_answer_streams(
    factory, fake_slack
):
    m = msg("25.1", thread="25.1", assistant="1")
    await factory.responder(m, m.job_id).queued(12)
    assert not fake_slack.replies("C1")
    [status] = fake_slack.calls_of("assistant.threads.setStatus")
    assert status.params["status"] == "is queued: about 12 s"
    await deliver(factory, m, ["Hi"], final="Hi!")
    [reply] = fake_slack.replies("C1")
    assert reply.text == "Hi!"
    assert fake_slack.calls_of("chat.startStream")


async def test_queued_for_a_command_answered_via_response_url_posts_nothing(
    factory, fake_slack, response_sink
):
    fake_slack.fail(
        "chat.postMessage", status=200, retry_after_s=None, error="not_in_channel", times=2
    )
    m = msg("26.1", channel="C9", kind="command", response_url=response_sink.url("b"))
    await factory.responder(m, m.job_id).queued(30)
    await deliver(factory, m, [], final="the answer")
    assert [p["text"] for p in response_sink.posts] == ["the answer"]
    assert not fake_slack.replies("C9")
    calls = len(fake_slack.calls)
    await factory.responder(m, m.job_id).queued(30)  # after the answer: nothing at all
    assert len(fake_slack.calls) == calls
    assert len(response_sink.posts) == 1


async def test_withdrawn_notice_of_a_merged_message_is_deleted_and_not_posted_again(
    factory, fake_slack
):
    m = msg("27.1", channel="D1", kind="dm")
    await factory.responder(m, m.job_id).queued(30)
    assert len(fake_slack.replies("D1")) == 1
    await factory.responder(m, m.job_id).withdraw_queued()  # merged into a later reply
    assert not fake_slack.replies("D1")
    await factory.responder(m, m.job_id).queued(30)  # a late notify job
    assert not fake_slack.replies("D1")
    assert len(fake_slack.calls_of("chat.postMessage")) == 1


async def test_notify_queued_job_posts_the_notice_that_the_reply_job_edits(
    slack_settings, redis, fake_slack
):
    import asyncio

    from workers.traffic_jobs import notify_queued

    ctx = {
        "responders": {},
        "responders_lock": asyncio.Lock(),
        "settings": slack_settings,
        "redis": redis,
    }
    m = msg("28.1", channel="D1", kind="dm")
    await notify_queued(ctx, m.model_dump(mode="json"), 95)
    try:
        assert [r.text for r in fake_slack.replies("D1")] == ["⏳ Queued: about 2 min"]
        await deliver(ctx["responders"]["slack"], m, ["a"], final="the answer")
    finally:
        await ctx["responders"]["slack"].close()
    assert [r.text for r in fake_slack.replies("D1")] == ["the answer"]
    assert len(fake_slack.calls_of("chat.postMessage")) == 1

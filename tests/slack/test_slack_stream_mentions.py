"""Mentions the model writes stay inert over the whole streamed text.

Slack's native stream receives the answer in deltas (``chat.startStream`` →
``appendStream`` → ``stopStream``); what Slack finally shows is their
concatenation. Escaping each delta on its own let ``<`` at the end of one delta and
``!channel>`` at the start of the next join into a live ``<!channel>``; the responder
now holds such a tail back until the next delta (``stream_cut``). These tests
cut texts full of mentions at every position (and at random sets of positions),
deliver the pieces through the real :class:`SlackResponder` and real ``slack_sdk``
against the fake Web API, and check what Slack holds at the end.
"""

from __future__ import annotations

import html
import itertools
import re
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bots.slack.format import ZWSP, safe_markdown, stream_cut
from bots.slack.responder import SlackResponderFactory
from core.messages import IncomingMessage, Reply
from core.settings import Settings
from tests.fakes.slack_api import FakeSlackAPI
from tests.fuzz.strategies import fuzz
from tests.slack.conftest import TEAM, worker_env
from tests.slack.conftest import mention as mention_event

# Slack's live markup: <!channel>, <!here>, <!everyone>, <!subteam^…>, <!date…>, <@U…>, <#C…>,
# and the bracketless broadcasts @here, @channel, @everyone.
LIVE = re.compile(r"<[!@#&]|@(?:here|channel|everyone)\b", re.IGNORECASE)

MENTIONS = [
    "<!channel>",
    "<!here>",
    "<!everyone>",
    "<@U024BE7LH>",
    "<@W9|bob>",
    "<#C42>",
    "<#C42|general>",
    "<!subteam^S123|@team>",
    "<!date^1392734382^{date}|Feb 18>",
]
# Mentions, the bits they are made of, and plain words: cut anywhere, glued anywhere.
TOKENS = st.sampled_from(
    [
        *MENTIONS,
        *["<", ">", "!", "@", "#", "&", "&lt;", "&#60;", "!channel>", "@U1>", "hi", " ", "\n"],
        *["@here", "@", "he", "re", "@everyone", "every", "one", "@channel", "chan", "nel"],
    ]
)
MENTION_TEXT = st.lists(TOKENS, min_size=1, max_size=25).map("".join).filter(str.strip)

EVERY_MENTION = "Team: " + " and ".join(MENTIONS) + " <<!here>> @here @Channel end <"

_ts = itertools.count(1)


@pytest.fixture
def stream_settings(slack_settings: Settings) -> Settings:
    # No pacing: every delta really becomes its own appendStream call.
    return slack_settings.model_copy(update={"slack_edit_interval_s": 0.0})


@pytest.fixture
async def factory(stream_settings: Settings, redis) -> AsyncIterator[SlackResponderFactory]:
    f = SlackResponderFactory(stream_settings, redis)
    await f.start()
    try:
        yield f
    finally:
        await f.close()


def _msg(*, thread: bool) -> IncomingMessage:
    n = next(_ts)
    ts = f"{n}.5"
    channel = "C1" if thread else f"D{n}"  # one DM per reply: its only message
    meta = {"kind": "mention" if thread else "dm", "recipient_user_id": "U1"}
    if thread:
        meta["reply_thread"] = ts
    return IncomingMessage(
        platform="slack",
        tenant=TEAM,
        channel=channel,
        thread=ts if thread else None,
        user="U1",
        message_id=f"{channel}:{ts}",
        text="q",
        is_dm=not thread,
        meta=meta,
    )


async def _deliver(factory: SlackResponderFactory, msg: IncomingMessage, pieces: list[str]) -> None:
    """The worker's calls: begin, stream(text so far) per piece, finish(whole text)."""
    r = factory.responder(msg, msg.job_id)
    await r.begin()
    text = ""
    for piece in pieces:
        text += piece
        await r.stream(text)
    await r.finish(Reply(text=text))


def _held(fake: FakeSlackAPI, msg: IncomingMessage) -> tuple[str, bool]:
    """The text Slack holds for the reply to ``msg``, and whether it is the native
    stream's Markdown (never replaced by a ``chat.update``)."""
    thread = msg.meta.get("reply_thread")
    [reply] = [m for m in fake.replies(msg.channel) if m.thread_ts == thread]
    started = {c.params.get("thread_ts") for c in fake.calls_of("chat.startStream")}
    edited = any(c.params.get("ts") == reply.ts for c in fake.calls_of("chat.update"))
    return reply.text, thread in started and not edited


def _assert_inert_and_kept(fake: FakeSlackAPI, msg: IncomingMessage, text: str) -> None:
    held, streamed = _held(fake, msg)
    assert not LIVE.search(held), f"live mention in {held!r}"
    assert not LIVE.search(html.unescape(held)), f"live mention in {held!r}"
    # What a reader sees: the Markdown without the zero-width spaces.
    assert held.replace(ZWSP, "") == text
    if not streamed:
        # Edited: the escaping of the whole text, whatever the cuts were.
        assert held == safe_markdown(text)


def _pieces_at(text: str, cut: int) -> tuple[str, str]:
    """What the stream sends of ``text[:cut]`` now (up to ``stream_cut``), and the rest."""
    k = stream_cut(text[:cut])
    return text[:k], text[k:]


@pytest.mark.parametrize("sample", [*MENTIONS, "@here", "@everyone", "&lt;!here&gt;"])
def test_safe_markdown_of_two_stream_pieces_is_the_safe_markdown_of_their_join(
    sample: str,
) -> None:
    for cut in range(len(sample) + 1):
        now, rest = _pieces_at(sample, cut)
        joined = safe_markdown(now) + safe_markdown(rest)
        assert joined == safe_markdown(sample)
        assert not LIVE.search(joined)


@fuzz(300)
@given(a=MENTION_TEXT, b=MENTION_TEXT)
def test_safe_markdown_does_not_depend_on_where_the_stream_is_cut(a: str, b: str) -> None:
    now, rest = _pieces_at(a + b, len(a))
    assert safe_markdown(now) + safe_markdown(rest) == safe_markdown(a + b)
    assert not LIVE.search(safe_markdown(now) + safe_markdown(rest))
    assert (safe_markdown(now) + safe_markdown(rest)).replace(ZWSP, "") == a + b


def test_code_keeps_its_angle_brackets_and_decorators() -> None:
    code = "```python\n@dataclass\nclass A:\n    ok = a < b and c<d\n```"
    assert safe_markdown(code) == code
    assert stream_cut("if a <") == len("if a ")
    assert stream_cut("mail me@he") == len("mail me")
    assert stream_cut("mail me@hx") == len("mail me@hx")


async def test_a_stream_cut_at_every_position_holds_no_live_mention(factory, fake_slack):
    text = EVERY_MENTION
    for cut in range(1, len(text)):
        msg = _msg(thread=True)
        await _deliver(factory, msg, [text[:cut], text[cut:]])
        assert _held(fake_slack, msg)[1], "the reply was not natively streamed"
        _assert_inert_and_kept(fake_slack, msg, text)


async def test_the_reported_split_of_channel_stays_text(factory, fake_slack):
    msg = _msg(thread=True)
    await _deliver(factory, msg, ["Heads up <", "!channel>", " now"])
    held, _ = _held(fake_slack, msg)
    assert "<!channel>" not in held
    assert held == f"Heads up <{ZWSP}!channel> now"
    # The "<" waited for the next delta instead of going out alone.
    starts = [c.params.get("markdown_text", "") for c in fake_slack.calls_of("chat.startStream")]
    assert starts[-1] == "Heads up "


async def test_an_edited_reply_cut_at_every_position_holds_no_live_mention(factory, fake_slack):
    text = EVERY_MENTION
    for cut in range(1, len(text), 3):
        msg = _msg(thread=False)  # a top-level DM: posted, then edited
        await _deliver(factory, msg, [text[:cut], text[cut:]])
        assert not _held(fake_slack, msg)[1]
        _assert_inert_and_kept(fake_slack, msg, text)


@fuzz(60)
@given(
    text=MENTION_TEXT,
    cuts=st.lists(st.integers(min_value=1, max_value=200), max_size=8),
    thread=st.booleans(),
)
async def test_any_text_cut_anywhere_reaches_slack_inert_and_whole(
    factory, fake_slack, text: str, cuts: list[int], thread: bool
) -> None:
    points = sorted({c for c in cuts if c < len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise([0, *points, len(text)])]
    msg = _msg(thread=thread)
    await _deliver(factory, msg, pieces)
    _assert_inert_and_kept(fake_slack, msg, text)


async def test_a_model_answer_split_inside_mentions_reaches_slack_inert_end_to_end(
    slack_settings, adapter, worker_process, fake_slack, llm_sim
):
    """Signed event -> adapter -> queue -> `sluice worker` -> the simulator streaming an
    answer cut inside every mention -> native stream on the fake Slack."""
    pieces = ["Echo: heads up"]
    for mention in MENTIONS:
        pieces += [" " + mention[:1], mention[1:]]  # "<" | "!channel>", …
    pieces.append(" done")
    answer = "".join(pieces)
    # Chunks far enough apart that the worker streams them as separate deltas.
    llm_sim.configure(script=pieces, token_latency_s=0.05)
    settings = slack_settings.model_copy(update={"slack_edit_interval_s": 0.0})
    worker_process(worker_env(settings))
    async with adapter(settings) as a:
        await a.send.event(mention_event("ping everyone please", "900.1"))
        await fake_slack.wait_for(
            lambda: any(
                m.thread_ts == "900.1" and not m.streaming for m in fake_slack.replies("C1")
            ),
            timeout_s=30,
        )
    [reply] = [m for m in fake_slack.replies("C1") if m.thread_ts == "900.1"]
    deltas = [c.params.get("markdown_text", "") for c in fake_slack.calls_of("chat.startStream")]
    deltas += [c.params.get("markdown_text", "") for c in fake_slack.calls_of("chat.appendStream")]
    # The cut really reached the responder: a "<" was held back and opened a later delta.
    assert any(d.startswith("<" + ZWSP) for d in deltas), deltas
    assert not LIVE.search(reply.text), reply.text
    assert reply.text.replace(ZWSP, "") == answer

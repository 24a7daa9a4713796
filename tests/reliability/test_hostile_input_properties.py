"""Property-based tests (hypothesis) of the pure edges: any input is converted, never a crash,
and nothing the model writes becomes a live ping.

The splitters' structured properties (code fences, paragraphs) are in
``tests/slack/test_slack_format.py`` and ``tests/discord/test_split.py``; here they get
arbitrary Unicode, control characters and right-to-left text.
"""

from __future__ import annotations

import html
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bots.discord.intake import strip_mention as discord_strip_mention
from bots.discord.split import split_parts as discord_split_parts
from bots.slack.convert import message_from_command, message_from_event, payload_problem
from bots.slack.format import reply_parts, safe_markdown, split_message
from core.messages import IncomingMessage

PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text a careless or hostile user (or a model echoing them) may write.
_ODD = st.sampled_from(
    [
        "@everyone",
        "@here",
        "<!channel>",
        "<!here>",
        "<!everyone>",
        "<!subteam^S123|@team>",
        "<@U123>",
        "<@&123>",
        "<#C1>",
        "&lt;!channel&gt;",
        "\u200b",
        "\u200f",
        "\u202e",
        "\u2066",
        "\x00",
        "\x1b[31m",
        "\r\n",
        "```",
        "**",
        "[x](javascript:alert(1))",
        "|",
        "\ud800",
        "مرحبا",
        "👩‍👩‍👧",
    ]
)
_TEXT = st.lists(st.one_of(st.text(max_size=40), _ODD), max_size=30).map("".join)
_ID = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=12)
_TS = st.builds(lambda a, b: f"{a}.{b:06d}", st.integers(0, 2_000_000_000), st.integers(0, 999_999))

# Slack's live markup: <!channel>, <!here>, <!everyone>, <!subteam^…>, <@U…>, <#C…>.
# Live Slack markup, also once character references are decoded (html.unescape).
_LIVE_SLACK = re.compile(r"<[!@#]|@(?:here|channel|everyone)(?!\w)", re.IGNORECASE)


def _roundtrips(msg: IncomingMessage) -> None:
    """A converted message survives the queue's serialisation."""
    again = IncomingMessage.model_validate(msg.model_dump(mode="json"))
    assert again == msg
    msg.text.encode("utf-8")  # no lone surrogate reaches the queue or the model
    assert msg.job_id and msg.conversation_id


@PROPS
@given(
    text=_TEXT,
    channel=_ID,
    user=_ID,
    ts=_TS,
    thread=st.none() | _TS,
    team=_ID,
    kind=st.sampled_from(["mention", "dm", "assistant", "thread"]),
)
def test_any_slack_event_text_and_ids_convert_to_a_queueable_message(
    text: str, channel: str, user: str, ts: str, thread: str | None, team: str, kind: str
) -> None:
    event: dict[str, Any] = {
        "type": "app_mention" if kind == "mention" else "message",
        "user": user,
        "text": f"<@UBOT> {text}",
        "ts": ts,
        "channel": channel,
    }
    if thread:
        event["thread_ts"] = thread
    body = {"type": "event_callback", "team_id": team, "event_id": "Ev1", "event": event}
    assert payload_problem(body) is None
    msg = message_from_event(body, "UBOT", kind=kind)
    _roundtrips(msg)
    assert (msg.tenant, msg.channel, msg.user) == (team, channel, user)
    assert "<@UBOT>" not in msg.text


@PROPS
@given(text=_TEXT, channel=_ID, user=_ID, trigger=_ID)
def test_any_slash_command_text_converts_to_a_queueable_message(
    text: str, channel: str, user: str, trigger: str
) -> None:
    form = {"team_id": "T1", "channel_id": channel, "user_id": user, "trigger_id": trigger}
    _roundtrips(message_from_command({**form, "text": text}))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@PROPS
@given(
    body=st.dictionaries(
        st.sampled_from(["type", "event", "team_id", "event_id", "api_app_id", "x"]), _JSON
    ),
    event=st.dictionaries(
        st.sampled_from(["type", "user", "channel", "ts", "text", "thread_ts", "subtype"]),
        _JSON | _TS | st.sampled_from(["message", "app_mention", "1.5", "nan", "inf", "-1"]),
    ),
)
def test_any_signed_payload_is_either_refused_with_a_reason_or_convertible(
    body: dict[str, Any], event: dict[str, Any]
) -> None:
    payloads = [body, {**body, "type": "event_callback", "event": event}]
    for payload in payloads:
        problem = payload_problem(payload)
        assert problem is None or isinstance(problem, str)
        e = payload.get("event")
        if (
            problem is None
            and payload.get("type") == "event_callback"
            and isinstance(e, dict)
            and e.get("type") in ("message", "app_mention")
            and all(isinstance(e.get(k), str) and e.get(k) for k in ("user", "channel", "ts"))
        ):
            # Accepted (not a 400): then conversion must work, or the adapter would 500.
            _roundtrips(message_from_event(payload, "UBOT", kind="mention"))


@PROPS
@given(text=_TEXT)
def test_model_output_never_becomes_a_live_slack_mention(text: str) -> None:
    assert not _LIVE_SLACK.search(safe_markdown(text))
    assert not _LIVE_SLACK.search(html.unescape(safe_markdown(text)))
    for part in reply_parts(text, 64):
        assert not _LIVE_SLACK.search(part)


@PROPS
@given(text=_TEXT, limit=st.integers(min_value=32, max_value=300))
def test_slack_split_of_any_text_fits_and_keeps_every_character(text: str, limit: int) -> None:
    parts = split_message(text, limit)
    assert all(len(p) <= limit for p in parts)
    kept = "".join(parts)
    # Only whitespace and the fences that close/reopen a cut code block are added/dropped.
    strip = re.compile(r"\s|`")
    assert strip.sub("", kept) == strip.sub("", text)


@PROPS
@given(text=_TEXT, limit=st.integers(min_value=100, max_value=400))
def test_discord_split_of_any_text_fits_and_joins_back_exactly(text: str, limit: int) -> None:
    parts = discord_split_parts(text, limit)
    assert all(len(p.text) <= limit for p in parts)
    assert "".join(p.original for p in parts) == text


@PROPS
@given(text=_TEXT, bot=st.integers(min_value=10**16, max_value=10**19))
def test_discord_mention_stripping_of_any_text_removes_only_the_bots_mentions(
    text: str, bot: int
) -> None:
    stripped = discord_strip_mention(f"<@{bot}> {text} <@!{bot}>", str(bot))
    assert f"<@{bot}>" not in stripped and f"<@!{bot}>" not in stripped
    # Other people's and roles' mentions stay as text (they are defused at send time).
    for other in re.findall(r"<@&?\d+>", text):
        if str(bot) not in other:
            assert other in stripped

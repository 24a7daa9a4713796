"""Fuzz: signed Slack Events API requests of any shape, through the real adapter.

Each example is a real HTTP request, signed as Slack signs it, to ``sluice slack``'s
aiohttp app (Bolt listeners, conversion, dedupe, enqueue on the real Redis).
Properties: the answer is 200 (handled or ignored) or 400 with a reason (404 from
Bolt for a top-level ``type`` it does not know), never a 5xx; no listener fails (no
ERROR log line); and an ``app_mention`` written by a person is queued, whatever its
text.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from bots.slack.convert import is_user_message, message_from_event
from core.infra.redis import Keys
from core.settings import Settings
from tests.fuzz.strategies import HOSTILE_TEXT, fuzz
from tests.slack.conftest import BOT_USER, Adapter, running_adapter

_event_ids = itertools.count(1)

_ID = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=11)
_TS = st.builds(lambda a, b: f"{a}.{b:06d}", st.integers(0, 9_999_999_999), st.integers(0, 999_999))
_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20)
)
_JSON = st.recursive(
    _SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


def _field(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a well-formed value (15 in 16), sometimes anything at all."""
    return st.integers(0, 15).flatmap(lambda i: _JSON if i == 15 else good)


EVENT = st.fixed_dictionaries(
    {
        "type": _field(st.sampled_from(["app_mention", "message"])),
        "user": _field(_ID | st.just(BOT_USER)),
        "channel": _field(_ID.map(lambda s: "C" + s) | _ID.map(lambda s: "D" + s)),
        "ts": _field(_TS),
        "event_ts": _field(_TS),
        "text": _field(HOSTILE_TEXT.map(lambda t: f"<@{BOT_USER}> {t}")),
    },
    optional={
        "thread_ts": _field(_TS),
        "channel_type": _field(st.sampled_from(["channel", "im", "group", "mpim"])),
        "subtype": _field(
            st.sampled_from(["bot_message", "message_changed", "file_share", "thread_broadcast"])
        ),
        "bot_id": _field(_ID),
        "team": _field(_ID),
        "blocks": _JSON,
        "files": _JSON,
        "edited": _JSON,
    },
)
ENVELOPE = st.fixed_dictionaries(
    {"type": _field(st.just("event_callback")), "event": _field(EVENT)},
    optional={
        "team_id": _field(st.just("T1")),
        "api_app_id": _field(st.just("AFAKE")),
        "authorizations": _JSON,
        "enterprise_id": _field(_ID),
        "is_enterprise_install": _JSON,
        "x": _JSON,
    },
)


def _must_be_queued(body: dict[str, Any]) -> bool:
    event = body.get("event")
    return (
        isinstance(event, dict)
        and body.get("type") == "event_callback"
        and body.get("team_id") == "T1"
        and event.get("type") == "app_mention"
        and all(isinstance(event.get(k), str) for k in ("user", "channel", "ts", "text"))
        and event.get("channel_type") in (None, "channel")
        and all(
            event.get(k) is None or isinstance(event[k], str)
            for k in ("thread_ts", "event_ts", "subtype", "bot_id", "team")
        )
        and is_user_message(event, BOT_USER)
    )


@pytest.fixture
async def slack_adapter(slack_settings: Settings) -> AsyncIterator[Adapter]:
    """One running adapter for all of a property's examples."""
    settings = slack_settings.model_copy(update={"queued_notice_after_s": 0.0})
    async with running_adapter(settings) as a:
        yield a


@fuzz(150)
@given(body=ENVELOPE)
async def test_any_signed_event_is_handled_or_refused_never_a_5xx(
    slack_adapter: Adapter, redis, caplog, body: dict[str, Any]
) -> None:
    body = {**body, "event_id": f"EvFuzz{next(_event_ids)}"}
    raw = json.dumps(body).encode()
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        status, text = await slack_adapter.send.post_raw(raw)
    # 404 is Bolt's "unhandled request": a payload type no Slack app handles.
    unhandled = status == 404 and body.get("type") != "event_callback"
    assert status in (200, 400) or unhandled, (status, text)
    event(
        f"status {status} {text[:60]}" + (" (a person's mention)" if _must_be_queued(body) else "")
    )
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    if status == 400:
        assert text.strip(), "a 400 says why"
    if status == 200 and _must_be_queued(body):
        # Queued now, or earlier under the same (channel, ts): its job's marker is there.
        job_id = message_from_event(body, BOT_USER, kind="mention").job_id
        marker = Keys(slack_adapter.app.listeners.settings.key_prefix).dedupe("slack", job_id)
        assert await redis.exists(marker), f"accepted mention not queued: {body}"


# --- regressions the campaign found ------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        # Found: Bolt's ignoring_self_events middleware read None["bot_id"]: a 500.
        {"type": "", "event": None},
        {"type": "url_verification", "event": 5},
        # Found: Bolt's context took len(False): a 500 before any listener ran.
        {"type": "event_callback", "authorizations": False, "event": {"type": "app_mention"}},
        {"type": "event_callback", "authorizations": [7], "event": {"type": "x"}},
        {"type": "event_callback", "team": 5, "event": {"type": "x"}},
        {"type": "event_callback", "enterprise": [], "event": {"type": "x"}},
        {"type": "event_callback", "event": {"type": "x", "channel": 3}},
        {"type": "event_callback", "event": {"type": "x", "item": {"channel": 1.5}}},
        {"type": "block_actions", "user": True},
    ],
)
async def test_signed_payloads_of_a_shape_bolt_cannot_read_get_a_400(
    slack_adapter: Adapter, caplog, body: dict[str, Any]
) -> None:
    with caplog.at_level(logging.ERROR):
        status, text = await slack_adapter.send.post_raw(json.dumps(body).encode())
    assert status == 400, text
    assert "must be" in text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


COMMAND = st.fixed_dictionaries(
    {
        "command": _field(st.sampled_from(["/ask", "/help", "/nope"])),
        "text": _field(HOSTILE_TEXT),
        "team_id": _field(st.just("T1")),
        "channel_id": _field(_ID.map(lambda s: "C" + s)),
        "user_id": _field(_ID.map(lambda s: "U" + s)),
        "trigger_id": _field(_ID),
    },
    optional={
        "user_name": _field(HOSTILE_TEXT),
        "response_url": _field(st.just("http://127.0.0.1:9/r")),
        "enterprise_id": _field(_ID),
        "payload": _JSON.map(json.dumps),
    },
)


@fuzz(150)
@given(form=COMMAND)
async def test_any_signed_slash_command_is_handled_or_refused_never_a_5xx(
    slack_adapter: Adapter, caplog, form: dict[str, Any]
) -> None:
    from urllib.parse import urlencode

    # Form fields are text: what is not a string is sent as its JSON.
    fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in form.items()}
    raw = urlencode(fields).encode("utf-8", "surrogatepass")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        status, text = await slack_adapter.send.post_raw(
            raw, content_type="application/x-www-form-urlencoded"
        )
    event(f"status {status} {text[:50]}")
    # 404: Bolt's "unhandled request", a command this app has no listener for.
    assert status in (200, 400, 404), (status, text)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]

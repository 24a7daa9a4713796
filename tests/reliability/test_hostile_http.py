"""Hostile bodies to the Slack HTTP endpoint, signed (so they pass the signature check):
deeply nested or malformed JSON, odd timestamps, broken slash-command forms. Each gets a
4xx (never a 500 that Slack would retry), nothing is enqueued, and the adapter goes on.

The web adapter's counterpart is ``tests/test_web_input.py``; forged, stale and
oversized Slack requests are in ``tests/slack/test_slack_events.py``.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlencode

import pytest

from tests.fakes.slack_api import sign
from tests.helpers import unique_slack_ts as _ts
from tests.slack.conftest import SIGNING_SECRET, mention, queued_messages

NESTED = b"[" * 50_000 + b"]" * 50_000


def _event(event: dict) -> bytes:
    body = {"type": "event_callback", "team_id": "T1", "event_id": "EvH", "event": event}
    return json.dumps(body).encode()


BAD_JSON = [
    ("deeply nested array", NESTED),
    ("deeply nested object", b'{"a":' * 20_000 + b"1" + b"}" * 20_000),
    ("nested inside an event", _event({"type": "message"})[:-2] + b',"x":' + NESTED + b"}}"),
    ("truncated", _event(mention("x", "1.1"))[:40]),
    ("NaN and garbage", b'{"type": NaN, "x": }'),
    ("ts is not a number", _event(mention("hello", "yesterday"))),
    ("ts is infinity", _event(mention("hello", "inf"))),
    ("not utf-8", b'{"type": "event_callback", "x": "\xff\xfe"}'),
]  # fmt: skip

BAD_FORMS = [
    ("payload nested", urlencode({"payload": NESTED.decode()}).encode()),
    ("payload not json", b"payload=%7Bnope"),
    ("command without user", urlencode({"command": "/ask", "text": "hi"}).encode()),
    (
        "command without trigger",
        urlencode(
            {"command": "/ask", "text": "hi", "team_id": "T1", "channel_id": "C1", "user_id": "U1"}
        ).encode(),
    ),
    ("duplicate and empty keys", b"command=%2Fask&command=%2Fask&text=&=&&&"),
]


@pytest.mark.parametrize(("what", "body"), BAD_JSON, ids=[w for w, _ in BAD_JSON])
async def test_signed_malformed_json_is_refused_with_4xx_and_enqueues_nothing(
    slack_settings, adapter, queue, what, body
):
    settings = slack_settings.model_copy(update={"max_body_bytes": 1_000_000})
    async with adapter(settings) as a:
        status, text = await a.send.post_raw(body)
        assert 400 <= status < 500, f"{what}: {status} {text[:200]}"
        ok, _ = await a.send.event(mention("still fine", _ts()), event_id=f"Ev{_ts()}")
        assert ok == 200
    assert [m["text"] for m in await queued_messages(queue, settings)] == ["still fine"]


@pytest.mark.parametrize(("what", "body"), BAD_FORMS, ids=[w for w, _ in BAD_FORMS])
async def test_signed_malformed_form_bodies_are_refused_or_ignored_never_a_500(
    slack_settings, adapter, queue, what, body
):
    settings = slack_settings.model_copy(update={"max_body_bytes": 1_000_000})
    async with adapter(settings) as a:
        status, text = await a.send.post_raw(body, content_type="application/x-www-form-urlencoded")
        assert status < 500, f"{what}: {status} {text[:200]}"
        ok, _ = await a.send.event(mention("still fine", _ts()), event_id=f"Ev{_ts()}")
        assert ok == 200
    assert [m["text"] for m in await queued_messages(queue, settings)] == ["still fine"]


async def test_a_replayed_request_with_its_old_signature_is_refused_after_five_minutes(
    slack_settings, adapter, queue
):
    body = _event(mention("replayed", _ts()))
    old = int(time.time()) - 5 * 60 - 5
    async with adapter(slack_settings) as a:
        # A captured request (valid signature for its own timestamp) replayed late.
        status, _ = await a.send.post_raw(
            body, timestamp=old, signature=sign(SIGNING_SECRET, body, old)
        )
        # Its signature moved onto a fresh timestamp does not verify either.
        fresh, _ = await a.send.post_raw(body, signature=sign(SIGNING_SECRET, body, old))
        future = int(time.time()) + 10 * 60
        ahead, _ = await a.send.post_raw(
            body, timestamp=future, signature=sign(SIGNING_SECRET, body, future)
        )
    assert (status, fresh, ahead) == (401, 401, 401)
    assert await queued_messages(queue, slack_settings) == []

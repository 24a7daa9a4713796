"""Fuzz: the web chat's ``POST /api/messages`` with any body, over real HTTP.

The adapter runs in this process on a free port (``tests.webchat.web_adapter``);
each example is one request, sent the way the page sends it (``application/json``,
its own ``Origin``, the page's cookies). Properties: never a 5xx; every refusal is
a 4xx whose JSON body says why in ``error``; a well-formed message is accepted
(202) and its job is in Redis, so nothing accepted is lost.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import aiohttp
import pytest
from arq.connections import ArqRedis
from hypothesis import event, given
from hypothesis import strategies as st

from core.settings import Settings
from tests.fuzz.strategies import HOSTILE_TEXT, fuzz
from tests.webchat import WebSession, open_session, web_adapter

# 400 bad input, 413 too large; 403/415 are the Origin/Host/foreign-session and
# content-type refusals.
REFUSALS = (400, 403, 413, 415)

_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
_JSON = st.recursive(
    _SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


def _mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` 7 times in 8."""
    return st.integers(0, 7).flatmap(lambda i: bad if i == 7 else good)


# MINE stands for the session of the request's cookie (filled in per request): a body
# may name it; naming any other session is refused.
MINE = "<mine>"
SESSION = _mostly(
    st.just(MINE),
    st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-",
        min_size=1,
        max_size=64,
    )
    | st.text(max_size=70)
    | _JSON,
)
ID = st.one_of(
    st.none(),
    st.text(alphabet="abcdef0123456789-_", min_size=8, max_size=64),
    st.text(max_size=70),
    _JSON,
)
TEXT = st.one_of(HOSTILE_TEXT, HOSTILE_TEXT, st.text(max_size=50), _JSON)
MESSAGE = st.fixed_dictionaries(
    {"text": TEXT},
    optional={"session": SESSION, "id": ID, "extra": _JSON},
)
BODY = st.one_of(
    MESSAGE.map(lambda m: json.dumps(m).encode()),
    MESSAGE.map(lambda m: json.dumps(m).encode()),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.sampled_from(
        [
            b'{"text": "\\ud800 lone"}',
            b'{"text": NaN}',
            b'{"text": "x", "id": Infinity}',
            b"[" * 5000 + b"]" * 5000,
            b'{"text": "' + b"\\u0000" * 100 + b'"}',
            b"\xef\xbb\xbf{}",
        ]
    ),
    MESSAGE.map(lambda m: json.dumps(m).encode()).flatmap(
        lambda b: st.integers(0, len(b)).map(lambda n: b[:n])  # truncated JSON
    ),
)


class Web:
    def __init__(
        self, base: str, redis: ArqRedis, http: aiohttp.ClientSession, session: WebSession
    ) -> None:
        self.base, self.redis, self.http, self.session = base, redis, http, session


@pytest.fixture
async def web(settings: Settings) -> AsyncIterator[Web]:
    # Hundreds of examples from one session: the door's limits are not under test.
    settings = settings.model_copy(update={"user_requests_per_window": None})
    async with web_adapter(settings) as (base, redis), aiohttp.ClientSession() as http:
        async with http.get(base + "/") as resp:  # as a page does first
            assert resp.status == 200
        session = await open_session(http, base, headers={"Origin": base})
        yield Web(base, redis, http, session)


def _well_formed(body: bytes, mine: str) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    text, mid = data.get("text"), data.get("id")
    ok_chars = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
    if "session" in data and data["session"] != mine:
        return None
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None  # a lone surrogate: refused with a reason
    if mid is not None and not (
        isinstance(mid, str) and 8 <= len(mid) <= 64 and set(mid) <= ok_chars
    ):
        return None
    return data


@fuzz(200)
@given(body=BODY)
async def test_any_body_is_accepted_or_refused_with_a_reason_never_a_5xx(
    web: Web, body: bytes
) -> None:
    body = body.replace(json.dumps(MINE).encode(), json.dumps(web.session).encode())
    headers = {"Content-Type": "application/json", "Origin": web.base, **web.session.headers()}
    async with web.http.post(web.base + "/api/messages", data=body, headers=headers) as resp:
        status = resp.status
        answer = await resp.json(content_type=None)
    event(f"status {status}")
    assert status == 202 or status in REFUSALS, (status, answer)
    assert isinstance(answer, dict)
    if status != 202:
        assert isinstance(answer.get("error"), str) and answer["error"], answer
    good = _well_formed(body, web.session)
    if good is not None:
        assert status == 202, (body, answer)
    if status == 202:
        assert good is not None, f"accepted a malformed body: {body!r}"
        assert await web.redis.exists(f"arq:job:{answer['job_id']}"), answer


def test_the_chat_page_never_renders_text_as_html() -> None:
    """The web chat's answer to markup in text: the page only ever sets ``textContent``.

    Shown in a real browser by ``tests/test_web_markup_browser.py``; this check keeps a
    later edit from bringing in an HTML sink.
    """
    page = resources.files("bots.web").joinpath("static/index.html").read_text("utf-8")
    script = page[page.index("<script") :]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "srcdoc"):
        assert sink not in script, f"the chat page uses {sink}"
    # Every text the page shows from an event goes through textContent.
    assert re.findall(r"\.textContent \+?= e\.text", script)

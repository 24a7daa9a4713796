"""The web chat is a development tool unless configured otherwise.

Over real HTTP against the real adapter: foreign Host and Origin names are refused,
bodies must be JSON, sessions are server-issued and bound to a signed cookie, reply
streams are capped, and off loopback it starts only with a sign-in and a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from bots.web.app import connect_web_redis, create_web_app
from bots.web.security import COOKIE, Signer, check_exposure, is_loopback
from core.errors import ConfigError
from core.infra.serializer import deserialize
from core.settings import Settings
from sluice.dev import serve
from tests.helpers import ROOT, base_env, free_port, settings_env, wait_port, wait_until
from tests.webchat import WebSession, open_session, web_adapter, with_web_secret

TOKEN = "tok-0123456789abcdef-access"
SECRET = "s" * 8 + "0123456789abcdef0123456789abcdef"


async def _queued(redis: Any, settings: Settings) -> int:
    return int(await redis.zcard(settings.queue_name))


def _find(obj: Any, key: str) -> Any:
    """The first value of ``key`` anywhere in a nested job payload."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        for item in obj:
            found = _find(item, key)
            if found is not None:
                return found
    return None


async def _queued_user(redis: Any, job_id: str) -> str:
    raw = await redis.get(f"arq:job:{job_id}")
    assert raw is not None, f"job {job_id} not queued"
    user = _find(deserialize(raw), "user")
    assert isinstance(user, str)
    return user


# --- Host and Origin -----------------------------------------------------------------


ROUTES = [
    ("GET", "/"),
    ("GET", "/api/events"),
    ("POST", "/api/session"),
    ("POST", "/api/messages"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_a_foreign_host_name_is_refused_on_every_route(settings, method, path):
    async with web_adapter(settings) as (base, redis), aiohttp.ClientSession() as http:
        session = await open_session(http, base)
        port = base.rsplit(":", 1)[1]
        for host in (f"rebound.attacker.example:{port}", "attacker.example", "127.0.0.1.nip.io"):
            headers = {"Host": host, **session.headers()}
            async with http.request(method, base + path, json={"text": "hi"}, headers=headers) as r:
                assert r.status == 421, (host, path)
                assert "SLUICE_WEB_ALLOWED_HOSTS" in (await r.json())["error"]
        # The same request for an allowed name goes through (so the 421 is the Host's doing).
        if method == "GET" and path != "/api/events":
            for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
                async with http.get(base + path, headers={"Host": host}) as r:
                    assert r.status == 200, host
        assert await _queued(redis, settings) == 0


async def test_the_page_cannot_be_framed_by_another_site(settings):
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with http.get(base + "/") as r:
            assert r.status == 200
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
            assert r.headers["X-Frame-Options"] == "DENY"


async def test_allowed_host_names_come_from_the_setting_and_may_pin_a_port(settings):
    custom = settings.model_copy(update={"web_allowed_hosts": ["chat.example.com:8443"]})
    async with web_adapter(custom) as (base, _), aiohttp.ClientSession() as http:
        port = base.rsplit(":", 1)[1]
        for host, status in (
            ("chat.example.com:8443", 200),
            ("CHAT.example.com:8443", 200),
            ("chat.example.com:8444", 421),
            ("chat.example.com", 421),
            (f"127.0.0.1:{port}", 421),
        ):
            async with http.get(f"{base}/healthz", headers={"Host": host}) as r:
                assert r.status == status, host


async def test_a_post_from_a_foreign_origin_is_refused_and_enqueues_nothing(settings):
    async with web_adapter(settings) as (base, redis), aiohttp.ClientSession() as http:
        session = await open_session(http, base)
        port = base.rsplit(":", 1)[1]
        for origin in ("https://attacker.example", f"http://evil.example:{port}", "null"):
            for path in ("/api/messages", "/api/session"):
                headers = {"Origin": origin, **session.headers()}
                async with http.post(base + path, json={"text": "hi"}, headers=headers) as r:
                    assert r.status == 403, (origin, path)
                    assert "other sites" in (await r.json())["error"]
        # A browser's cross-site request, or its POST without an Origin, is refused too.
        for headers in (
            {"Sec-Fetch-Site": "cross-site", "Origin": f"http://127.0.0.1:{port}"},
            {"Sec-Fetch-Site": "same-origin"},
        ):
            async with http.post(
                f"{base}/api/messages",
                json={"text": "hi"},
                headers={**headers, **session.headers()},
            ) as r:
                assert r.status == 403, headers
        assert await _queued(redis, settings) == 0
        # The page's own origin is taken.
        ok = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
        async with http.post(
            f"{base}/api/messages", json={"text": "hi"}, headers={**ok, **session.headers()}
        ) as r:
            assert r.status == 202, await r.text()
        assert await _queued(redis, settings) == 1


async def test_a_foreign_origin_cannot_open_a_reply_stream(settings):
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        session = await open_session(http, base)
        headers = {"Origin": "https://attacker.example", **session.headers()}
        async with http.get(f"{base}/api/events", headers=headers) as r:
            assert r.status == 403


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None],
)
async def test_a_post_that_is_not_json_gets_415_and_enqueues_nothing(settings, content_type):
    async with web_adapter(settings) as (base, redis), aiohttp.ClientSession() as http:
        session = await open_session(http, base)
        headers = session.headers()
        if content_type is not None:
            headers["Content-Type"] = content_type
        for path in ("/api/messages", "/api/session"):
            async with http.post(
                base + path,
                data=b'{"text": "hi"}',
                headers=headers,
                skip_auto_headers=["Content-Type"],
            ) as r:
                assert r.status == 415, path
                assert "application/json" in (await r.json())["error"]
        assert await _queued(redis, settings) == 0


# --- Sessions ------------------------------------------------------------------------


async def test_sessions_are_issued_by_the_server_and_namespaced_as_web_users(settings):
    admin = settings.model_copy(update={"admin_users": ["boss", "U123"]})
    async with web_adapter(admin) as (base, redis), aiohttp.ClientSession() as http:
        a, b = await open_session(http, base), await open_session(http, base)
        assert a != b and len(a) >= 24 and len(b) >= 24
        assert a.user == f"web:{a}" and b.user == f"web:{b}"
        # The client cannot pick its id: naming one is ignored without a cookie ...
        async with http.post(f"{base}/api/session", json={"session": "boss"}) as r:
            assert r.status == 200
            assert (await r.json())["session"] != "boss"
        # ... and refused with one.
        async with http.post(
            f"{base}/api/messages", json={"session": "boss", "text": "hi"}, headers=a.headers()
        ) as r:
            assert r.status == 403
        # With its cookie, a session is renewed, not replaced.
        async with http.post(f"{base}/api/session", json={}, headers=a.headers()) as r:
            assert (await r.json())["session"] == a
        async with http.post(
            f"{base}/api/messages", json={"text": "who am I?"}, headers=a.headers()
        ) as r:
            assert r.status == 202
            job_id = (await r.json())["job_id"]
        user = await _queued_user(redis, job_id)
        assert user == f"web:{a}" and user not in admin.admin_users


async def test_a_session_cookie_is_httponly_samesite_strict_and_secure_behind_https(settings):
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        for headers, secure in (({}, ""), ({"X-Forwarded-Proto": "https"}, True)):
            async with http.post(f"{base}/api/session", json={}, headers=headers) as r:
                morsel = r.cookies[COOKIE]
                assert morsel["httponly"] is True
                assert morsel["samesite"] == "Strict"
                assert morsel["path"] == "/"
                assert morsel["secure"] == secure
    forced = settings.model_copy(update={"web_cookie_secure": True})
    async with web_adapter(forced) as (base, _), aiohttp.ClientSession() as http:
        async with http.post(f"{base}/api/session", json={}) as r:
            assert r.cookies[COOKIE]["secure"] is True


async def test_without_its_cookie_a_session_id_can_neither_read_nor_write(settings):
    async with web_adapter(settings) as (base, redis), aiohttp.ClientSession() as http:
        victim, attacker = await open_session(http, base), await open_session(http, base)
        async with http.post(
            f"{base}/api/messages", json={"text": "my secret question"}, headers=victim.headers()
        ) as r:
            assert r.status == 202
        forged = [
            {},  # no cookie at all
            {"Cookie": f"{COOKIE}={victim}"},  # the id alone
            {"Cookie": f"{COOKIE}={victim}.{attacker.cookie.split('.', 1)[1]}"},  # another's MAC
            {"Cookie": f"{COOKIE}={victim}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
        ]
        other_key = settings.model_copy(update={"web_secret": SecretStr("x" * 40)})
        forged.append({"Cookie": f"{COOKIE}={Signer(other_key).sign(victim, 'open')}"})
        for headers in forged:
            async with http.get(f"{base}/api/events?session={victim}", headers=headers) as r:
                assert r.status == 401, headers
                assert "session" in (await r.json())["error"].lower()
            async with http.post(
                f"{base}/api/messages", json={"session": victim, "text": "as you"}, headers=headers
            ) as r:
                assert r.status == 401, headers
        # A valid cookie of one's own does not open another session's stream or send as it.
        async with http.get(f"{base}/api/events?session={victim}", headers=attacker.headers()) as r:
            assert r.status == 403
        async with http.post(
            f"{base}/api/messages",
            json={"session": victim, "text": "as you"},
            headers=attacker.headers(),
        ) as r:
            assert r.status == 403
        assert await _queued(redis, settings) == 1
        # The attacker's own stream shows only the attacker's session.
        async with http.get(f"{base}/api/events", headers=attacker.headers()) as r:
            assert r.status == 200
            assert await r.content.readuntil(b"\n\n") == b"retry: 1000\n\n"
        # The victim reads its own stream with its cookie.
        async with http.get(f"{base}/api/events", headers=victim.headers()) as r:
            assert r.status == 200
            seen = b""
            while b"my secret question" not in seen:
                seen += await r.content.readuntil(b"\n\n")


async def test_without_a_secret_sessions_are_signed_per_process(settings, caplog):
    """Unset ``SLUICE_WEB_SECRET``: a random key per process, said in the log; so a
    second web process does not take the first one's cookies (docs/deploy.md)."""
    bare = settings.model_copy(update={"web_secret": None})

    @contextlib.asynccontextmanager
    async def adapter() -> AsyncIterator[str]:
        redis = await connect_web_redis(bare)
        try:
            async with serve(create_web_app(bare, redis), "127.0.0.1", 0) as port:
                yield f"http://127.0.0.1:{port}"
        finally:
            await redis.aclose()

    caplog.set_level(logging.WARNING, logger="bots.web.security")
    async with adapter() as one, adapter() as two, aiohttp.ClientSession() as http:
        assert "SLUICE_WEB_SECRET is unset" in caplog.text
        session = await open_session(http, one)
        async with http.post(
            f"{one}/api/messages", json={"text": "a"}, headers=session.headers()
        ) as r:
            assert r.status == 202
        async with http.post(
            f"{two}/api/messages", json={"text": "b"}, headers=session.headers()
        ) as r:
            assert r.status == 401
    # With one secret, both processes take the same cookie.
    shared = with_web_secret(settings)
    async with (
        web_adapter(shared) as (one, _),
        web_adapter(shared) as (two, _),
        aiohttp.ClientSession() as http,
    ):
        session = await open_session(http, one)
        async with http.post(
            f"{two}/api/messages", json={"text": "c"}, headers=session.headers()
        ) as r:
            assert r.status == 202


# --- Reply stream caps ----------------------------------------------------------------


class Streams:
    """Open SSE responses, closed at the end."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http, self.base = http, base
        self.open: list[aiohttp.ClientResponse] = []

    async def get(self, session: WebSession) -> int:
        resp = await self.http.get(f"{self.base}/api/events", headers=session.headers())
        if resp.status == 200:
            await resp.content.readuntil(b"\n\n")  # the server counts it by now
            self.open.append(resp)
        else:
            await resp.read()
            resp.release()
        return resp.status

    def close_one(self) -> None:
        self.open.pop().close()

    def close(self) -> None:
        while self.open:
            self.close_one()


async def test_reply_streams_are_capped_per_session(settings):
    capped = settings.model_copy(update={"web_max_streams_per_session": 2})
    async with web_adapter(capped) as (base, _), aiohttp.ClientSession() as http:
        streams = Streams(http, base)
        try:
            session, other = await open_session(http, base), await open_session(http, base)
            assert [await streams.get(session) for _ in range(2)] == [200, 200]
            async with http.get(f"{base}/api/events", headers=session.headers()) as r:
                assert r.status == 429
                assert "limit" in (await r.json())["error"]
            assert await streams.get(other) == 200, "another session is not affected"
            streams.open.pop(0).close()  # one of the session's streams ends
            statuses: list[int] = []

            async def reopened() -> bool:
                statuses.append(await streams.get(session))
                return statuses[-1] == 200

            deadline = asyncio.get_running_loop().time() + 30
            while not await reopened():
                assert asyncio.get_running_loop().time() < deadline, statuses
                await asyncio.sleep(0.05)
        finally:
            streams.close()


async def test_reply_streams_are_capped_per_client_address(settings):
    capped = settings.model_copy(update={"web_max_streams_per_ip": 3})
    async with web_adapter(capped) as (base, _), aiohttp.ClientSession() as http:
        streams = Streams(http, base)
        try:
            sessions = [await open_session(http, base) for _ in range(4)]
            assert [await streams.get(s) for s in sessions[:3]] == [200, 200, 200]
            async with http.get(f"{base}/api/events", headers=sessions[3].headers()) as r:
                assert r.status == 429
                assert "address" in (await r.json())["error"]
        finally:
            streams.close()


async def test_the_redis_pool_is_capped_and_streams_leave_room_to_send(settings):
    capped = settings.model_copy(
        update={"web_redis_max_connections": 32, "web_max_streams_per_ip": 100}
    )
    async with web_adapter(capped) as (base, redis), aiohttp.ClientSession() as http:
        assert redis.connection_pool.max_connections == 32
        streams = Streams(http, base)
        try:
            sessions = [await open_session(http, base) for _ in range(17)]
            assert [await streams.get(s) for s in sessions[:16]] == [200] * 16
            async with http.get(f"{base}/api/events", headers=sessions[16].headers()) as r:
                assert r.status == 503
                assert "streams" in (await r.json())["error"]
            # With every stream slot taken, messages are still accepted.
            for s in sessions[:4]:
                async with http.post(
                    f"{base}/api/messages", json={"text": "still here"}, headers=s.headers()
                ) as r:
                    assert r.status == 202, await r.text()
        finally:
            streams.close()


# --- Sign-in: token and hook -----------------------------------------------------------


async def test_token_sign_in_issues_a_session_only_for_the_right_token(settings):
    guarded = settings.model_copy(update={"web_token": SecretStr(TOKEN)})
    async with web_adapter(guarded) as (base, redis), aiohttp.ClientSession() as http:
        async with http.post(f"{base}/api/session", json={}) as r:
            assert r.status == 401
            assert (await r.json())["auth"] == "token"
            assert COOKIE not in r.cookies
        for wrong in ({"token": TOKEN[:-1] + "X"}, {"token": 5}, {"token": ""}):
            async with http.post(f"{base}/api/session", json=wrong) as r:
                assert r.status == 401, wrong
        async with http.post(
            f"{base}/api/session", json={}, headers={"Authorization": "Bearer nope-nope-nope"}
        ) as r:
            assert r.status == 401
        by_body = await open_session(http, base, body={"token": TOKEN})
        by_header = await open_session(http, base, headers={"Authorization": f"Bearer {TOKEN}"})
        for session in (by_body, by_header):
            async with http.post(
                f"{base}/api/messages", json={"text": "signed in"}, headers=session.headers()
            ) as r:
                assert r.status == 202
        # A cookie from the open (token-less) mode is not a token session.
        open_cookie = Signer(with_web_secret(guarded)).sign("A" * 24, "open")
        async with http.post(
            f"{base}/api/messages",
            json={"text": "sneaky"},
            headers={"Cookie": f"{COOKIE}={open_cookie}"},
        ) as r:
            assert r.status == 401
        assert await _queued(redis, guarded) == 2
    # A new token ends the sessions signed in with the old one.
    rotated = guarded.model_copy(update={"web_token": SecretStr(TOKEN + "-new")})
    async with web_adapter(rotated) as (base, _), aiohttp.ClientSession() as http:
        async with http.post(
            f"{base}/api/messages", json={"text": "old"}, headers=by_body.headers()
        ) as r:
            assert r.status == 401


def header_user(request: web.Request) -> str | None:
    """A test sign-in hook: the user an upstream proxy names in ``X-User``."""
    return request.headers.get("X-User")


async def async_header_user(request: web.Request) -> str | None:
    """The same, as a coroutine."""
    await asyncio.sleep(0)
    return request.headers.get("X-User")


def broken_hook(request: web.Request) -> str | None:
    """A sign-in hook that fails."""
    raise RuntimeError("directory unreachable")


@pytest.mark.parametrize("hook", ["header_user", "async_header_user"])
async def test_a_sign_in_hook_names_the_user_and_binds_the_session_to_it(settings, hook):
    hooked = settings.model_copy(update={"web_auth": f"tests.test_web_security:{hook}"})
    async with web_adapter(hooked) as (base, redis), aiohttp.ClientSession() as http:
        async with http.post(f"{base}/api/session", json={}) as r:
            assert r.status == 401
            assert (await r.json())["auth"] == "sign-in"
        alice = await open_session(http, base, headers={"X-User": "alice"})
        assert alice.user == "web:alice"
        as_alice = {"X-User": "alice", **alice.headers()}
        async with http.post(f"{base}/api/messages", json={"text": "hi"}, headers=as_alice) as r:
            assert r.status == 202
            assert await _queued_user(redis, (await r.json())["job_id"]) == "web:alice"
        # Alice's cookie is no use to someone the hook does not name as alice.
        for headers in ({"X-User": "bob", **alice.headers()}, alice.headers()):
            async with http.post(f"{base}/api/messages", json={"text": "x"}, headers=headers) as r:
                assert r.status == 401
            async with http.get(f"{base}/api/events", headers=headers) as r:
                assert r.status == 401
        assert await _queued(redis, hooked) == 1


async def test_a_failing_sign_in_hook_gives_503_and_a_log_line(settings, caplog):
    hooked = settings.model_copy(update={"web_auth": "tests.test_web_security:broken_hook"})
    caplog.set_level(logging.ERROR, logger="bots.web.security")
    async with web_adapter(hooked) as (base, _), aiohttp.ClientSession() as http:
        async with http.post(f"{base}/api/session", json={}) as r:
            assert r.status == 503
            body = await r.json()
            assert "sign-in check failed" in body["error"]
            assert "directory unreachable" not in body["error"]
    assert "broken_hook failed" in caplog.text and "directory unreachable" in caplog.text


@pytest.mark.parametrize(
    ("update", "needle"),
    [
        ({"web_secret": SecretStr("short")}, "SLUICE_WEB_SECRET is too short"),
        ({"web_token": SecretStr("short")}, "SLUICE_WEB_TOKEN is too short"),
        ({"web_token": SecretStr(TOKEN), "web_auth": "x:y"}, "not both"),
        ({"web_auth": "no_such_module_xyz:f"}, "cannot import"),
        ({"web_auth": "tests.test_web_security:nope"}, "no function"),
        ({"web_auth": "justamodule"}, "module:function"),
        ({"web_allowed_hosts": ["bad host/"]}, "SLUICE_WEB_ALLOWED_HOSTS"),
    ],
)
async def test_bad_web_settings_are_refused_at_start(settings, redis, update, needle):
    with pytest.raises(ConfigError, match=needle):
        create_web_app(settings.model_copy(update=update), redis)  # type: ignore[arg-type]


# --- Off loopback ----------------------------------------------------------------------


def test_loopback_addresses_are_told_apart():
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "", "::", "10.0.0.5", "chat.example.com", "192.168.1.2"):
        assert not is_loopback(host), host


@pytest.mark.parametrize(
    ("update", "needles"),
    [
        ({}, ["SLUICE_WEB_AUTH", "SLUICE_WEB_TOKEN", "SLUICE_WEB_SECRET"]),
        ({"web_token": SecretStr(TOKEN)}, ["SLUICE_WEB_SECRET"]),
        ({"web_auth": "tests.test_web_security:header_user"}, ["SLUICE_WEB_SECRET"]),
    ],
)
def test_off_loopback_without_sign_in_and_secret_is_refused(settings, update, needles):
    bare = settings.model_copy(update={"web_secret": None, **update})
    check_exposure(bare, "127.0.0.1")  # loopback: fine as it is
    with pytest.raises(ConfigError) as refused:
        check_exposure(bare, "0.0.0.0")
    for needle in needles:
        assert needle in str(refused.value)


def _sluice(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("command", ["web", "dev"])
def test_sluice_web_and_dev_refuse_to_listen_off_loopback_without_sign_in(settings, command):
    env = {**base_env(), **settings_env(settings.model_copy(update={"web_secret": None}))}
    done = _sluice([command, "--host", "0.0.0.0", "--port", str(free_port())], env)
    assert done.returncode == 2, done.stdout + done.stderr
    for needle in ("off loopback", "SLUICE_WEB_AUTH", "SLUICE_WEB_TOKEN", "SLUICE_WEB_SECRET"):
        assert needle in done.stderr, done.stderr
    assert TOKEN not in done.stderr


async def test_sluice_web_off_loopback_starts_with_a_token_and_a_secret(settings, tmp_path):
    from tests.helpers import Proc

    guarded = settings.model_copy(
        update={"web_token": SecretStr(TOKEN), "web_secret": SecretStr(SECRET)}
    )
    env = {**base_env(), **settings_env(guarded)}
    port = free_port()
    proc = Proc(["web", "--host", "0.0.0.0", "--port", str(port)], env, tmp_path / "web.log")
    try:
        await asyncio.to_thread(wait_port, port, 60)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/api/session", json={}) as r:
                assert r.status == 401
            session = await open_session(http, base, body={"token": TOKEN})
            async with http.post(
                f"{base}/api/messages", json={"text": "from afar"}, headers=session.headers()
            ) as r:
                assert r.status == 202
        await wait_until(lambda: "web chat on http://0.0.0.0" in proc.output(), 30, "start line")
        assert TOKEN not in proc.output() and SECRET not in proc.output()
    finally:
        proc.stop()


def test_the_image_and_compose_do_not_expose_the_web_chat_without_sign_in():
    import re

    from compose_spec import PyCompose

    from bots.web.security import HostRules

    dockerfile = (ROOT / "Dockerfile").read_text("utf-8")
    assert not re.search(r"SLUICE_WEB_HOST\s*=", dockerfile), "the image must not bind it"
    compose = PyCompose.from_yaml((ROOT / "docker-compose.yml").read_text("utf-8"))
    web_service = compose.get_service("web")
    command = list(web_service.command or [])
    host = command[command.index("--host") + 1] if "--host" in command else "127.0.0.1"
    env = dict(web_service.environment or {})
    if not is_loopback(host):
        # Off loopback inside the container: it starts only with the sign-in from .env
        # (test_sluice_web_and_dev_refuse_to_listen_off_loopback_without_sign_in), so it
        # is not in the default set of services, and no token or secret is baked in.
        assert set(web_service.profiles or ()) == {"web"}
        assert not {"SLUICE_WEB_TOKEN", "SLUICE_WEB_SECRET", "SLUICE_WEB_AUTH"} & set(env)
        allowed = Settings(_env_file=None, web_allowed_hosts=env["SLUICE_WEB_ALLOWED_HOSTS"])
        rules = HostRules(allowed.web_allowed_hosts)
        assert rules.allows("127.0.0.1:8080") and rules.allows("web:8080")
        assert not rules.allows("attacker.example:8080")
    assert all(str(p).startswith("127.0.0.1:") for p in web_service.ports or ())

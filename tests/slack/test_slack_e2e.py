"""End to end: signed Slack events -> adapter -> arq on Redis -> a `sluice worker`
process -> simulator -> replies on the fake Slack Web API."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import statistics
import time

import aiohttp
import pytest
from redis.asyncio import Redis

from core.settings import Settings
from tests.fakes.slack_api import EventSender, FakeSlackAPI
from tests.helpers import free_port, running, settings_env, wait_jobs_done, wait_port
from tests.slack.conftest import (
    BOT_TOKEN,
    SIGNING_SECRET,
    mention,
    message,
    worker_env,
)


def replies_starting(fake: FakeSlackAPI, prefix: str) -> list:
    return [m for m in fake.replies() if m.text.startswith(prefix) and not m.streaming]


async def wait_reply(fake: FakeSlackAPI, prefix: str, settings: Settings, timeout_s: float = 20.0):
    """The complete replies starting with ``prefix``, once one is out and every job of
    the test has ended (so a late duplicate would already be there)."""
    await fake.wait_for(lambda: replies_starting(fake, prefix), timeout_s)
    await settled(settings, timeout_s)
    return replies_starting(fake, prefix)


async def settled(settings: Settings, timeout_s: float = 20.0) -> None:
    """Wait until no job of the test is queued or running: no reply can come after."""
    redis = Redis.from_url(settings.redis_url)
    try:
        await wait_jobs_done(redis, settings, timeout_s)
    finally:
        await redis.aclose()


async def test_each_conversation_kind_gets_one_streamed_reply_from_a_worker(
    slack_settings, adapter, worker_process, fake_slack
):
    worker_process(worker_env(slack_settings))
    async with adapter(slack_settings) as a:
        await a.send.event(mention("mention question", "300.1"))
        [r] = await wait_reply(fake_slack, "Echo: mention question", slack_settings)
        assert (r.channel, r.thread_ts, r.token) == ("C1", "300.1", BOT_TOKEN)

        await a.send.event(message("follow up without mention", "300.5", thread_ts="300.1"))
        [r] = await wait_reply(fake_slack, "Echo: follow up without mention", slack_settings)
        assert (r.channel, r.thread_ts) == ("C1", "300.1")

        await a.send.event(message("direct question", "301.1", channel="D1", channel_type="im"))
        [r] = await wait_reply(fake_slack, "Echo: direct question", slack_settings)
        assert (r.channel, r.thread_ts) == ("D1", None)

        await a.send.event(
            {
                "type": "assistant_thread_started",
                "event_ts": "302.0",
                "assistant_thread": {"user_id": "U1", "channel_id": "D2", "thread_ts": "302.1"},
            }
        )
        await a.send.event(
            message(
                "assistant question", "302.2", channel="D2", channel_type="im", thread_ts="302.1"
            )
        )
        [r] = await wait_reply(fake_slack, "Echo: assistant question", slack_settings)
        assert (r.channel, r.thread_ts) == ("D2", "302.1")

        status, _ = await a.send.command(
            {
                "command": "/ask",
                "text": "slash question",
                "team_id": "T1",
                "channel_id": "C5",
                "user_id": "U1",
                "trigger_id": "trig-e2e",
                "response_url": "http://127.0.0.1:9/r",
            }
        )
        assert status == 200
        [r] = await wait_reply(fake_slack, "Echo: slash question", slack_settings)
        assert (r.channel, r.thread_ts) == ("C5", None)
    # Threads were streamed natively; the top-level DM and /ask were posted and edited.
    streamed = {c.params["thread_ts"] for c in fake_slack.calls_of("chat.startStream")}
    assert streamed == {"300.1", "302.1"}
    assert len(fake_slack.replies()) == 5


async def test_retries_and_double_delivery_give_one_reply(
    slack_settings, adapter, worker_process, fake_slack, llm_sim
):
    worker_process(worker_env(slack_settings))
    async with adapter(slack_settings) as a:
        event = mention("retried question", "310.1")
        for n in range(4):
            assert (await a.send.event(event, event_id="EvR", retry_num=n or None))[0] == 200
        await a.send.event(mention("double question", "311.1", thread_ts="310.1"))
        await a.send.event(message("<@UBOT> double question", "311.1", thread_ts="310.1"))
        assert len(await wait_reply(fake_slack, "Echo: retried question", slack_settings)) == 1
        assert len(await wait_reply(fake_slack, "Echo: double question", slack_settings)) == 1
        # A late redelivery (after the reply) is still a duplicate.
        await a.send.event(event, event_id="EvR", retry_num=3)
        await settled(slack_settings)
    assert len(replies_starting(fake_slack, "Echo: retried question")) == 1
    assert llm_sim.stats()["completions"] == 2


@contextlib.contextmanager
def slack_process(settings, log_path):
    """``sluice slack`` in its own process (as deployed), on a free port."""
    from tests.helpers import base_env

    port = free_port()
    env = {**base_env(), **settings_env(settings)}
    with running(["slack", "--host", "127.0.0.1", "--port", str(port)], env, log_path) as proc:
        wait_port(port)
        yield f"http://127.0.0.1:{port}", proc


async def _burst(send: EventSender, n: int = 200) -> None:
    """``n`` mentions at once; all are acked (p50/p99 are printed, not asserted)."""

    async def timed(i: int) -> tuple[int, float]:
        started = time.perf_counter()
        status, _ = await send.event(mention(f"load {i:03d}", f"400.{i:04d}", user=f"U{i:04d}"))
        return status, time.perf_counter() - started

    results = await asyncio.gather(*[timed(i) for i in range(n)])
    times = sorted(t for _, t in results)
    p50, p99 = statistics.median(times), times[int(len(times) * 0.99) - 1]
    print(
        f"\nsluice slack process, {n} concurrent events: p50={p50 * 1000:.0f}ms "
        f"p99={p99 * 1000:.0f}ms max={times[-1] * 1000:.0f}ms"
    )
    assert all(status == 200 for status, _ in results)


@pytest.mark.slow
async def test_two_hundred_events_at_once_are_all_acked_and_answered(
    slack_settings, worker_process, fake_slack, tmp_path
):
    worker_process(worker_env(slack_settings))
    with slack_process(slack_settings, tmp_path / "slack.log") as (base, _):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            send = EventSender(http, base + "/slack/events", SIGNING_SECRET)
            await send.event(mention("warm-up", "399.1"))
            await _burst(send)
        await fake_slack.wait_for(
            lambda: len(replies_starting(fake_slack, "Echo: load")) >= 200, timeout_s=90
        )
    answered = [
        re.match(r"Echo: load (\d+)", r.text).group(1)
        for r in replies_starting(fake_slack, "Echo: load")
    ]
    assert sorted(answered) == [f"{i:03d}" for i in range(200)]


async def test_429s_on_post_and_update_are_waited_out_and_reply_arrives_once(
    slack_settings, adapter, worker_process, fake_slack
):
    fake_slack.fail("chat.postMessage", status=429, retry_after_s=1, times=2)
    fake_slack.fail("chat.update", status=429, retry_after_s=1, times=2)
    worker_process(worker_env(slack_settings))
    async with adapter(slack_settings) as a:
        await a.send.event(
            message("rate limited question", "320.1", channel="D1", channel_type="im")
        )
        [r] = await wait_reply(
            fake_slack, "Echo: rate limited question", slack_settings, timeout_s=30
        )
    assert len(replies_starting(fake_slack, "Echo: rate limited question")) == 1
    assert r.text == r.text.strip()
    statuses = [c for c in fake_slack.calls_of("chat.postMessage")]
    assert len(statuses) == 3


async def _install(a, fake: FakeSlackAPI, code: str, team: str) -> str:
    """Run the OAuth flow for ``team``; returns the bot token the fake issued."""
    async with a.http.get(a.base + "/slack/install", allow_redirects=False) as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
        cookie = resp.headers["Set-Cookie"].split(";")[0]
    state = re.search(r"state=([^&]+)", location).group(1)
    fake.add_oauth_code(code, team, bot_user_id="UBOT")
    async with a.http.get(
        a.base + f"/slack/oauth_redirect?code={code}&state={state}", headers={"Cookie": cookie}
    ) as resp:
        assert resp.status == 200, await resp.text()
    return [t for t, info in fake.tokens.items() if info.team_id == team][-1]


async def test_two_workspaces_installed_by_oauth_reply_with_their_own_tokens_and_uninstall(
    oauth_settings, adapter, worker_process, fake_slack, tmp_path
):
    worker_process(worker_env(oauth_settings))
    async with adapter(oauth_settings) as a:
        token_a = await _install(a, fake_slack, "code-a", "TA")
        token_b = await _install(a, fake_slack, "code-b", "TB")
        assert token_a != token_b
        await a.send.event(mention("question from A", "330.1", channel="CA"), team_id="TA")
        await a.send.event(mention("question from B", "330.2", channel="CB"), team_id="TB")
        [ra] = await wait_reply(fake_slack, "Echo: question from A", oauth_settings)
        [rb] = await wait_reply(fake_slack, "Echo: question from B", oauth_settings)
        assert (ra.token, ra.team_id) == (token_a, "TA")
        assert (rb.token, rb.team_id) == (token_b, "TB")

        # Tokens are encrypted at rest.
        db = oauth_settings.database_url.removeprefix("sqlite:///")
        with sqlite3.connect(db) as conn:
            stored = dict(conn.execute("select team_id, bot_token from slack_installations"))
        assert set(stored) == {"TA", "TB"}
        assert all(v.startswith("fernet:") and "xoxb" not in v for v in stored.values())

        status, _ = await a.send.event(
            {"type": "app_uninstalled", "event_ts": "331.0"}, team_id="TB"
        )
        assert status == 200

        def gone() -> bool:
            with sqlite3.connect(db) as conn:
                return not conn.execute(
                    "select 1 from slack_installations where team_id='TB'"
                ).fetchall()

        await fake_slack.wait_for(gone)
        await a.send.event(mention("after uninstall", "332.1", channel="CB"), team_id="TB")
        await a.send.event(mention("A still works", "332.2", channel="CA"), team_id="TA")
        await wait_reply(fake_slack, "Echo: A still works", oauth_settings)
    assert not replies_starting(fake_slack, "Echo: after uninstall")


async def test_socket_mode_receives_events_acks_them_and_a_worker_replies(
    slack_settings, worker_process, fake_slack
):
    from pydantic import SecretStr

    from bots.slack.app import serve

    fake_slack.app_tokens.add("xapp-test")
    settings = slack_settings.model_copy(
        update={"slack_app_token": SecretStr("xapp-test"), "slack_signing_secret": None}
    )
    worker_process(worker_env(settings))
    task = asyncio.create_task(serve(settings, "127.0.0.1", 0))
    try:
        first = await fake_slack.socket_event(mention("over the socket", "340.1"))
        again = await fake_slack.socket_event(mention("over the socket", "340.1"), retry_attempt=1)
        await fake_slack.wait_for(lambda: {first, again} <= set(fake_slack.socket_acks))
        [r] = await wait_reply(fake_slack, "Echo: over the socket", slack_settings)
        assert r.thread_ts == "340.1"
        assert len(replies_starting(fake_slack, "Echo: over the socket")) == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_existing_bolt_app_keeps_its_listeners_beside_sluice(
    slack_settings, fake_slack, worker_process
):
    import aiohttp
    from aiohttp import web
    from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
    from slack_bolt.async_app import AsyncApp
    from slack_sdk.web.async_client import AsyncWebClient

    from bots.slack import register

    host = AsyncApp(
        signing_secret=SIGNING_SECRET,
        client=AsyncWebClient(
            base_url=fake_slack.url, token=slack_settings.slack_bot_token.get_secret_value()
        ),
    )
    seen: list[str] = []

    @host.event("reaction_added")
    async def on_reaction(event) -> None:
        seen.append(event["reaction"])

    @host.command("/hello")
    async def hello(ack) -> None:
        await ack("hello from the host app")

    @host.message("ping")
    async def ping(message, say) -> None:
        await say("pong")

    sluice = register(host, slack_settings)
    worker_process(worker_env(slack_settings))

    async def handle(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await host.async_dispatch(await to_bolt_request(request)))

    app = web.Application()
    app.router.add_post("/slack/events", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as http:
            send = EventSender(http, f"http://127.0.0.1:{port}/slack/events", SIGNING_SECRET)
            await send.event(
                {
                    "type": "reaction_added",
                    "user": "U1",
                    "reaction": "tada",
                    "item": {"type": "message", "channel": "C1", "ts": "1.1"},
                    "event_ts": "109.0",
                }
            )
            status, text = await send.command(
                {
                    "command": "/hello",
                    "text": "",
                    "team_id": "T1",
                    "channel_id": "C1",
                    "user_id": "U1",
                    "trigger_id": "t9",
                    "response_url": "http://127.0.0.1:9/x",
                }
            )
            await send.event(message("ping", "109.1"))
            await send.event(mention("sluice question", "109.2"))
            [reply] = await wait_reply(fake_slack, "Echo: sluice question", slack_settings)
    finally:
        await runner.cleanup()
        await sluice.intake.close()
    assert seen == ["tada"]
    assert status == 200 and "hello from the host app" in text
    assert fake_slack.calls_of("chat.postMessage")[0].params["text"] == "pong"
    assert reply.thread_ts == "109.2"
    assert not replies_starting(fake_slack, "Echo: ping")


async def test_sluice_slack_command_serves_events_and_health(
    slack_settings, worker_process, fake_slack, tmp_path
):
    worker_process(worker_env(slack_settings))
    with slack_process(slack_settings, tmp_path / "slack.log") as (base, proc):
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/healthz") as resp:
                assert resp.status == 200
            send = EventSender(http, base + "/slack/events", SIGNING_SECRET)
            status, _ = await send.event(mention("via the command", "350.1"))
            assert status == 200
            [reply] = await wait_reply(fake_slack, "Echo: via the command", slack_settings)
        assert reply.thread_ts == "350.1"
        assert SIGNING_SECRET not in proc.output() and BOT_TOKEN not in proc.output()


async def test_tokens_revoked_deletes_the_workspace_tokens(oauth_settings, adapter, fake_slack):
    async with adapter(oauth_settings) as a:
        await _install(a, fake_slack, "code-r", "TR")
        store = a.app.installation_store
        assert await store.async_find_bot(enterprise_id=None, team_id="TR") is not None
        status, _ = await a.send.event(
            {
                "type": "tokens_revoked",
                "event_ts": "360.0",
                "tokens": {"oauth": [], "bot": ["UBOT"]},
            },
            team_id="TR",
        )
        assert status == 200

        async def revoked() -> bool:
            return await store.async_find_bot(enterprise_id=None, team_id="TR") is None

        for _ in range(100):
            if await revoked():
                break
            await asyncio.sleep(0.05)
        assert await revoked()


async def test_bot_command_as_slash_command_is_answered_by_the_worker(
    slack_settings, adapter, worker_process, fake_slack, llm_sim
):
    settings = slack_settings.model_copy(update={"app": "examples.support_bot.bot:bot"})
    worker_process(worker_env(settings))
    async with adapter(settings) as a:
        status, _ = await a.send.command(
            {
                "command": "/status",
                "text": "",
                "team_id": "T1",
                "channel_id": "C6",
                "user_id": "U1",
                "trigger_id": "trig-status",
                "response_url": "http://127.0.0.1:9/r",
            }
        )
        assert status == 200
        [r] = await wait_reply(fake_slack, "All systems operational", slack_settings)
    assert r.channel == "C6"
    assert llm_sim.stats()["completions"] == 0


def test_sluice_slack_stops_gracefully_on_sigterm_right_after_it_is_up(slack_settings, tmp_path):
    """SIGTERM the moment the adapter logs its address: it closes its site and its Redis
    and database connections and exits 0, rather than dying with -15."""
    from tests.helpers import Proc, base_env

    port = free_port()
    env = {**base_env(), **settings_env(slack_settings)}
    proc = Proc(["slack", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path / "s.log")
    try:
        proc.wait_for_output("slack adapter (HTTP", timeout_s=60)
    finally:
        code = proc.stop()
    assert code == 0, proc.output()[-3000:]

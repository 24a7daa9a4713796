"""The provider pool (``SLUICE_PROVIDERS``): weighted choice, per-provider budgets,
failover on 429 / 5xx / a dead endpoint / an open breaker, the fallback model, a stream
that restarts elsewhere without duplicated text, ``sluice status`` and bad settings.

Every provider is a real ``sluice llm-sim`` process over HTTP, called with the real
openai SDK; budgets and breakers are in the test's real Redis.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from core.errors import LLMUnavailableError
from core.framework.bot import Bot
from core.infra.redis import Keys
from core.llm.budget import LLMBudget
from core.llm.client import Completion
from core.llm.pool import ProviderPool, pool_snapshot
from core.messages import IncomingMessage, Reply
from core.settings import Settings, describe_settings_error, parse_providers
from core.traffic.control import Traffic
from tests.conftest import SIM_DEFAULTS, Sim
from tests.helpers import ROOT, Proc, base_env, free_port, settings_env, wait_port
from tests.traffic_util import done_event, outbox, post, wait_done
from tests.webchat import open_session, web_adapter

MODEL = "gpt-4o-mini"


def _start_sim(tmp: Path, name: str) -> Sim:
    port = free_port()
    proc = Proc(["llm-sim", "--port", str(port)], base_env(), tmp / f"sim-{name}.log")
    try:
        wait_port(port)
    except BaseException:
        proc.stop()
        raise
    return Sim(port, proc)


@pytest.fixture(scope="module")
def _sim_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    sim = _start_sim(tmp_path_factory.mktemp("sim-b"), "b")
    try:
        yield sim
    finally:
        sim.proc.stop()


@pytest.fixture
def sim_b(_sim_b: Sim) -> Sim:
    """A second simulator, reset for this test."""
    _sim_b.reset()
    return _sim_b


def entry(name: str, url: str, models: tuple[str, ...] = (MODEL,), **extra: Any) -> dict[str, Any]:
    """One ``SLUICE_PROVIDERS`` entry for a simulator at ``url``."""
    return {
        "name": name,
        "base_url": f"{url}/v1",
        "api_key": f"sk-{name}-secret-0123456789",
        "models": list(models),
        **extra,
    }


def with_pool(settings: Settings, entries: list[dict[str, Any]], **update: Any) -> Settings:
    """``settings`` with these providers (validated as ``SLUICE_PROVIDERS`` is)."""
    return settings.model_copy(update={"providers": parse_providers(entries, ""), **update})


@pytest.fixture
async def make_pool(redis: Redis) -> AsyncIterator[Any]:
    pools: list[ProviderPool] = []

    def make(settings: Settings, seed: int = 7) -> ProviderPool:
        pool = ProviderPool(redis, Keys(settings.key_prefix), settings, rng=random.Random(seed))
        pools.append(pool)
        return pool

    try:
        yield make
    finally:
        for pool in pools:
            await pool.close()


async def ask(
    pool: ProviderPool,
    text: str = "hello",
    *,
    model: str = MODEL,
    fallback: str | None = None,
    shown: list[str] | None = None,
) -> Completion:
    async def on_text(so_far: str) -> None:
        if shown is not None:
            shown.append(so_far)

    return await pool.complete(
        [{"role": "user", "content": text}],
        model=model,
        fallback_model=fallback,
        member_id=uuid.uuid4().hex,
        priority_ms=0,
        est_tokens=100,
        on_text=on_text,
        max_tokens=50,
    )


def served(sim: Sim) -> int:
    return int(sim.stats()["completions"])


async def test_calls_split_between_free_providers_by_weight(settings, llm_sim, sim_b, make_pool):
    pool = make_pool(
        with_pool(settings, [entry("a", llm_sim.url, weight=3), entry("b", sim_b.url, weight=1)])
    )
    for i in range(80):
        await ask(pool, f"question {i}")
    a, b = served(llm_sim), served(sim_b)
    assert a + b == 80
    # 3:1 expects 60 / 20; a seeded choice, and far from 1:1 either way.
    assert 50 <= a <= 70, (a, b)


async def test_a_provider_without_room_is_passed_over_for_one_with_room(
    settings, llm_sim, sim_b, make_pool
):
    # a's budget holds about one request a minute; b has plenty. a weighs far more.
    pool = make_pool(
        with_pool(
            settings,
            [entry("a", llm_sim.url, rpm=2, weight=100), entry("b", sim_b.url, rpm=1000)],
        )
    )
    for i in range(6):
        await ask(pool, f"question {i}")
    assert served(llm_sim) <= 1
    assert served(sim_b) >= 5


@pytest.mark.parametrize("mode", ["429", "down"])
async def test_a_rate_limited_or_failing_provider_fails_over_to_the_next(
    settings, llm_sim, sim_b, make_pool, mode
):
    llm_sim.configure(mode=mode)
    sim_b.configure(script=["answer ", "from ", "b"])
    pool = make_pool(
        with_pool(settings, [entry("a", llm_sim.url, weight=1000), entry("b", sim_b.url)])
    )
    out = await ask(pool)
    assert out.text == "answer from b"
    assert llm_sim.stats()["requests"] >= 1, "a was tried first"
    assert served(sim_b) == 1


async def test_a_provider_that_is_down_fails_over_to_the_next(settings, sim_b, make_pool):
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sim_b.configure(script=["still ", "answered"])
    pool = make_pool(
        with_pool(settings, [entry("dead", nobody, weight=1000), entry("b", sim_b.url)])
    )
    out = await ask(pool)
    assert out.text == "still answered"


async def test_an_open_breaker_sends_jobs_on_without_calling_that_provider(
    settings, llm_sim, sim_b, make_pool, redis
):
    llm_sim.configure(mode="down")
    pool = make_pool(
        with_pool(
            settings,
            [entry("a", llm_sim.url, weight=1000), entry("b", sim_b.url)],
            breaker_failures=1,
            breaker_open_s=600,
        )
    )
    await ask(pool, "first")
    tried = llm_sim.stats()["requests"]
    assert tried == 1
    for i in range(5):
        await ask(pool, f"then {i}")
    assert llm_sim.stats()["requests"] == tried, "the open breaker kept calls away from a"
    assert served(sim_b) == 6
    snap = {p["provider"]: p for p in await pool_snapshot(redis, pool._settings)}
    assert snap["a"]["breaker_open_for_s"] > 0
    assert snap["b"]["breaker_open_for_s"] == 0


async def test_the_fallback_model_answers_when_no_provider_of_the_model_can(
    settings, llm_sim, sim_b, make_pool
):
    llm_sim.configure(mode="down")
    pool = make_pool(
        with_pool(
            settings,
            [
                entry("a", llm_sim.url, models=("big-model",)),
                entry("b", sim_b.url, models=("small",)),
            ],
        )
    )
    out = await ask(pool, model="big-model", fallback="small")
    assert out.model == "small"
    assert [r["model"] for r in sim_b.requests()] == ["small"]
    assert [r["model"] for r in llm_sim.requests()] == ["big-model"]


class _Shown:
    """Where a reply goes in this test: what was streamed and the final reply."""

    def __init__(self) -> None:
        self.streamed: list[str] = []
        self.final: Reply | None = None

    async def begin(self) -> None:
        return None

    async def stream(self, text: str) -> None:
        self.streamed.append(text)

    async def finish(self, reply: Reply) -> None:
        self.final = reply


async def test_a_bots_fallback_model_wins_over_the_setting_in_the_reply_path(
    settings, llm_sim, sim_b, make_pool, redis
):
    llm_sim.configure(mode="down")
    pooled = with_pool(
        settings,
        [
            entry("a", llm_sim.url, models=("big",)),
            entry("b", sim_b.url, models=("small", "setting-fallback")),
        ],
        fallback_model="setting-fallback",
    )
    pool = make_pool(pooled)
    traffic = Traffic(redis, pooled, Bot(name="t", fallback_model="small"), pool=pool)
    msg = IncomingMessage(
        platform="web", tenant="web", channel="c1", user="u1", message_id=uuid.uuid4().hex,
        text="hi",
    )  # fmt: skip
    completion, cached = await traffic.complete(
        msg,
        msg.job_id,
        _Shown(),
        pool.clients["a"],
        [{"role": "user", "content": "hi"}],
        model="big",
        on_text=None,
        max_tokens=20,
    )
    assert completion.model == "small" and not cached
    assert [r["model"] for r in sim_b.requests()] == ["small"]


async def test_every_provider_failing_gives_up_with_the_breaker_wait(
    settings, llm_sim, sim_b, make_pool
):
    llm_sim.configure(mode="down")
    sim_b.configure(mode="down")
    pool = make_pool(
        with_pool(
            settings,
            [entry("a", llm_sim.url), entry("b", sim_b.url)],
            breaker_failures=1,
            breaker_open_s=120,
            llm_retries=0,
        )
    )
    with pytest.raises(LLMUnavailableError) as info:
        await ask(pool)
    assert info.value.retry_in_s is not None and info.value.retry_in_s > 60


async def test_a_stream_cut_midway_restarts_elsewhere_without_duplicated_text(
    settings, llm_sim, sim_b, make_pool
):
    llm_sim.configure(mode="cut", script=["AAA ", "BBB ", "CCC ", "DDD ", "EEE ", "FFF"])
    sim_b.configure(script=["the ", "whole ", "answer"])
    pool = make_pool(
        with_pool(settings, [entry("a", llm_sim.url, weight=1000), entry("b", sim_b.url)])
    )
    shown: list[str] = []
    out = await ask(pool, shown=shown)
    assert out.text == "the whole answer"
    assert shown, "a streamed some text before it broke"
    # What was shown is only ever a's text growing: b's answer is not spliced onto it,
    # nor streamed over it; it comes whole, as the final answer.
    assert all("AAA ".startswith(s) or s.startswith("AAA ") for s in shown)
    assert all("the" not in s for s in shown)
    assert all(shown[i + 1].startswith(shown[i]) for i in range(len(shown) - 1))


async def test_a_worker_fails_over_when_a_simulator_dies_and_the_final_reply_is_whole(
    settings, sim_b, redis, worker_process, tmp_path
):
    doomed = _start_sim(tmp_path, "doomed")
    try:
        doomed.configure(**{**SIM_DEFAULTS, "first_token_latency_s": 0.3, "token_latency_s": 0.05})
        sim_b.configure(script=["answer ", "from ", "b"])
        pooled = with_pool(
            settings,
            [entry("a", doomed.url, weight=1000), entry("b", sim_b.url)],
            breaker_failures=2,
        )
        worker_process(settings_env(pooled))
        async with web_adapter(pooled) as (base, _), aiohttp.ClientSession() as http:
            session = await open_session(http, base)
            first = await post(http, base, session, "before the crash")
            events = await wait_done(redis, settings.key_prefix, [(session, first)], 30)
            assert done_event(events[first])["kind"] == "answer"
            doomed.proc.stop()
            sent = [(session, await post(http, base, session, f"after {i}")) for i in range(4)]
            events = await wait_done(redis, settings.key_prefix, sent, 60)
        for _, mid in sent:
            done = done_event(events[mid])
            assert done["kind"] == "answer", done
            assert done["text"] == "answer from b"
        assert served(sim_b) >= 4
    finally:
        doomed.proc.stop()


async def test_a_reply_streamed_from_a_provider_that_broke_is_replaced_whole(
    settings, llm_sim, sim_b, redis, worker_process
):
    llm_sim.configure(mode="cut", script=["AAA ", "BBB ", "CCC ", "DDD "], token_latency_s=0.05)
    sim_b.configure(script=["the ", "whole ", "answer"])
    pooled = with_pool(settings, [entry("a", llm_sim.url, weight=1000), entry("b", sim_b.url)])
    worker_process(settings_env(pooled))
    async with web_adapter(pooled) as (base, _), aiohttp.ClientSession() as http:
        session = await open_session(http, base)
        mid = await post(http, base, session, "hello")
        events = (await wait_done(redis, settings.key_prefix, [(session, mid)], 30))[mid]
    deltas = "".join(e["text"] for e in events if e["type"] == "delta")
    assert deltas.startswith("AAA "), deltas
    assert "the" not in deltas, "b's answer was not streamed onto a's text"
    done = done_event(events)
    assert done["kind"] == "answer" and done["text"] == "the whole answer"
    all_events = await outbox(redis, settings.key_prefix, session)
    assert sum(1 for e in all_events if e["type"] == "done") == 1


async def test_status_shows_each_provider_budget_and_breaker_but_no_key(
    settings, llm_sim, sim_b, make_pool
):
    llm_sim.configure(mode="down")
    pooled = with_pool(
        settings,
        [
            entry("a", llm_sim.url, rpm=300, weight=1000),
            entry(
                "b", sim_b.url, models=(MODEL, "other"), rpm=300, model_limits={"other": {"rpm": 5}}
            ),
        ],
        breaker_failures=1,
        breaker_open_s=600,
    )
    pool = make_pool(pooled)
    for i in range(3):
        await ask(pool, f"q {i}")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sluice", "status", "--json"],
        env={**base_env(), **settings_env(pooled), "COLUMNS": "200"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert dict(status["LLM budget"]) == {"provider pool": "2 providers: see Providers"}
    rows = dict(status["Providers"])
    assert set(rows) == {"a", "b", "b (other)"}
    assert rows["a"].startswith("300 rpm") and "breaker open for" in rows["a"]
    assert "failures 1" in rows["a"]
    assert "calls 3" in rows["b"] and "breaker closed" in rows["b"]
    assert rows["b (other)"].startswith("5 rpm")
    assert "secret" not in done.stdout and "sk-" not in done.stdout


async def test_without_providers_there_is_no_pool_and_a_fallback_model_keeps_the_one_budget(
    settings, llm_sim, redis, make_pool
):
    keys = Keys(settings.key_prefix)
    assert ProviderPool.from_settings(redis, keys, settings) is None
    with_fallback = settings.model_copy(update={"fallback_model": "sluice-sim"})
    pool = ProviderPool.from_settings(redis, keys, with_fallback)
    assert pool is not None
    try:
        assert [(m.name, m.models) for m in pool.members] == [
            ("default", (settings.model, "sluice-sim"))
        ]
        out = await ask(pool, model=settings.model, fallback="sluice-sim")
        assert out.model == settings.model
        # The very budget (keys) a worker without a pool uses.
        assert (await LLMBudget(redis, keys, settings).stats())["calls"] == 1
    finally:
        await pool.close()


# --------------------------------------------------------------------------- bad input


def _settings_error(providers: Any, **env: Any) -> str:
    raw = providers if isinstance(providers, str) else json.dumps(providers)
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, providers=raw, **env)
    return describe_settings_error(info.value)


GOOD = {"name": "main", "base_url": "http://127.0.0.1:1/v1", "api_key": "sk-x", "models": [MODEL]}


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ({"api_key": None}, "provider #2 ('second'): missing its key"),
        ({"base_url": None}, "provider #2 ('second'): missing its base_url"),
        ({"base_url": "ftp://x"}, "provider #2 ('second'): base_url must start with http"),
        ({"models": None}, "provider #2 ('second'): missing its models"),
        ({"models": []}, "provider #2 ('second'): missing its models"),
        ({"weight": 0}, "provider #2 ('second'): weight must be a number above 0"),
        ({"weight": -2}, "provider #2 ('second'): weight must be a number above 0"),
        ({"name": "main"}, "provider 'main' is listed twice"),
        ({"name": None}, "provider #2: missing its name"),
        ({"rpm": 0}, "provider #2 ('second'): rpm: Input should be greater than or equal to 1"),
        ({"colour": "red"}, "provider #2 ('second'): colour: Extra inputs are not permitted"),
        ({"model_limits": {"nope": {"rpm": 1}}}, "model_limits names 'nope'"),
    ],
)
def test_a_bad_provider_entry_is_a_clear_error_that_names_it(broken, expected):
    second = {**GOOD, "name": "second", "api_key": "sk-never-shown-123", **broken}
    second = {k: v for k, v in second.items() if v is not None}
    message = _settings_error([GOOD, second])
    assert "SLUICE_PROVIDERS: " in message and expected in message, message
    assert "sk-never-shown-123" not in message


def test_providers_that_are_not_a_json_list_are_a_clear_error():
    assert "SLUICE_PROVIDERS: not valid JSON" in _settings_error("[{oops")
    assert "expected a list of provider objects" in _settings_error({"name": "x"})


def test_a_key_named_by_api_key_env_comes_from_the_environment_or_the_secrets_dir(
    monkeypatch, tmp_path
):
    entry_ = {**GOOD, "api_key": None, "api_key_env": "POOL_KEY_A"}
    del entry_["api_key"]
    message = _settings_error([entry_])
    assert "provider 'main': api_key_env names 'POOL_KEY_A'" in message
    monkeypatch.setenv("POOL_KEY_A", "sk-from-env")
    s = Settings(_env_file=None, providers=json.dumps([entry_]))
    assert s.providers[0].api_key is not None
    assert s.providers[0].api_key.get_secret_value() == "sk-from-env"
    monkeypatch.delenv("POOL_KEY_A")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "POOL_KEY_A").write_text("sk-from-file\n")
    s = Settings(_env_file=None, providers=json.dumps([entry_]), secrets_dir=str(secrets))
    assert s.providers[0].api_key is not None
    assert s.providers[0].api_key.get_secret_value() == "sk-from-file"


def test_providers_come_from_a_toml_or_json_file_too(tmp_path):
    toml = tmp_path / "providers.toml"
    toml.write_text(
        '[[providers]]\nname = "east"\nbase_url = "http://127.0.0.1:1/v1"\n'
        'api_key = "sk-e"\nmodels = ["m1"]\nweight = 2\n'
    )
    s = Settings(_env_file=None, providers=json.dumps([GOOD]), providers_file=str(toml))
    assert [(p.name, p.weight) for p in s.providers] == [("main", 1.0), ("east", 2.0)]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**GOOD, "name": "west", "weight": 0}]))
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, providers_file=str(bad))
    message = describe_settings_error(info.value)
    assert f"SLUICE_PROVIDERS_FILE={bad}: provider #1 ('west'): weight" in message
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, providers_file=str(tmp_path / "missing.toml"))
    assert "cannot read it" in describe_settings_error(info.value)


def test_a_worker_with_a_bad_provider_entry_stops_at_start_up_naming_it(settings):
    env = {
        **base_env(),
        **settings_env(settings),
        "SLUICE_PROVIDERS": json.dumps([GOOD, {**GOOD, "name": "backup", "weight": 0}]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "sluice", "worker"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "SLUICE_PROVIDERS: provider #2 ('backup'): weight must be a number above 0" in (
        done.stderr
    ), done.stderr
    assert "Traceback" not in done.stderr

"""The LLM simulator, driven by the real openai SDK (and raw aiohttp where the SDK can't go)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from multidict import CIMultiDict
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from sluice.llmsim import SimConfig, format_duration, start_sim

USER_Q = "What is the capital of France?"
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@dataclass
class Sim:
    config: SimConfig
    runner: web.AppRunner
    port: int
    client: openai.AsyncOpenAI
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def get_json(self, path: str) -> Any:
        async with self.http.get(self.url + path) as resp:
            assert resp.status == 200
            return await resp.json()

    async def set_config(self, **changes: Any) -> Any:
        async with self.http.post(self.url + "/_sim/config", json=changes) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def post_raw(
        self, data: bytes | io.BytesIO, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, CIMultiDict[str]]:
        async with self.http.post(
            self.url + "/v1/chat/completions",
            data=data,
            headers={"Content-Type": "application/json", **(headers or {})},
        ) as resp:
            return resp.status, await resp.json(), CIMultiDict(resp.headers)


def fast_config(**overrides: Any) -> SimConfig:
    values: dict[str, Any] = {"first_token_latency_s": 0.005, "token_latency_s": 0.001}
    values.update(overrides)
    return SimConfig(**values)


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    config = fast_config()
    runner, port = await start_sim(config)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0, timeout=10
    )
    http = aiohttp.ClientSession()
    try:
        yield Sim(config, runner, port, client, http)
    finally:
        await http.close()
        await client.close()
        await runner.cleanup()


def user(text: str) -> list[Any]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


async def stream_text(sim: Sim, messages: list[Any], **kwargs: Any) -> tuple[str, Any, Any]:
    """(text, finish_reason, usage) of a streamed answer."""
    stream = await sim.client.chat.completions.create(
        model="sluice-sim", messages=messages, stream=True, **kwargs
    )
    parts: list[str] = []
    finish = usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    return "".join(parts), finish, usage


# --------------------------------------------------------------------------- answers


async def test_non_stream_answer_echoes_question_with_usage(sim: Sim) -> None:
    completion = await sim.client.chat.completions.create(model="sluice-sim", messages=user(USER_Q))
    text = completion.choices[0].message.content
    assert text is not None
    assert text.startswith(f"Echo: {USER_Q}")
    assert len(text.split()) == sim.config.tokens
    assert completion.object == "chat.completion"
    assert completion.model == "sluice-sim"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == sim.config.tokens
    assert completion.usage.prompt_tokens == -(-len("You are terse." + USER_Q) // 4)
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


async def test_stream_answer_matches_non_stream_and_reports_usage(sim: Sim) -> None:
    text, finish, usage = await stream_text(
        sim, user(USER_Q), stream_options={"include_usage": True}
    )
    completion = await sim.client.chat.completions.create(model="sluice-sim", messages=user(USER_Q))
    assert text == completion.choices[0].message.content
    assert finish == "stop"
    assert usage is not None
    assert usage.completion_tokens == sim.config.tokens


async def test_stream_sends_one_chunk_per_token_then_done(sim: Sim) -> None:
    body = {"model": "m", "messages": user("hi"), "stream": True}
    async with sim.http.post(sim.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert len(content) == sim.config.tokens
    assert all(piece.endswith(" ") for piece in content[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


async def test_script_streams_exactly_its_pieces_one_chunk_each(sim: Sim) -> None:
    pieces = ["Heads up <", "!channel>", " and ", "<@U1>"]
    await sim.set_config(script=pieces)
    body = {"model": "m", "messages": user("hi"), "stream": True}
    async with sim.http.post(sim.url + "/v1/chat/completions", json=body) as resp:
        raw = (await resp.read()).decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert content == pieces
    answer = await sim.client.chat.completions.create(model="m", messages=user("hi"))
    assert answer.choices[0].message.content == "".join(pieces)
    for bad in ({"script": []}, {"script": ["a", 1]}, {"script": "abc"}):
        async with sim.http.post(sim.url + "/_sim/config", json=bad) as resp:
            assert resp.status == 400
    await sim.set_config(script=None)
    again = await sim.client.chat.completions.create(model="m", messages=user("hi"))
    assert again.choices[0].message.content.startswith("Echo: hi")


async def test_same_conversation_gives_same_answer_and_another_differs(sim: Sim) -> None:
    async def ask(messages: list[Any]) -> str:
        completion = await sim.client.chat.completions.create(model="m", messages=messages)
        return completion.choices[0].message.content or ""

    first = await ask(user(USER_Q))
    assert await ask(user(USER_Q)) == first
    other = await ask([{"role": "system", "content": "Be verbose."}, *user(USER_Q)[1:]])
    assert other.startswith(f"Echo: {USER_Q}")
    assert other != first


async def test_echo_collapses_whitespace_and_keeps_200_chars(sim: Sim) -> None:
    completion = await sim.client.chat.completions.create(
        model="m", messages=user("hello \n\t  world  " + "x" * 500)
    )
    text = completion.choices[0].message.content or ""
    assert text.startswith("Echo: hello world xxx")
    assert text.split()[3] == "x" * (200 - len("hello world "))


async def test_max_tokens_truncates_with_finish_reason_length(sim: Sim) -> None:
    completion = await sim.client.chat.completions.create(
        model="m", messages=user("short"), max_tokens=5
    )
    assert completion.choices[0].finish_reason == "length"
    assert len((completion.choices[0].message.content or "").split()) == 5
    assert completion.usage is not None and completion.usage.completion_tokens == 5


async def test_models_lists_model_ids_and_healthz_answers_ok(sim: Sim) -> None:
    models = await sim.client.models.list()
    assert "sluice-sim" in [m.id for m in models.data]
    async with sim.http.get(sim.url + "/healthz") as resp:
        assert resp.status == 200
        assert await resp.text() == "ok"


# --------------------------------------------------------------------------- tools


async def test_tool_call_non_stream_then_tool_result_is_echoed(sim: Sim) -> None:
    question = 'Weather in Paris? [[tool:get_weather {"city": "Paris"}]]'
    first = await sim.client.chat.completions.create(
        model="m", messages=user(question), tools=TOOLS
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.id.startswith("call_")
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    messages = [
        *user(question),
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "clear"}'},
    ]
    second = await sim.client.chat.completions.create(model="m", messages=messages, tools=TOOLS)
    text = second.choices[0].message.content or ""
    assert second.choices[0].finish_reason == "stop"
    assert text.startswith(f"Echo: {question}")
    assert 'Tool result: {"temp_c": 21, "sky": "clear"}' in text
    stats = await sim.get_json("/_sim/stats")
    assert stats["tool_calls"] == 1


async def test_tool_call_streamed_is_parsed_by_sdk(sim: Sim) -> None:
    question = 'Weather? [[tool:get_weather {"city": "Zürich", "days": [1, 2]}]]'
    async with sim.client.chat.completions.stream(
        model="m", messages=user(question), tools=TOOLS
    ) as stream:
        async for _event in stream:
            pass
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Zürich", "days": [1, 2]}

    non_stream = await sim.client.chat.completions.create(
        model="m", messages=user(question), tools=TOOLS
    )
    same = non_stream.choices[0].message.tool_calls
    assert same is not None
    assert isinstance(same[0], ChatCompletionMessageFunctionToolCall)
    assert (same[0].id, same[0].function.name, same[0].function.arguments) == (
        calls[0].id,
        calls[0].function.name,
        calls[0].function.arguments,
    )


async def test_tool_directive_without_args_calls_with_empty_object(sim: Sim) -> None:
    completion = await sim.client.chat.completions.create(
        model="m", messages=user("now [[tool:get_time]] please"), tools=TOOLS
    )
    calls = completion.choices[0].message.tool_calls
    assert calls is not None
    assert isinstance(calls[0], ChatCompletionMessageFunctionToolCall)
    assert calls[0].function.name == "get_time"
    assert calls[0].function.arguments == "{}"


async def test_tool_directive_is_plain_text_without_tools(sim: Sim) -> None:
    question = "[[tool:get_weather]]"
    completion = await sim.client.chat.completions.create(model="m", messages=user(question))
    assert completion.choices[0].message.tool_calls is None
    assert (completion.choices[0].message.content or "").startswith(f"Echo: {question}")


async def test_tool_result_answer_streams_text(sim: Sim) -> None:
    messages = [
        *user("[[tool:get_weather]]"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    text, finish, _ = await stream_text(sim, messages, tools=TOOLS)
    assert finish == "stop"
    assert "Tool result: sunny" in text


# --------------------------------------------------------------------------- provider limits


async def test_rpm_limit_answers_429_with_retry_after(sim: Sim) -> None:
    await sim.set_config(rpm=2)
    for _ in range(2):
        await sim.client.chat.completions.create(model="m", messages=user("hi"))
    with pytest.raises(openai.RateLimitError) as caught:
        await sim.client.chat.completions.create(model="m", messages=user("hi"))
    err = caught.value
    headers = err.response.headers
    # One request refills every 30 s at 2 RPM.
    assert 28 <= int(headers["retry-after"]) <= 30
    assert 27_000 < int(headers["retry-after-ms"]) <= 30_000
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert headers["x-request-id"].startswith("req_")
    body = err.response.json()
    assert body["error"]["type"] == "requests"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["param"] is None
    assert body["error"]["message"].startswith("Rate limit reached for requests")
    stats = await sim.get_json("/_sim/stats")
    assert stats["rate_limited"] == 1
    assert stats["completions"] == 2


async def test_tpm_limit_answers_429_with_tokens_type(sim: Sim) -> None:
    # Each request costs ceil(len("You are terse.hi") / 4) + 20 = 24 tokens.
    await sim.set_config(tpm=50)
    for _ in range(2):
        await sim.client.chat.completions.create(model="m", messages=user("hi"))
    with pytest.raises(openai.RateLimitError) as caught:
        await sim.client.chat.completions.create(model="m", messages=user("hi"))
    body = caught.value.response.json()
    assert body["error"]["type"] == "tokens"
    assert body["error"]["code"] == "rate_limit_exceeded"
    headers = caught.value.response.headers
    assert headers["x-ratelimit-limit-tokens"] == "50"
    assert int(headers["retry-after"]) >= 1
    assert "x-ratelimit-limit-requests" not in headers


async def test_success_carries_ratelimit_headers(sim: Sim) -> None:
    await sim.set_config(rpm=600, tpm=100_000)
    raw = await sim.client.chat.completions.with_raw_response.create(
        model="m", messages=user("hi"), max_tokens=10
    )
    headers = raw.headers
    assert headers["x-ratelimit-limit-requests"] == "600"
    assert headers["x-ratelimit-remaining-requests"] == "599"
    assert headers["x-ratelimit-reset-requests"] == "100ms"
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    assert headers["x-ratelimit-remaining-tokens"] == str(100_000 - (4 + 10))
    assert headers["x-ratelimit-reset-tokens"].endswith("ms")
    assert headers["x-request-id"].startswith("req_")
    assert raw.parse().choices[0].message.content


async def test_no_limit_headers_without_limits(sim: Sim) -> None:
    raw = await sim.client.chat.completions.with_raw_response.create(model="m", messages=user("hi"))
    assert raw.headers["x-request-id"].startswith("req_")
    assert not [h for h in raw.headers if h.lower().startswith("x-ratelimit")]


async def test_reset_refills_limit_windows(sim: Sim) -> None:
    await sim.set_config(rpm=1)
    await sim.client.chat.completions.create(model="m", messages=user("hi"))
    with pytest.raises(openai.RateLimitError):
        await sim.client.chat.completions.create(model="m", messages=user("hi"))
    async with sim.http.post(sim.url + "/_sim/reset") as resp:
        assert resp.status == 200
    await sim.client.chat.completions.create(model="m", messages=user("hi"))


def test_durations_use_openai_format() -> None:
    assert format_duration(0.25) == "250ms"
    assert format_duration(1) == "1s"
    assert format_duration(8.64) == "8.64s"
    assert format_duration(360) == "6m0s"
    assert format_duration(90.5) == "1m30.5s"
    assert format_duration(3661) == "1h1m1s"
    assert format_duration(0) == "0s"


# --------------------------------------------------------------------------- faults


async def test_down_mode_answers_500_until_back_to_normal(sim: Sim) -> None:
    new = await sim.set_config(mode="down")
    assert new["mode"] == "down"
    with pytest.raises(openai.InternalServerError) as caught:
        await sim.client.chat.completions.create(model="m", messages=user("hi"))
    assert caught.value.response.json()["error"]["type"] == "server_error"
    await sim.set_config(mode="normal")
    await sim.client.chat.completions.create(model="m", messages=user("hi"))
    stats = await sim.get_json("/_sim/stats")
    assert stats["errors"] == 1
    assert stats["completions"] == 1


async def test_429_mode_answers_rate_limit_errors(sim: Sim) -> None:
    await sim.set_config(mode="429")
    with pytest.raises(openai.RateLimitError) as caught:
        await sim.client.chat.completions.create(model="m", messages=user("hi"))
    assert caught.value.response.headers["retry-after"] == "1"


async def test_cut_mode_stream_ends_without_finish(sim: Sim) -> None:
    await sim.set_config(mode="cut")
    finish = None
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        stream = await sim.client.chat.completions.create(
            model="m", messages=user(USER_Q), stream=True
        )
        async for chunk in stream:
            for choice in chunk.choices:
                received.append(choice.delta.content or "")
                finish = finish or choice.finish_reason
    assert finish is None
    assert "".join(received).startswith("Echo:")


async def test_cut_mode_drops_non_stream_connection(sim: Sim) -> None:
    await sim.set_config(mode="cut")
    with pytest.raises(openai.APIConnectionError):
        await sim.client.chat.completions.create(model="m", messages=user("hi"))


async def test_hang_mode_never_answers(sim: Sim) -> None:
    await sim.set_config(mode="hang")
    with pytest.raises(openai.APITimeoutError):
        await sim.client.chat.completions.create(model="m", messages=user("hi"), timeout=0.3)
    stats = await sim.get_json("/_sim/stats")
    assert stats["completions"] == 0
    assert stats["errors"] == 0


async def test_error_rate_is_deterministic_with_seed(sim: Sim) -> None:
    async def outcomes() -> list[bool]:
        async with sim.http.post(sim.url + "/_sim/reset") as resp:
            assert resp.status == 200
        results = []
        for _ in range(30):
            try:
                await sim.client.chat.completions.create(model="m", messages=user("hi"))
            except openai.InternalServerError:
                results.append(False)
            else:
                results.append(True)
        return results

    await sim.set_config(error_rate=0.5, seed=7, first_token_latency_s=0, token_latency_s=0)
    first = await outcomes()
    assert await outcomes() == first
    assert 3 <= first.count(False) <= 27
    stats = await sim.get_json("/_sim/stats")
    assert stats["errors"] == first.count(False)


async def test_wrong_key_answers_401_when_key_required(sim: Sim) -> None:
    await sim.set_config(require_key="sk-right")
    with pytest.raises(openai.AuthenticationError) as caught:
        await sim.client.chat.completions.create(model="m", messages=user("hi"))
    body = caught.value.response.json()
    assert body["error"]["code"] == "invalid_api_key"
    assert "sk-test" not in json.dumps(body)
    good = openai.AsyncOpenAI(
        base_url=f"{sim.url}/v1", api_key="sk-right", max_retries=0, timeout=10
    )
    try:
        await good.chat.completions.create(model="m", messages=user("hi"))
    finally:
        await good.close()
    config = await sim.get_json("/_sim/config")
    assert config["require_key"] == "***"


async def test_client_disconnect_mid_stream_logs_no_error(
    sim: Sim, caplog: pytest.LogCaptureFixture
) -> None:
    await sim.set_config(token_latency_s=0.02)
    caplog.set_level(logging.DEBUG)
    body = {"model": "m", "messages": user("hi"), "stream": True}
    resp = await sim.http.post(sim.url + "/v1/chat/completions", json=body)
    await resp.content.readline()
    resp.close()
    for _ in range(100):
        if (await sim.get_json("/_sim/stats"))["active"] == 0:
            break
        await asyncio.sleep(0.02)
    assert (await sim.get_json("/_sim/stats"))["active"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if r.exc_info]


# --------------------------------------------------------------------------- bad input


async def test_malformed_json_answers_400_openai_shaped(sim: Sim) -> None:
    status, body, headers = await sim.post_raw(b'{"messages": [')
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] is None
    assert body["error"]["code"] is None
    assert body["error"]["message"]
    assert headers["x-request-id"].startswith("req_")


async def test_missing_messages_answers_400(sim: Sim) -> None:
    status, body, _ = await sim.post_raw(b'{"model": "m"}')
    assert status == 400
    assert "messages" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        await sim.client.chat.completions.create(model="m", messages=[])


async def test_invalid_utf8_answers_400(sim: Sim) -> None:
    status, body, _ = await sim.post_raw(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}')
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"


async def test_body_over_8mb_answers_413(sim: Sim) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]})
    status, body, _ = await sim.post_raw(io.BytesIO(big.encode()))
    assert status == 413
    assert body["error"]["type"] == "invalid_request_error"


async def test_odd_unicode_is_echoed(sim: Sim) -> None:
    question = "naïve 🚀 \u202e עברית"
    completion = await sim.client.chat.completions.create(model="m", messages=user(question))
    assert (completion.choices[0].message.content or "").startswith(f"Echo: {question}")
    # A lone surrogate can't come through the SDK; send it escaped, as JSON allows.
    status, body, _ = await sim.post_raw(
        b'{"messages": [{"role": "user", "content": "bad \\ud83d surrogate"}]}'
    )
    assert status == 200
    assert body["choices"][0]["message"]["content"].startswith("Echo: bad \ud83d surrogate")


# --------------------------------------------------------------------------- control endpoints


async def test_stats_count_requests_completions_and_tokens(sim: Sim) -> None:
    await sim.client.chat.completions.create(model="m", messages=user("hi"))
    await stream_text(sim, user("hi"))
    await sim.post_raw(b"not json")
    stats = await sim.get_json("/_sim/stats")
    assert stats["requests"] == 3
    assert stats["completions"] == 2
    assert stats["errors"] == 0
    assert stats["rate_limited"] == 0
    assert stats["completion_tokens"] == 2 * sim.config.tokens
    assert stats["prompt_tokens"] == 2 * 4
    assert stats["active"] == 0
    assert stats["max_active"] >= 1


async def test_concurrent_streams_are_all_answered(sim: Sim) -> None:
    results = await asyncio.gather(*(stream_text(sim, user(f"q{i}")) for i in range(50)))
    assert all(text.startswith(f"Echo: q{i} ") for i, (text, _, _) in enumerate(results))
    stats = await sim.get_json("/_sim/stats")
    assert stats["max_active"] > 1


async def test_request_log_keeps_last_bodies_and_reset_clears(sim: Sim) -> None:
    for i in range(3):
        await sim.client.chat.completions.create(model="m", messages=user(f"q{i}"))
    last_two = await sim.get_json("/_sim/requests?limit=2")
    assert [r["messages"][-1]["content"] for r in last_two] == ["q1", "q2"]
    assert len(await sim.get_json("/_sim/requests")) == 3
    async with sim.http.post(sim.url + "/_sim/reset") as resp:
        assert resp.status == 200
    assert await sim.get_json("/_sim/requests") == []
    assert (await sim.get_json("/_sim/stats"))["requests"] == 0


async def test_config_endpoint_rejects_unknown_or_invalid_fields(sim: Sim) -> None:
    for bad in ({"nope": 1}, {"mode": "sideways"}, {"rpm": -5}, {"tokens": "many"}):
        async with sim.http.post(sim.url + "/_sim/config", json=bad) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
    new = await sim.set_config(tokens=7, rpm=None)
    assert new["tokens"] == 7
    assert sim.config.tokens == 7


async def test_shutdown_releases_hanging_and_streaming_requests_quickly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = fast_config(mode="hang")
    runner, port = await start_sim(config)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:

        async def call(stream: bool) -> int:
            body = {"messages": user("hi"), "stream": stream}
            try:
                async with http.post(url + "/v1/chat/completions", json=body) as resp:
                    await resp.read()
                    return resp.status
            except aiohttp.ClientError:
                return -1

        hanging = asyncio.create_task(call(False))
        await asyncio.sleep(0.1)
        config.mode = "normal"
        config.token_latency_s = 5.0
        streaming = asyncio.create_task(call(True))
        await asyncio.sleep(0.1)
        async with http.get(url + "/_sim/stats") as resp:
            assert (await resp.json())["active"] == 2
        loop = asyncio.get_running_loop()
        started = loop.time()
        await runner.cleanup()
        assert loop.time() - started < 0.5
        results = await asyncio.gather(hanging, streaming)
    assert results[0] != 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

"""The LLM client reads the provider's event stream itself (the SDK still sends the
request and maps HTTP errors): what odd or hostile streams do to it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from core.errors import LLMTransientError
from core.llm.client import OpenAIProvider
from core.settings import Settings

ABORT = b"<abort>"


def _chunk(content: str | None = None, finish: str | None = None, **extra: object) -> str:
    delta = {"content": content} if content is not None else {}
    body = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return json.dumps(body)


@pytest.fixture
async def provider_serving() -> AsyncIterator[object]:
    """``serve(body)``: an OpenAI-compatible endpoint answering ``body`` as its stream."""
    bodies: list[bytes] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "x-ratelimit-limit-requests": "600"}
        )
        await resp.prepare(request)
        body = bodies[-1]
        for i in range(0, len(body), 7):  # arbitrary network-sized pieces
            await resp.write(body[i : i + 7])
        if body.endswith(ABORT):
            request.transport.abort()  # type: ignore[union-attr]
        else:
            await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    settings = Settings(
        _env_file=None, openai_base_url=f"http://127.0.0.1:{port}/v1", llm_timeout_s=10
    )
    provider = OpenAIProvider(settings)

    async def serve(body: str) -> object:
        bodies.append(body.encode())
        return await provider.complete([{"role": "user", "content": "hi"}], model="m")

    try:
        yield serve
    finally:
        await provider.close()
        await runner.cleanup()


async def test_multi_line_data_comments_and_a_last_event_without_blank_line(provider_serving):
    first = json.loads(_chunk("Hel"))
    body = (
        ": a comment the client ignores\n\n"
        + "data: "
        + json.dumps(first, indent=1).replace("\n", "\ndata: ")
        + "\n\n"
        + f"data: {_chunk('lo')}\r\n\r\n"
        + f"data: {_chunk(finish='stop', usage={'prompt_tokens': 3, 'completion_tokens': 2})}"
    )
    out = await provider_serving(body)
    assert (out.text, out.finish_reason, out.tokens_in, out.tokens_out) == ("Hello", "stop", 3, 2)
    assert out.headers == {"x-ratelimit-limit-requests": "600"}


async def test_done_ends_the_stream_and_tool_call_fragments_are_merged(provider_serving):
    tc = [
        {"index": 0, "id": "call_1", "function": {"name": "look", "arguments": '{"q": '}},
        {"index": 0, "function": {"arguments": '"x"}'}},
    ]
    body = "".join(
        f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'tool_calls': [t]}}]})}\n\n"
        for t in tc
    )
    body += f"data: {_chunk(finish='tool_calls')}\n\ndata: [DONE]\n\ndata: {_chunk('late')}\n\n"
    out = await provider_serving(body)
    assert out.text == ""
    assert out.tool_calls == [{"id": "call_1", "name": "look", "arguments": '{"q": "x"}'}]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('event: error\ndata: {"error": {"message": "overloaded"}}\n\n', "overloaded"),
        ('data: {"error": {"message": "server melted"}}\n\n', "server melted"),
        ("data: {not json\n\n", "not JSON"),
        ("data: [1, 2]\n\n", "not an object"),
        (f"data: {_chunk('cut off')}\n\n", "ended before the answer was complete"),
    ],
)
async def test_a_broken_stream_is_a_transient_error_with_a_clear_message(
    provider_serving, body, says
):
    with pytest.raises(LLMTransientError, match=says):
        await provider_serving(body)


async def test_a_connection_dropped_mid_stream_is_a_transient_error(provider_serving):
    with pytest.raises(LLMTransientError, match="stream broke"):
        await provider_serving(f"data: {_chunk('half an ans')}\n\n<abort>")

"""The LLM client: the official openai SDK against any OpenAI-compatible endpoint.

One :class:`OpenAIProvider` per worker process (created in the worker's
``on_startup``); the SDK's own retries are off (``max_retries=0``) so that retries
happen here only, with backoff, jitter and the server's ``retry-after``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx2

from core.errors import (
    LLMError,
    LLMRateLimitedError,
    LLMRequestError,
    LLMTransientError,
    LLMUnavailableError,
)
from core.infra import metrics, tracing
from core.settings import Settings

logger = logging.getLogger(__name__)

ChatMessage = dict[str, Any]
OnText = Callable[[str], Awaitable[None]]


@dataclass
class Completion:
    """The result of one model call."""

    text: str
    model: str
    tokens_in: int = 0
    tokens_out: int = 0
    finish_reason: str | None = None
    first_token_s: float | None = None
    latency_s: float = 0.0
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)


class LLMProvider(Protocol):
    """What workers need from a model: one streamed chat completion."""

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        on_text: OnText | None = None,
        **params: Any,
    ) -> Completion: ...

    async def close(self) -> None: ...


class CallGate(Protocol):
    """Called around every attempt by :func:`complete_with_retries` (the shared budget)."""

    async def before_call(self) -> None: ...

    async def after_success(self, completion: Completion) -> None: ...

    async def after_failure(self, error: LLMError) -> None: ...


def _retry_after_s(headers: Any) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass  # fall through to the seconds header
    s = headers.get("retry-after")
    if s:
        try:
            return float(s)
        except ValueError:
            return None
    return None


def wrap_openai_error(e: Exception) -> LLMError:
    """Map an openai SDK exception onto Sluice's error tree."""
    import openai  # imported where used: processes that call no model skip its ~0.5 s load

    if isinstance(e, openai.RateLimitError):
        return LLMRateLimitedError(
            f"provider rate limit (429): {e.message}", _retry_after_s(e.response.headers)
        )
    if isinstance(e, openai.APIStatusError):
        if e.status_code >= 500 or e.status_code in (408, 409):
            return LLMTransientError(f"provider error {e.status_code}: {e.message}")
        return LLMRequestError(f"provider refused the request ({e.status_code}): {e.message}")
    if isinstance(e, openai.APITimeoutError | openai.APIConnectionError):
        return LLMTransientError(f"cannot reach the provider: {type(e).__name__}")
    return LLMTransientError(f"provider call failed: {type(e).__name__}: {e}")


class OpenAIProvider:
    """Streams chat completions through one ``AsyncOpenAI`` client."""

    def __init__(
        self, settings: Settings, *, base_url: str | None = None, api_key: str | None = None
    ) -> None:
        key = api_key or (
            settings.openai_api_key.get_secret_value() if settings.openai_api_key else "sim"
        )
        self._settings = settings
        import openai  # see wrap_openai_error

        self.client = openai.AsyncOpenAI(
            api_key=key,
            base_url=base_url or settings.openai_base_url,
            max_retries=0,
            timeout=openai.Timeout(settings.llm_timeout_s, connect=settings.llm_connect_timeout_s),
        )

    async def close(self) -> None:
        """Close the HTTP connections."""
        await self.client.close()

    @tracing.traced_llm
    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        on_text: OnText | None = None,
        **params: Any,
    ) -> Completion:
        """One streamed call; ``on_text`` gets the whole text so far after each delta.

        Raises:
            LLMError: a wrapped SDK error; :class:`LLMTransientError` when a retry may help.
        """
        import openai  # see wrap_openai_error

        started = time.monotonic()
        params = {k: v for k, v in params.items() if v is not None}
        try:
            return await asyncio.wait_for(
                self._stream(messages, model, on_text, started, params),
                timeout=self._settings.llm_timeout_s,
            )
        except TimeoutError as e:
            raise LLMTransientError("the provider timed out (first token or whole answer)") from e
        except openai.OpenAIError as e:
            raise wrap_openai_error(e) from e

    async def _stream(
        self,
        messages: Sequence[ChatMessage],
        model: str,
        on_text: OnText | None,
        started: float,
        params: dict[str, Any],
    ) -> Completion:
        # The first token must come within llm_first_token_timeout_s of the request;
        # after it only the overall llm_timeout_s applies.
        first_token = asyncio.timeout(self._settings.llm_first_token_timeout_s)
        out = Completion(text="", model=model)
        parts: list[str] = []
        tool_calls: dict[int, dict[str, Any]] = {}
        async with first_token:
            # The SDK builds the request, authenticates and maps HTTP errors; the stream's
            # chunks are read as JSON here rather than as one pydantic model per token,
            # which was the largest share of a worker's CPU (docs/benchmarks.md).
            async with self.client.chat.completions.with_streaming_response.create(  # type: ignore[call-overload]
                model=model,
                messages=list(messages),
                stream=True,
                stream_options={"include_usage": True},
                **params,
            ) as response:
                out.headers = {
                    k.lower(): v
                    for k, v in response.headers.items()
                    if k.lower().startswith("x-ratelimit")
                }
                async for chunk in _sse_chunks(_lines(response.iter_lines())):
                    usage = chunk.get("usage")
                    if usage:
                        out.tokens_in = int(usage.get("prompt_tokens") or 0)
                        out.tokens_out = int(usage.get("completion_tokens") or 0)
                    for choice in chunk.get("choices") or ():
                        if out.first_token_s is None:
                            out.first_token_s = time.monotonic() - started
                            first_token.reschedule(None)
                        if choice.get("finish_reason"):
                            out.finish_reason = choice["finish_reason"]
                        delta = choice.get("delta") or {}
                        _collect_tool_calls(tool_calls, delta.get("tool_calls"))
                        content = delta.get("content")
                        if content:
                            parts.append(content)
                            if on_text is not None:
                                await on_text("".join(parts))
        out.text = "".join(parts)
        out.tool_calls = [tool_calls[i] for i in sorted(tool_calls)]
        out.latency_s = time.monotonic() - started
        if out.finish_reason is None:
            raise LLMTransientError("the provider's stream ended before the answer was complete")
        return out


async def _lines(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The stream's lines; a connection that breaks mid-stream is a transient error."""
    try:
        async for line in lines:
            yield line
    except httpx2.TransportError as e:
        raise LLMTransientError(f"the provider's stream broke: {type(e).__name__}") from e


async def _sse_chunks(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of an OpenAI-style server-sent event stream, up to ``[DONE]``.

    Raises:
        LLMTransientError: the provider sent an error event or a chunk that is not JSON.
    """
    event: str | None = None
    data: list[str] = []
    async for line in lines:
        if line:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            elif field == "event":
                event = value
            continue
        if data:
            chunk = _sse_event(event, "\n".join(data))
            if chunk is None:
                return
            yield chunk
        event, data = None, []
    if data:  # a last event without its blank line
        chunk = _sse_event(event, "\n".join(data))
        if chunk is not None:
            yield chunk


def _sse_event(event: str | None, payload: str) -> dict[str, Any] | None:
    """One event's JSON object; ``None`` for ``[DONE]``."""
    if payload.strip() == "[DONE]":
        return None
    try:
        chunk = json.loads(payload)
    except ValueError as e:
        raise LLMTransientError("the provider sent a stream chunk that is not JSON") from e
    if not isinstance(chunk, dict):
        raise LLMTransientError("the provider sent a stream chunk that is not an object")
    if event == "error" or chunk.get("error"):
        error = chunk.get("error")
        detail = error.get("message") if isinstance(error, dict) else error
        raise LLMTransientError(f"the provider's stream reported an error: {detail}")
    return chunk


def _collect_tool_calls(acc: dict[int, dict[str, Any]], deltas: Any) -> None:
    """Merge streamed tool-call fragments (JSON objects) into ``acc`` by index."""
    for tc in deltas or ():
        slot = acc.setdefault(int(tc.get("index") or 0), {"id": "", "name": "", "arguments": ""})
        if tc.get("id"):
            slot["id"] = tc["id"]
        function = tc.get("function") or {}
        if function.get("name"):
            slot["name"] += function["name"]
        if function.get("arguments"):
            slot["arguments"] += function["arguments"]


async def complete_with_retries(
    provider: LLMProvider,
    messages: Sequence[ChatMessage],
    *,
    model: str,
    retries: int,
    on_text: OnText | None = None,
    base_delay_s: float = 0.5,
    max_delay_s: float = 20.0,
    gate: CallGate | None = None,
    **params: Any,
) -> Completion:
    """Call the model, retrying transient failures with capped, jittered backoff.

    The one retry layer for LLM calls. A retry is only made while nothing was
    streamed yet, so a user never sees an answer start twice. 429s wait for the
    server's ``retry-after`` when it gives one. ``gate`` (the shared LLM budget) is
    awaited before every attempt and told how each ended.

    Raises:
        LLMUnavailableError: every attempt failed, or a stream broke after text was shown.
        LLMRequestError: the provider refused the request; retrying cannot help.
    """
    streamed = ""

    async def tracking(text: str) -> None:
        nonlocal streamed
        streamed = text
        if on_text is not None:
            await on_text(text)

    attempt = 0
    while True:
        if gate is not None:
            await gate.before_call()
        t0 = time.monotonic()
        try:
            out = await provider.complete(messages, model=model, on_text=tracking, **params)
        except LLMError as e:
            outcome = "rate_limited" if isinstance(e, LLMRateLimitedError) else "error"
            metrics.record_llm_call(outcome, time.monotonic() - t0)
            if gate is not None:
                await gate.after_failure(e)
            if not isinstance(e, LLMTransientError):
                raise
            if streamed or attempt >= retries:
                raise LLMUnavailableError(
                    f"gave up after {attempt + 1} attempt(s): {e}", partial_text=streamed
                ) from e
            delay = min(max_delay_s, base_delay_s * 2**attempt) * (0.5 + random.random())
            if isinstance(e, LLMRateLimitedError) and e.retry_after_s is not None:
                delay = max(delay, e.retry_after_s + random.random() * 0.25)
            attempt += 1
            logger.warning("llm attempt %d failed (%s); retrying in %.2fs", attempt, e, delay)
            await asyncio.sleep(delay)
            continue
        metrics.record_llm_call(
            "ok",
            time.monotonic() - t0,
            first_token_s=out.first_token_s,
            tokens_in=out.tokens_in,
            tokens_out=out.tokens_out,
        )
        if gate is not None:
            await gate.after_success(out)
        return out

"""An OpenAI-compatible Chat Completions simulator, built on ``aiohttp.web``.

It is the LLM for local development, for every test and for load benchmarks:
deterministic (same conversation -> same answer), cheap (one event loop serves
thousands of concurrent streams) and able to misbehave on demand (provider
rate limits with real 429s and headers, injected 500s, hangs, cut streams).

Endpoints
---------
``POST /v1/chat/completions``
    The OpenAI Chat Completions API, streamed (SSE) or not. The answer is
    ``Echo: <last user message>`` followed by filler words picked by a hash of
    the whole conversation, ``SimConfig.tokens`` words in all (or, when
    ``SimConfig.script`` is set, exactly those pieces, one streamed chunk each). A last user
    message holding ``[[tool:NAME {json args}]]`` (with ``tools`` in the
    request) is answered with a tool call; once ``tool`` results follow it, the
    answer echoes ``Tool result: <content>``. Image parts (``image_url`` with a
    ``data:image/...;base64,`` URL) are checked and decoded; the echo names each image
    of the last user message as ``[image WxH]`` (``/_sim/stats`` counts them).
``GET /v1/models``
    A couple of model ids.
``GET /_sim/stats``, ``GET /_sim/requests?limit=N``, ``POST /_sim/config``, ``POST /_sim/reset``
    Introspection and runtime control for tests and benchmarks.
``GET /healthz``
    ``ok``.

Provider limits
---------------
``rpm`` and ``tpm`` are enforced with token buckets that refill continuously:
capacity = the per-minute limit, refill rate = limit / 60 s. That is how the
real API behaves and what its headers describe: ``x-ratelimit-remaining-*`` is
what is left in the bucket, ``x-ratelimit-reset-*`` is the time until the bucket
is full again (OpenAI duration format: ``1s``, ``6m0s``, ``250ms``), and a 429's
``retry-after``/``retry-after-ms`` is the time until the denied request would
fit. A request costs one request and ``ceil(prompt chars / 4) + (max tokens or
SimConfig.tokens)`` tokens, where prompt chars are the characters of the
messages' text content, plus 765 tokens per image part. Denied requests cost
nothing. Changing a limit at runtime starts a fresh, full bucket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import logging
import math
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from aiohttp import web

__all__ = ["SimConfig", "create_app", "main", "start_sim"]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
"""Request bodies larger than this are answered 413."""

MODES = ("normal", "down", "hang", "cut", "429")
"""Runtime fault modes accepted by ``SimConfig.mode``."""

MODELS = ("sluice-sim", "gpt-4o-mini")
"""Model ids listed by ``GET /v1/models`` (any model id is accepted)."""

REQUEST_LOG_SIZE = 1000
_LOGGED_BODY_MAX_CHARS = 256 * 1024
_ECHO_CHARS = 200
# What an image part costs (OpenAI's price of a 1024x1024 image at high detail).
IMAGE_TOKENS = 765
_DATA_URL = re.compile(r"data:image/(png|jpeg|gif|webp);base64,([A-Za-z0-9+/=\s]+)", re.S)
_TOOL_RESULT_CHARS = 500
_ARGS_PIECE_CHARS = 8
_SHUTDOWN_TIMEOUT_S = 2.0
_HANG_POLL_S = 0.2
_FINGERPRINT = "fp_sluice_sim"

_FILLER = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu", "river", "stone", "cloud", "lantern", "harbor", "meadow",
    "signal", "copper", "maple", "orbit", "pixel", "quartz", "ember", "falcon",
    "glacier", "willow", "canyon", "beacon", "cedar", "dune", "fjord", "grove",
    "island", "jasper", "kernel", "lotus", "mosaic", "nectar", "opal", "prism",
    "ridge", "saffron", "tundra", "umber", "vertex", "wharf", "yarrow", "zephyr",
)  # fmt: skip

_TOOL_DIRECTIVE = re.compile(r"\[\[tool:([A-Za-z0-9_.\-]+)")


@dataclass
class SimConfig:
    """Behaviour of the simulator; ``POST /_sim/config`` changes it at runtime.

    The app reads this object live, so mutating it in-process works too.
    """

    first_token_latency_s: float = 0.05
    """Delay before the first token (non-stream answers wait for the whole answer)."""
    token_latency_s: float = 0.01
    """Delay between streamed tokens."""
    tokens: int = 20
    """Completion tokens (words) per answer, unless ``max_tokens`` is lower."""
    rpm: int | None = None
    """Provider limit, requests per minute (None = unlimited)."""
    tpm: int | None = None
    """Provider limit, tokens per minute, prompt + completion estimate (None = unlimited)."""
    error_rate: float = 0.0
    """Fraction of requests answered HTTP 500, decided by a hash of (seed, request number)."""
    seed: int = 0
    """Seed for the filler words, the ids and the injected errors."""
    mode: str = "normal"
    """``normal`` | ``down`` (all 500) | ``hang`` (never answer) |
    ``cut`` (connection closed halfway, no ``[DONE]``) | ``429`` (all 429)."""
    require_key: str | None = None
    """When set, ``Authorization: Bearer <key>`` must carry exactly this key (else 401)."""
    script: list[str] | None = None
    """When set, every text answer is exactly these pieces joined, streamed one piece
    per chunk (tests use it to cut an answer at a chosen place, e.g. ``["<", "!here>"]``)."""


# --------------------------------------------------------------------------- errors


class _ApiError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(
        self,
        status: int,
        message: str,
        err_type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.code = code
        self.headers = headers or {}

    def response(self, headers: dict[str, str]) -> web.Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": None,
                "code": self.code,
            }
        }
        return web.json_response(body, status=self.status, headers={**headers, **self.headers})


def _server_error(
    message: str = "The server had an error while processing your request.",
) -> _ApiError:
    return _ApiError(500, message, "server_error")


# --------------------------------------------------------------------------- rate limits


def format_duration(seconds: float) -> str:
    """Format seconds the way OpenAI's ``x-ratelimit-reset-*`` headers do (``250ms``, ``6m0s``)."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    millis = math.ceil(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs = f"{millis / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class _Bucket:
    """A token bucket of ``limit`` per minute, refilling continuously."""

    __slots__ = ("level", "limit", "stamp")

    def __init__(self, limit: int, now: float) -> None:
        self.limit = limit
        self.level = float(limit)
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(float(self.limit), self.level + (now - self.stamp) * self.limit / 60)
            self.stamp = now

    def wait_for(self, amount: int) -> float:
        """Seconds until ``amount`` fits (infinite if it never can)."""
        if amount > self.limit:
            return math.inf
        return max(0.0, (amount - self.level) * 60 / self.limit)

    def until_full(self) -> float:
        return (self.limit - self.level) * 60 / self.limit


class _Limiter:
    """RPM and TPM buckets following the live config."""

    def __init__(self, config: SimConfig) -> None:
        self._config = config
        self._requests: _Bucket | None = None
        self._tokens: _Bucket | None = None

    def reset(self) -> None:
        self._requests = None
        self._tokens = None

    def _sync(self, now: float) -> tuple[_Bucket | None, _Bucket | None]:
        rpm, tpm = self._config.rpm, self._config.tpm
        if rpm is None:
            self._requests = None
        elif self._requests is None or self._requests.limit != rpm:
            self._requests = _Bucket(rpm, now)
        if tpm is None:
            self._tokens = None
        elif self._tokens is None or self._tokens.limit != tpm:
            self._tokens = _Bucket(tpm, now)
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.refill(now)
        return self._requests, self._tokens

    def acquire(self, tokens: int, now: float) -> None:
        """Take one request and ``tokens`` tokens, or raise a 429 ``_ApiError``."""
        requests, token_bucket = self._sync(now)
        if requests is not None and requests.level < 1:
            wait = requests.wait_for(1)
            raise _rate_limited(
                f"Rate limit reached for requests per min (RPM): Limit {requests.limit}, "
                f"Used {requests.limit - math.floor(requests.level)}, Requested 1. "
                f"Please try again in {format_duration(wait)}.",
                "requests",
                wait,
            )
        if token_bucket is not None and token_bucket.level < tokens:
            wait = token_bucket.wait_for(tokens)
            if math.isinf(wait):
                raise _rate_limited(
                    f"Request too large for tokens per min (TPM): Limit {token_bucket.limit}, "
                    f"Requested {tokens}. The input or output tokens must be reduced.",
                    "tokens",
                    60.0,
                )
            raise _rate_limited(
                f"Rate limit reached for tokens per min (TPM): Limit {token_bucket.limit}, "
                f"Used {token_bucket.limit - math.floor(token_bucket.level)}, "
                f"Requested {tokens}. Please try again in {format_duration(wait)}.",
                "tokens",
                wait,
            )
        if requests is not None:
            requests.level -= 1
        if token_bucket is not None:
            token_bucket.level -= tokens

    def headers(self, now: float) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers for the current state (empty when unlimited)."""
        requests, tokens = self._sync(now)
        out: dict[str, str] = {}
        for name, bucket in (("requests", requests), ("tokens", tokens)):
            if bucket is not None:
                out[f"x-ratelimit-limit-{name}"] = str(bucket.limit)
                out[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(bucket.level)))
                out[f"x-ratelimit-reset-{name}"] = format_duration(bucket.until_full())
        return out


def _rate_limited(message: str, kind: str, wait_s: float) -> _ApiError:
    wait_s = max(wait_s, 0.001)
    return _ApiError(
        429,
        message,
        kind,
        "rate_limit_exceeded",
        headers={
            "retry-after": str(max(1, math.ceil(wait_s))),
            "retry-after-ms": str(max(1, math.ceil(wait_s * 1000))),
        },
    )


# --------------------------------------------------------------------------- state


@dataclass
class _Stats:
    requests: int = 0
    completions: int = 0
    rate_limited: int = 0
    errors: int = 0
    tool_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    active: int = 0
    max_active: int = 0


@dataclass
class _SimState:
    config: SimConfig
    stats: _Stats = field(default_factory=_Stats)
    log: deque[Any] = field(default_factory=lambda: deque(maxlen=REQUEST_LOG_SIZE))
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    limiter: _Limiter = field(init=False)
    responses: int = 0
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.limiter = _Limiter(self.config)

    def next_id(self, prefix: str) -> str:
        self.responses += 1
        return prefix + _digest(f"{self.config.seed}:{prefix}:{self.responses}")[:24]

    def reset(self) -> None:
        active, max_active = self.stats.active, self.stats.active
        self.stats = _Stats(active=active, max_active=max_active)
        self.log.clear()
        self.limiter.reset()
        self.responses = 0


STATE_KEY = web.AppKey("sluice_llmsim_state", _SimState)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


# --------------------------------------------------------------------------- request parsing


def _content_text(content: Any) -> str:
    """The text of a message ``content`` (a string, or a list of content parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return str(content)


def _collapse(text: str, limit: int) -> str:
    return " ".join(text.split())[:limit].strip()


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _ApiError(400, f"Invalid '{name}': expected a positive integer.")
    return value


def _validate(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _ApiError(400, "The request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _ApiError(400, "Missing required parameter: 'messages' (a non-empty array).")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _ApiError(400, f"Invalid 'messages[{i}]': expected an object with a 'role'.")
        if isinstance(message.get("content"), list):
            _validate_parts(message["content"], i)
    if "model" in body and not isinstance(body["model"], str):
        raise _ApiError(400, "Invalid 'model': expected a string.")
    if not isinstance(body.get("stream", False), bool | None):
        raise _ApiError(400, "Invalid 'stream': expected a boolean.")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _ApiError(400, "Invalid 'tools': expected an array.")
    _positive_int(body, "max_tokens")
    _positive_int(body, "max_completion_tokens")
    return body


def _validate_parts(parts: list[Any], i: int) -> None:
    """Content parts as the API takes them: text, or an image as a URL or data URL."""
    for j, part in enumerate(parts):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
            raise _ApiError(400, f"Invalid '{where}': expected a 'text' or 'image_url' part.")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise _ApiError(400, f"Invalid '{where}.text': expected a string.")
        if part["type"] == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str):
                raise _ApiError(400, f"Invalid '{where}.image_url': expected an object with a url.")
            if url.startswith("data:") and _image_size(url) is None:
                raise _ApiError(
                    400, f"Invalid image in '{where}': the data URL is not a supported image."
                )


def _image_size(url: str) -> tuple[int, int] | None:
    """Width and height of the image in a ``data:`` URL; ``None`` if it is not one."""
    match = _DATA_URL.fullmatch(url)
    if match is None:
        return None
    try:
        data = base64.b64decode(match.group(2), validate=False)
        from PIL import Image, UnidentifiedImageError

        with Image.open(io.BytesIO(data)) as image:
            return image.width, image.height
    except (ValueError, OSError, UnidentifiedImageError):
        return None


def _images(content: Any) -> list[tuple[int, int]]:
    """Sizes of the data-URL images of a message's content (remote URLs count 0x0)."""
    if not isinstance(content, list):
        return []
    out = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image_url":
            url = str(part["image_url"]["url"])
            out.append(_image_size(url) or (0, 0) if url.startswith("data:") else (0, 0))
    return out


def _image_count(messages: list[dict[str, Any]]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if p.get("type") == "image_url"
    )


async def _read_body(request: web.Request) -> dict[str, Any]:
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise _ApiError(413, f"Request body too large: the limit is {MAX_BODY_BYTES} bytes.")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise _ApiError(
            413, f"Request body too large: the limit is {MAX_BODY_BYTES} bytes."
        ) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _ApiError(400, "The request body is not valid UTF-8.") from exc
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
        ) from exc
    return _validate(body)


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class _ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class _Plan:
    """What to answer: text words or tool calls, and the usage to report."""

    words: list[str]
    tool_calls: list[_ToolCall]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    sep: str = " "  # between words; "" for a script, whose pieces are exact
    images: int = 0  # image parts in the request

    @property
    def text(self) -> str:
        return self.sep.join(self.words)


def _parse_tool_directives(text: str, conversation: str) -> list[_ToolCall]:
    """Find ``[[tool:NAME {json args}]]`` directives; args are optional (default ``{}``)."""
    calls: list[_ToolCall] = []
    decoder = json.JSONDecoder()
    for match in _TOOL_DIRECTIVE.finditer(text):
        rest = text[match.end() :]
        stripped = rest.lstrip()
        arguments = "{}"
        if not stripped.startswith("]]"):
            try:
                value, end = decoder.raw_decode(stripped)
            except ValueError:
                close = stripped.find("]]")
                raw = stripped[: close if close >= 0 else len(stripped)].strip()
                arguments = raw or "{}"
            else:
                arguments = json.dumps(value)
                if not stripped[end:].lstrip().startswith("]]"):
                    continue
        call_id = "call_" + _digest(f"{conversation}:{len(calls)}:{match.group(1)}")[:24]
        calls.append(_ToolCall(call_id, match.group(1), arguments))
    return calls


def _last_user_index(messages: list[dict[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    return -1


def _plan(body: dict[str, Any], config: SimConfig) -> _Plan:
    messages: list[dict[str, Any]] = body["messages"]
    prompt_chars = sum(len(_content_text(m.get("content"))) for m in messages)
    images = _image_count(messages)
    prompt_tokens = max(1, math.ceil(prompt_chars / 4)) + IMAGE_TOKENS * images
    conversation = json.dumps(messages, sort_keys=True, separators=(",", ":"))
    conv_hash = _digest(f"{config.seed}:{conversation}")
    last_user = _last_user_index(messages)
    user_text = _content_text(messages[last_user].get("content")) if last_user >= 0 else ""
    after = messages[last_user + 1 :]
    tool_results = [m for m in after if m.get("role") == "tool"]

    if body.get("tools") and body.get("tool_choice") != "none" and not tool_results:
        calls = _parse_tool_directives(user_text, conv_hash)
        if calls:
            size = sum(len(c.name) + len(c.arguments) for c in calls)
            return _Plan(
                [], calls, "tool_calls", prompt_tokens, max(1, math.ceil(size / 4)), images=images
            )

    if config.script is not None:
        return _Plan(list(config.script), [], "stop", prompt_tokens, len(config.script), "", images)
    words = ["Echo:", *_collapse(user_text, _ECHO_CHARS).split()]
    if last_user >= 0:
        words += [f"[image {w}x{h}]" for w, h in _images(messages[last_user].get("content"))]
    if tool_results:
        result = _content_text(tool_results[-1].get("content"))
        words += ["Tool", "result:", *_collapse(result, _TOOL_RESULT_CHARS).split()]
    rng = random.Random(int(conv_hash, 16))
    words += [rng.choice(_FILLER) for _ in range(config.tokens - len(words))]
    limit = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    finish = "stop"
    if limit is not None and limit < len(words):
        words, finish = words[:limit], "length"
    return _Plan(words, [], finish, prompt_tokens, len(words), images=images)


def _token_estimate(body: dict[str, Any], config: SimConfig) -> int:
    """prompt chars / 4 + (max_completion_tokens | max_tokens | SimConfig.tokens)."""
    chars = sum(len(_content_text(m.get("content"))) for m in body["messages"])
    limit = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    images = IMAGE_TOKENS * _image_count(body["messages"])
    return math.ceil(chars / 4) + images + (limit if limit is not None else config.tokens)


def _usage(plan: _Plan) -> dict[str, Any]:
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.completion_tokens,
        "total_tokens": plan.prompt_tokens + plan.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _completion_body(plan: _Plan, completion_id: str, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    if plan.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in plan.tool_calls
        ]
    else:
        message["content"] = plan.text
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": _FINGERPRINT,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": plan.finish_reason}
        ],
        "usage": _usage(plan),
    }


class _ChunkWriter:
    """Builds SSE ``chat.completion.chunk`` events cheaply from a fixed prefix."""

    def __init__(self, completion_id: str, model: str) -> None:
        self._head = (
            f'data: {{"id":"{completion_id}","object":"chat.completion.chunk",'
            f'"created":{int(time.time())},"model":{json.dumps(model)},'
            f'"system_fingerprint":"{_FINGERPRINT}","choices":'
        )

    def delta(self, delta: str, finish_reason: str | None = None) -> bytes:
        finish = "null" if finish_reason is None else f'"{finish_reason}"'
        return (
            f'{self._head}[{{"index":0,"delta":{delta},"logprobs":null,'
            f'"finish_reason":{finish}}}]}}\n\n'
        ).encode()

    def usage(self, plan: _Plan) -> bytes:
        usage = json.dumps(_usage(plan), separators=(",", ":"))
        return f'{self._head}[],"usage":{usage}}}\n\n'.encode()


def _stream_events(plan: _Plan, writer: _ChunkWriter) -> Iterator[bytes]:
    """The content events of a stream: role, one per token / tool-call piece, finish."""
    if plan.tool_calls:
        yield writer.delta('{"role":"assistant","content":null,"refusal":null}')
        for index, call in enumerate(plan.tool_calls):
            head = {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                ]
            }
            yield writer.delta(json.dumps(head, separators=(",", ":")))
            args = call.arguments
            for start in range(0, len(args), _ARGS_PIECE_CHARS):
                piece = {
                    "tool_calls": [
                        {
                            "index": index,
                            "function": {"arguments": args[start : start + _ARGS_PIECE_CHARS]},
                        }
                    ]
                }
                yield writer.delta(json.dumps(piece, separators=(",", ":")))
    else:
        yield writer.delta('{"role":"assistant","content":"","refusal":null}')
        last = len(plan.words) - 1
        for i, word in enumerate(plan.words):
            token = word if i == last else word + plan.sep
            yield writer.delta('{"content":' + json.dumps(token) + "}")
    yield writer.delta("{}", plan.finish_reason)


# --------------------------------------------------------------------------- handlers


def _check_auth(request: web.Request, config: SimConfig) -> None:
    expected = config.require_key
    if expected is None:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        key.strip().encode("utf-8", "surrogateescape"), expected.encode("utf-8")
    ):
        raise _ApiError(
            401,
            "Incorrect API key provided. You can find your API key in your simulator config.",
            "invalid_request_error",
            "invalid_api_key",
        )


def _injected_error(state: _SimState) -> bool:
    rate = state.config.error_rate
    if rate <= 0:
        return False
    draw = int(_digest(f"{state.config.seed}:error:{state.stats.requests}"), 16) / 16**32
    return draw < rate


async def _wait_closed(request: web.Request, state: _SimState) -> None:
    """Wait until the client goes away or the server shuts down."""
    while not state.closing.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_HANG_POLL_S):
                await state.closing.wait()


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _answer_json(
    request: web.Request, state: _SimState, plan: _Plan, headers: dict[str, str], model: str
) -> web.StreamResponse:
    config = state.config
    pieces = len(plan.words) or len(plan.tool_calls)
    await asyncio.sleep(config.first_token_latency_s + config.token_latency_s * max(0, pieces - 1))
    if config.mode == "cut":
        state.stats.errors += 1
        _abort(request)
        return web.Response(status=500)
    _count_answer(state, plan)
    body = _completion_body(plan, state.next_id("chatcmpl-"), model)
    return web.json_response(body, headers=headers)


def _count_answer(state: _SimState, plan: _Plan) -> None:
    stats = state.stats
    stats.completions += 1
    stats.tool_calls += len(plan.tool_calls)
    stats.images += plan.images
    stats.prompt_tokens += plan.prompt_tokens
    stats.completion_tokens += plan.completion_tokens


async def _answer_stream(
    request: web.Request,
    state: _SimState,
    plan: _Plan,
    headers: dict[str, str],
    body: dict[str, Any],
) -> web.StreamResponse:
    config = state.config
    writer = _ChunkWriter(state.next_id("chatcmpl-"), str(body.get("model") or MODELS[0]))
    events = list(_stream_events(plan, writer))
    cut = config.mode == "cut"
    if cut:
        events = events[: max(1, len(events) // 2)]
    else:
        _count_answer(state, plan)
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            events.append(writer.usage(plan))
        events.append(b"data: [DONE]\n\n")

    response = web.StreamResponse(
        headers={**headers, "Cache-Control": "no-cache", "Content-Type": "text/event-stream"}
    )
    loop = asyncio.get_running_loop()
    start = loop.time() + config.first_token_latency_s
    try:
        await response.prepare(request)
        sent = 0
        while sent < len(events):
            # Event i is due at start + (i - 1) * latency (role and first token together);
            # when the loop lags, every due event goes out in one write.
            due = start + max(0, sent - 1) * config.token_latency_s
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if state.closing.is_set():
                _abort(request)
                return response
            now = loop.time()
            until = sent + 1
            while until < len(events) and start + (until - 1) * config.token_latency_s <= now:
                until += 1
            await response.write(b"".join(events[sent:until]))
            sent = until
        if cut:
            state.stats.errors += 1
            _abort(request)
            return response
        await response.write_eof()
    except ConnectionError:
        logger.debug("client went away mid-stream")
    return response


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    stats = state.stats
    stats.requests += 1
    stats.active += 1
    stats.max_active = max(stats.max_active, stats.active)
    headers = {"x-request-id": state.next_id("req_")}
    task = asyncio.current_task()
    if task is not None:
        state.tasks.add(task)
    try:
        return await _handle_chat(request, state, headers)
    except _ApiError as exc:
        if exc.status == 429:
            state.stats.rate_limited += 1
        elif exc.status >= 500:
            state.stats.errors += 1
        headers.update(state.limiter.headers(time.monotonic()))
        return exc.response(headers)
    finally:
        # ``stats`` may have been replaced by a reset meanwhile: decrement the live one.
        state.stats.active = max(0, state.stats.active - 1)
        if task is not None:
            state.tasks.discard(task)


async def _handle_chat(
    request: web.Request, state: _SimState, headers: dict[str, str]
) -> web.StreamResponse:
    config = state.config
    _check_auth(request, config)
    body = await _read_body(request)
    _log_request(state, body)
    if config.mode == "down":
        raise _server_error()
    if config.mode == "429":
        raise _rate_limited(
            "Rate limit reached for requests (simulated provider overload).", "requests", 1.0
        )
    if config.mode == "hang":
        # Never answers; only returns once the client left or the server shuts down.
        await _wait_closed(request, state)
        return _ApiError(503, "The simulator is shutting down.", "server_error").response(headers)
    now = time.monotonic()
    state.limiter.acquire(_token_estimate(body, config), now)
    headers.update(state.limiter.headers(now))
    if _injected_error(state):
        raise _server_error()
    plan = _plan(body, config)
    if body.get("stream"):
        return await _answer_stream(request, state, plan, headers, body)
    return await _answer_json(request, state, plan, headers, str(body.get("model") or MODELS[0]))


def _log_request(state: _SimState, body: dict[str, Any]) -> None:
    size = sum(len(_content_text(m.get("content"))) for m in body["messages"])
    if size > _LOGGED_BODY_MAX_CHARS:
        state.log.append(
            {
                "model": body.get("model"),
                "stream": body.get("stream", False),
                "messages_count": len(body["messages"]),
                "truncated": True,
                "prompt_chars": size,
            }
        )
    else:
        state.log.append(_without_image_data(body))


def _without_image_data(body: dict[str, Any]) -> dict[str, Any]:
    """The body as logged: each image data URL replaced by a short summary."""
    if not _image_count(body["messages"]):
        return body
    messages = []
    for m in body["messages"]:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                url = p.get("image_url", {}).get("url", "") if p.get("type") == "image_url" else ""
                if url.startswith("data:"):
                    size = _image_size(url)
                    shown = f"{url[:30]}… ({len(url):,} chars, {size[0]}x{size[1]})" if size else ""
                    p = {**p, "image_url": {**p["image_url"], "url": shown}}
                parts.append(p)
            m = {**m, "content": parts}
        messages.append(m)
    return {**body, "messages": messages}


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        _check_auth(request, state.config)
    except _ApiError as exc:
        return exc.response({})
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "sluice"} for m in MODELS]
    return web.json_response({"object": "list", "data": data})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[STATE_KEY].stats))


async def _requests(request: web.Request) -> web.Response:
    log = request.app[STATE_KEY].log
    raw = request.query.get("limit")
    try:
        limit = len(log) if raw is None else int(raw)
    except ValueError:
        limit = -1
    if limit < 0:
        return _ApiError(400, "'limit' must be a non-negative integer.").response({})
    items = list(log)[len(log) - min(limit, len(log)) :] if limit else []
    return web.json_response(items)


def _public_config(config: SimConfig) -> dict[str, Any]:
    out = asdict(config)
    if out["require_key"] is not None:
        out["require_key"] = "***"
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CONFIG_CHECKS: dict[str, Callable[[Any], bool]] = {
    "first_token_latency_s": lambda v: _is_number(v) and 0 <= v < math.inf,
    "token_latency_s": lambda v: _is_number(v) and 0 <= v < math.inf,
    "tokens": lambda v: _is_int(v) and 0 <= v <= 1_000_000,
    "rpm": lambda v: v is None or (_is_int(v) and v > 0),
    "tpm": lambda v: v is None or (_is_int(v) and v > 0),
    "error_rate": lambda v: _is_number(v) and 0 <= v <= 1,
    "seed": _is_int,
    "mode": lambda v: v in MODES,
    "require_key": lambda v: v is None or (isinstance(v, str) and v != ""),
    "script": lambda v: (
        v is None
        or (isinstance(v, list) and 0 < len(v) <= 10_000 and all(isinstance(p, str) for p in v))
    ),
}


async def _set_config(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        changes = json.loads(await request.text())
    except ValueError:
        return _ApiError(400, "Body must be a JSON object.").response({})
    if not isinstance(changes, dict):
        return _ApiError(400, "Body must be a JSON object.").response({})
    known = {f.name for f in fields(SimConfig)}
    for name, value in changes.items():
        if name not in known:
            return _ApiError(400, f"Unknown config field {name!r}.").response({})
        if not _CONFIG_CHECKS[name](value):
            return _ApiError(400, f"Invalid value for {name!r}.").response({})
    for name, value in changes.items():
        setattr(state.config, name, float(value) if name.endswith("_s") else value)
    logger.info("simulator config changed: %s", sorted(changes))
    return web.json_response(_public_config(state.config))


async def _get_config(request: web.Request) -> web.Response:
    return web.json_response(_public_config(request.app[STATE_KEY].config))


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.json_response({"ok": True})


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = request.app[STATE_KEY].next_id("req_")


async def _on_shutdown(app: web.Application) -> None:
    """Release hanging and slow requests at once instead of waiting for them."""
    state = app[STATE_KEY]
    state.closing.set()
    for task in list(state.tasks):
        task.cancel()


# --------------------------------------------------------------------------- public API


def create_app(config: SimConfig) -> web.Application:
    """Build the simulator app; ``config`` is read live (see ``POST /_sim/config``)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE_KEY] = _SimState(config)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/_sim/stats", _stats)
    app.router.add_get("/_sim/requests", _requests)
    app.router.add_get("/_sim/config", _get_config)
    app.router.add_post("/_sim/config", _set_config)
    app.router.add_post("/_sim/reset", _reset)
    app.router.add_get("/healthz", _healthz)
    app.on_response_prepare.append(_add_request_id)
    app.on_shutdown.append(_on_shutdown)
    return app


async def start_sim(
    config: SimConfig, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Start the simulator in the running loop; returns the runner and the bound port.

    ``port=0`` picks a free port. Stop it with ``await runner.cleanup()``.
    """
    runner = web.AppRunner(
        create_app(config), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1])
    logger.info("LLM simulator listening on http://%s:%d/v1", host, bound)
    return runner, bound


def main(port: int, config: SimConfig, host: str = "127.0.0.1") -> None:
    """Run the simulator until interrupted (the ``sluice llm-sim`` command)."""

    def banner(*lines: Any) -> None:
        for line in " ".join(str(line) for line in lines).splitlines():
            logger.info("%s", line.strip())

    web.run_app(
        create_app(config),
        host=host,
        port=port,
        access_log=None,
        print=banner,
        backlog=4096,
        shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
    )

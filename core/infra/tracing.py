"""OpenTelemetry traces: one trace per message, from the adapter to each delivery.

Off unless ``SLUICE_OTEL_ENDPOINT`` is set (an OTLP/HTTP traces URL, e.g.
``http://otel-collector:4318/v1/traces``); then the optional extra must be installed
(``pip install 'sluice[otel]'``). Spans of one message, all in one trace:

=======================  =============================  ===================================
span                     where                          attributes
=======================  =============================  ===================================
``sluice.receive``       adapter: dedupe and enqueue    platform, tenant, lane, accepted
``sluice.enqueue``       adapter: the arq job           platform, lane
``sluice.job``           worker: the reply job starts   platform, lane, job try
``chat <model>``         worker: each LLM call attempt  GenAI conventions: gen_ai.request.model,
                                                        gen_ai.usage.input_tokens/output_tokens
``sluice.deliver <op>``  worker: each responder call    platform, op (begin, stream, finish…)
=======================  =============================  ===================================

The context travels in the job: ``sluice.enqueue`` writes a W3C ``traceparent`` into
``IncomingMessage.meta``, and the worker continues that trace. No message text, user
name or secret is ever an attribute.

Spans are exported by a background thread (OpenTelemetry's batch processor, bounded
queue), so a slow or dead collector never slows or blocks a reply: a failing export
logs one warning, then nothing more until exports work again.

The hooks elsewhere are one decorator each: :func:`traced_receive` on
``core.traffic.queue.accept_message``, :func:`traced_enqueue` on
``core.traffic.queue.enqueue_reply``, :func:`traced_job` on
``workers.jobs.reply``, :func:`traced_llm` on ``core.llm.client.OpenAIProvider.complete``
and :func:`traced_delivery` on the delivery call.
"""

from __future__ import annotations

import functools
import logging
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from core.errors import ConfigError
from core.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
Fn = TypeVar("Fn", bound=Callable[..., Awaitable[Any]])

_lock = threading.Lock()
_provider: Any = None
_tracer: Any = None


def _redacted(endpoint: str) -> str:
    """The endpoint without user info or query (a token may be in either)."""
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def setup(settings: Settings) -> Any:
    """The process's tracer, set up at the first call from ``settings`` (or ``None``).

    Raises:
        ConfigError: ``SLUICE_OTEL_ENDPOINT`` is set but OpenTelemetry is not installed.
    """
    global _provider, _tracer
    if _tracer is not None or not settings.otel_endpoint:
        return _tracer
    with _lock:
        if _tracer is not None:
            return _tracer
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as e:
            raise ConfigError(
                "SLUICE_OTEL_ENDPOINT is set but OpenTelemetry is not installed: "
                "pip install 'sluice[otel]'"
            ) from e
        exporter: Any = _OneWarningExporter(
            OTLPSpanExporter(endpoint=settings.otel_endpoint, timeout=settings.otel_timeout_s),
            _redacted(settings.otel_endpoint),
        )
        provider = TracerProvider(resource=Resource.create({"service.name": "sluice"}))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        # The exporter's own retry and failure lines would repeat for every batch;
        # _OneWarningExporter says it once instead.
        logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.CRITICAL)
        _provider, _tracer = provider, provider.get_tracer("sluice")
        logger.info("traces go to %s", _redacted(settings.otel_endpoint))
        return _tracer


def flush(timeout_s: float = 5.0) -> None:
    """Export the spans still buffered (before a process exits, or in tests)."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


def shutdown() -> None:
    """Flush and stop tracing in this process; the next :func:`setup` starts again."""
    global _provider, _tracer
    with _lock:
        provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


class _OneWarningExporter:
    """Wraps the OTLP exporter: one warning when exports start failing, one line when
    they work again; never raises into the batch thread."""

    def __init__(self, inner: Any, where: str) -> None:
        self._inner = inner
        self._where = where
        self._failing = False

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        error = ""
        try:
            result = self._inner.export(spans)
        except Exception as e:  # the batch thread must live on; reported below
            result, error = SpanExportResult.FAILURE, f"{type(e).__name__}: {e}"
        if result == SpanExportResult.SUCCESS:
            if self._failing:
                logger.info("traces reach %s again", self._where)
            self._failing = False
        elif not self._failing:
            self._failing = True
            logger.warning(
                "traces cannot be sent to %s%s; replies are not affected, spans are "
                "dropped until it answers (logged once)",
                self._where,
                f" ({error})" if error else "",
            )
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))


# --------------------------------------------------------------------------- hooks


def _attrs(msg: Any) -> dict[str, str]:
    return {"sluice.platform": msg.platform, "sluice.tenant": msg.tenant, "sluice.lane": msg.lane}


def traced_receive(fn: Fn) -> Fn:
    """``accept_message(redis, settings, msg, *keys)``: the root span of a message."""

    @functools.wraps(fn)
    async def wrapper(redis: Any, settings: Settings, msg: Any, *rest: Any) -> Any:
        tracer = setup(settings)
        if tracer is None:
            return await fn(redis, settings, msg, *rest)
        with tracer.start_as_current_span("sluice.receive", attributes=_attrs(msg)) as span:
            accepted = await fn(redis, settings, msg, *rest)
            span.set_attribute("sluice.accepted", bool(accepted))
            return accepted

    return wrapper  # type: ignore[return-value]


def traced_enqueue(fn: Fn) -> Fn:
    """``enqueue_reply(redis, settings, msg)``: a span, and its ``traceparent`` in the job."""

    @functools.wraps(fn)
    async def wrapper(redis: Any, settings: Settings, msg: Any, *rest: Any) -> Any:
        tracer = setup(settings)
        if tracer is None:
            return await fn(redis, settings, msg, *rest)
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        with tracer.start_as_current_span("sluice.enqueue", attributes=_attrs(msg)):
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
            msg = msg.model_copy(update={"meta": {**msg.meta, **carrier}})
            return await fn(redis, settings, msg, *rest)

    return wrapper  # type: ignore[return-value]


def traced_job(fn: Fn) -> Fn:
    """``reply(ctx, payload)``: continues the message's trace from its ``traceparent``."""

    @functools.wraps(fn)
    async def wrapper(ctx: dict[str, Any], payload: dict[str, Any], *rest: Any) -> Any:
        settings = ctx.get("settings")
        tracer = setup(settings) if isinstance(settings, Settings) else _tracer
        meta = payload.get("meta") if isinstance(payload, dict) else None
        if tracer is None or not isinstance(meta, dict) or "traceparent" not in meta:
            return await fn(ctx, payload, *rest)
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract({"traceparent": str(meta["traceparent"])})
        attributes = {
            "sluice.platform": str(payload.get("platform", "")),
            "sluice.lane": str(payload.get("lane", "")),
            "sluice.job_try": int(ctx.get("job_try") or 1),
        }
        with tracer.start_as_current_span("sluice.job", context=parent, attributes=attributes):
            return await fn(ctx, payload, *rest)

    return wrapper  # type: ignore[return-value]


def traced_llm(fn: Fn) -> Fn:
    """``OpenAIProvider.complete(self, messages, *, model, ...)``: one span per attempt,
    with the GenAI semantic conventions (model, token usage, finish reason)."""

    @functools.wraps(fn)
    async def wrapper(self: Any, messages: Any, *args: Any, **kwargs: Any) -> Any:
        settings = getattr(self, "_settings", None)
        tracer = setup(settings) if isinstance(settings, Settings) else _tracer
        if tracer is None:
            return await fn(self, messages, *args, **kwargs)
        from opentelemetry.trace import SpanKind, Status, StatusCode

        model = str(kwargs.get("model", ""))
        attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": "openai",
            "gen_ai.request.model": model,
        }
        with tracer.start_as_current_span(
            f"chat {model}",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                completion = await fn(self, messages, *args, **kwargs)
            except Exception as e:
                # The error's type only: provider messages may echo request details.
                span.set_status(Status(StatusCode.ERROR, type(e).__name__))
                span.set_attribute("error.type", type(e).__name__)
                raise
            span.set_attribute("gen_ai.response.model", str(completion.model))
            span.set_attribute("gen_ai.usage.input_tokens", int(completion.tokens_in))
            span.set_attribute("gen_ai.usage.output_tokens", int(completion.tokens_out))
            if completion.finish_reason:
                span.set_attribute("gen_ai.response.finish_reasons", [completion.finish_reason])
            return completion

    return wrapper  # type: ignore[return-value]


def traced_delivery(fn: Fn) -> Fn:
    """``_deliver(timing, platform, call)``: one span per responder call."""

    @functools.wraps(fn)
    async def wrapper(timing: Any, platform: str, call: Any, *rest: Any) -> Any:
        tracer = _tracer  # set up by the job already; never by a delivery
        if tracer is None:
            return await fn(timing, platform, call, *rest)
        op = str(getattr(call, "__name__", "call"))
        attributes = {"sluice.platform": platform, "sluice.delivery.op": op}
        with tracer.start_as_current_span(f"sluice.deliver {op}", attributes=attributes):
            return await fn(timing, platform, call, *rest)

    return wrapper  # type: ignore[return-value]

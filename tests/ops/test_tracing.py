"""OpenTelemetry: one trace per message across real processes, and a dead collector.

The web adapter runs in the test process and a real ``sluice worker`` in another; both
export OTLP/HTTP to a receiver this test starts, which decodes the protobuf requests
with OpenTelemetry's own message classes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from core.infra import tracing
from core.settings import Settings
from tests.helpers import free_port, wait_until
from tests.webchat import ChatSession, web_adapter


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A local OTLP/HTTP traces endpoint; yields its URL and the spans it received."""
    spans: list[dict[str, Any]] = []

    async def traces(request: web.Request) -> web.Response:
        body = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in body.resource_spans:
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    spans.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                        }
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/v1/traces", spans
    finally:
        await runner.cleanup()


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Export every 100 ms; stop this process's tracing after the test."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    yield
    tracing.shutdown()


async def test_one_trace_follows_a_message_from_the_adapter_to_each_delivery(
    settings: Settings, llm_sim: Any, worker_process: Callable[..., Any], traced: None
) -> None:
    async with otlp_receiver() as (url, spans):
        otel = settings.model_copy(update={"otel_endpoint": url, "otel_timeout_s": 2.0})
        worker_process({"SLUICE_OTEL_ENDPOINT": url, "OTEL_BSP_SCHEDULE_DELAY": "100"})
        secret_text = f"a private question {uuid.uuid4().hex}"
        async with web_adapter(otel) as (base, _), aiohttp.ClientSession() as http:
            async with ChatSession(http, base) as tab:
                done = await tab.reply(await tab.send(secret_text))
                assert done["kind"] == "answer"

        def names() -> set[str]:
            return {s["name"] for s in spans}

        needed = {"sluice.receive", "sluice.enqueue", "sluice.job", f"chat {settings.model}"}
        await wait_until(
            lambda: needed <= names() and any(n.startswith("sluice.deliver") for n in names()),
            60,
            "the spans of both processes",
        )
        tracing.shutdown()  # nothing more from this process

    [root] = [s for s in spans if s["name"] == "sluice.receive"]
    trace = [s for s in spans if s["trace_id"] == root["trace_id"]]
    # One trace: every span of the message is in it, each under its parent.
    assert {s["name"] for s in trace} >= needed
    by_id = {s["span_id"]: s for s in trace}
    parent_of = {s["name"]: by_id.get(s["parent"], {}).get("name") for s in trace}
    assert parent_of["sluice.enqueue"] == "sluice.receive"
    assert parent_of["sluice.job"] == "sluice.enqueue"  # across processes, via the job
    assert parent_of[f"chat {settings.model}"] == "sluice.job"
    deliveries = [s for s in trace if s["name"].startswith("sluice.deliver")]
    assert {s["attributes"]["sluice.delivery.op"] for s in deliveries} >= {"begin", "finish"}
    # Under the job, or under the model call for updates streamed while it runs.
    assert {by_id[s["parent"]]["name"] for s in deliveries} <= {
        "sluice.job",
        f"chat {settings.model}",
    }, [(s["name"], by_id[s["parent"]]["name"]) for s in deliveries]
    [llm] = [s for s in trace if s["name"] == f"chat {settings.model}"]
    assert llm["attributes"]["gen_ai.request.model"] == settings.model
    assert llm["attributes"]["gen_ai.operation.name"] == "chat"
    assert llm["attributes"]["gen_ai.usage.input_tokens"] > 0
    assert llm["attributes"]["gen_ai.usage.output_tokens"] == 12  # the simulator's answer
    assert root["attributes"]["sluice.platform"] == "web"
    assert root["attributes"]["sluice.accepted"] is True
    # No message text and no key in any span.
    everything = repr(spans)
    assert secret_text not in everything and "private question" not in everything
    assert "sk-test-key" not in everything


async def test_a_dead_collector_logs_one_warning_and_every_message_is_answered(
    settings: Settings, llm_sim: Any, worker_process: Callable[..., Any]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1/traces"
    worker = worker_process(
        {
            "SLUICE_OTEL_ENDPOINT": dead,
            "SLUICE_OTEL_TIMEOUT_S": "1",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
    )
    async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
        async with ChatSession(http, base) as tab:
            for i in range(4):
                done = await tab.reply(await tab.send(f"question {i}"))
                assert done["kind"] == "answer"
            await wait_until(
                lambda: "traces cannot be sent" in worker.output(), 60, "the export warning"
            )
            # More replies, more failed exports: still one warning.
            for i in range(3):
                done = await tab.reply(await tab.send(f"more {i}"))
                assert done["kind"] == "answer"
    output = worker.output()
    assert output.count("traces cannot be sent") == 1, output[-3000:]
    assert "Traceback" not in output


async def test_a_collector_that_refuses_every_export_gets_one_warning_in_all(
    settings: Settings, llm_sim: Any, worker_process: Callable[..., Any]
) -> None:
    attempts: list[int] = []

    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        attempts.append(1)
        return web.Response(status=400, text="bad request")

    app = web.Application()
    app.router.add_post("/v1/traces", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        worker = worker_process(
            {
                "SLUICE_OTEL_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces",
                "OTEL_BSP_SCHEDULE_DELAY": "50",
            }
        )
        async with web_adapter(settings) as (base, _), aiohttp.ClientSession() as http:
            async with ChatSession(http, base) as tab:
                i = 0
                # One message at a time until three exports were refused.
                while len(attempts) < 3:
                    done = await tab.reply(await tab.send(f"question {i}"))
                    assert done["kind"] == "answer"
                    i += 1
                    assert i < 100, "the worker never exported"
    finally:
        await runner.cleanup()
    output = worker.output()
    assert output.count("traces cannot be sent") == 1, output[-3000:]


def test_tracing_is_off_without_an_endpoint_and_needs_the_extra_when_on(settings: Settings) -> None:
    assert tracing.setup(settings) is None
    assert settings.otel_endpoint is None  # the default


def test_the_endpoint_is_logged_without_credentials() -> None:
    redacted = tracing._redacted("https://user:s3cret@otel.example.com:4318/v1/traces?token=abc")
    assert redacted == "https://otel.example.com:4318/v1/traces"

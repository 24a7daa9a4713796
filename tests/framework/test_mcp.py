"""Tools from MCP servers: the official ``mcp`` package on both sides, real processes.

The server is ``tests/framework/mcp_server.py``, run by the worker over stdio or by the
test over streamable HTTP. The simulator calls a tool when the user's message holds
``[[tool:NAME {json}]]``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import mcp.types
import pytest

from core.errors import BotDefinitionError, ConfigError
from core.framework.bot import Bot
from core.framework.mcp import STDERR_LINE_MAX, McpServer, McpToolError, make_mcp_tools
from sluice.bench.procs import Proc
from tests.framework.chat import chat
from tests.helpers import ROOT, base_env, free_port, wait_port, wait_until

MCP_BOT = {"SLUICE_APP": "tests.framework.bots:mcp_bot"}


async def test_an_mcp_servers_tools_are_offered_with_their_schemas_and_called(
    settings, llm_sim, worker_process
):
    worker_process(MCP_BOT)
    async with chat(settings) as c:
        done = await c.ask('What is 2 + 40? [[tool:calc_add {"a": 2, "b": 40}]]')
    assert done["kind"] == "answer"
    assert "Tool result: 42" in done["text"]
    first, second = llm_sim.requests()
    offered = {t["function"]["name"]: t["function"] for t in first["tools"]}
    assert set(offered) == {"calc_add", "calc_shout", "calc_fail", "calc_slow", "calc_die"}
    add = offered["calc_add"]
    assert add["description"] == "Add two whole numbers."
    assert add["parameters"]["properties"]["a"]["type"] == "integer"
    assert add["parameters"]["required"] == ["a", "b"]
    assert second["messages"][-1] == {
        "role": "tool",
        "tool_call_id": second["messages"][-2]["tool_calls"][0]["id"],
        "content": "42",
    }


async def test_a_slow_or_broken_server_fails_its_tool_and_the_bot_keeps_answering(
    settings, llm_sim, worker_process
):
    worker = worker_process(MCP_BOT)
    async with chat(settings) as c:
        slow = await c.ask('Take your time [[tool:calc_slow {"seconds": 30}]]')
        assert slow["kind"] == "answer"
        assert "did not finish" in llm_sim.requests()[-1]["messages"][-1]["content"]
        failed = await c.ask('Please fail [[tool:calc_fail {"reason": "disk on fire"}]]')
        assert failed["kind"] == "answer"
        told = llm_sim.requests()[-1]["messages"][-1]["content"]
        assert "failed" in told and "disk on fire" not in told
        # The server's process dies: its tools fail, the bot goes on answering ...
        crashed = await c.ask("Crash it [[tool:calc_die {}]]")
        assert crashed["kind"] == "answer"
        plain = await c.ask("Are you still there?")
        assert plain["kind"] == "answer" and plain["text"].startswith("Echo: Are you still")
        await wait_until(lambda: "disconnected" in worker.output(), 20, "the disconnect log line")
        # ... and the server is started again on a later call.
        for _ in range(40):
            again = await c.ask('Once more [[tool:calc_add {"a": 1, "b": 1}]]')
            if "Tool result: 2" in again["text"]:
                break
        else:
            raise AssertionError(f"the MCP server never came back:\n{worker.output()[-2000:]}")
    assert "connected again" in worker.output()
    assert worker.popen.poll() is None


async def test_a_worker_whose_mcp_server_does_not_start_stops_and_names_it(
    settings, worker_process
):
    worker = worker_process({"SLUICE_APP": "tests.framework.bots:broken_mcp_bot"}, wait=False)
    assert worker.popen.wait(60) != 0
    out = worker.output()
    assert "MCP server 'ghost'" in out and "did not start" in out
    assert "Traceback" not in out


async def test_streamable_http_server(tmp_path: Path):
    port = free_port()
    proc = Proc(
        "mcp-http",
        ["tests.framework.mcp_server", "http", str(port)],
        base_env(),
        tmp_path,
        cwd=ROOT,
    )
    server = McpServer("web", url=f"http://127.0.0.1:{port}/mcp", call_timeout_s=0.5)
    try:
        wait_port(port)
        tools = {t.name: t for t in make_mcp_tools(server, await server.connect())}
        assert await tools["web_shout"].invoke(None, '{"text": "hello"}') == "HELLO"  # type: ignore[arg-type]
        with pytest.raises(McpToolError, match="answered an error"):
            await server.call("fail", {"reason": "nope"})
        with pytest.raises(McpToolError):
            await server.call("slow", {"seconds": 5})
    finally:
        await server.close()
        proc.stop()


async def test_a_server_that_does_not_answer_is_a_clear_start_up_error():
    nobody = McpServer("gone", url=f"http://127.0.0.1:{free_port()}/mcp", connect_timeout_s=5)
    with pytest.raises(ConfigError, match=r"MCP server 'gone' .* did not start"):
        await nobody.connect()
    exits = McpServer("quits", command=[sys.executable, "-c", "pass"], connect_timeout_s=5)
    with pytest.raises(ConfigError, match="MCP server 'quits'"):
        await exits.connect()


def test_tools_the_model_api_would_reject_are_left_out_with_a_warning(caplog):
    server = McpServer("s", url="http://127.0.0.1:1/mcp")
    listed = [
        mcp.types.Tool(name="ok", description="fine", input_schema={"type": "object"}),
        mcp.types.Tool(name="has space", input_schema={"type": "object"}),
        mcp.types.Tool(name="scalar", input_schema={"type": "string"}),
        mcp.types.Tool(name="x" * 70, input_schema={"type": "object"}),
    ]
    with caplog.at_level(logging.WARNING, logger="core.framework.mcp"):
        tools = make_mcp_tools(server, listed)
    assert [t.name for t in tools] == ["s_ok"]
    assert tools[0].openai_schema()["function"]["parameters"] == {
        "properties": {},
        "type": "object",
    }
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "'has space' left out" in warned and "'scalar' left out" in warned
    assert f"{'x' * 70!r} left out" in warned


def test_bad_mcp_definitions_are_refused_at_definition():
    bot = Bot()
    with pytest.raises(BotDefinitionError, match="either command"):
        bot.mcp("both", command=["x"], url="http://127.0.0.1/mcp")
    with pytest.raises(BotDefinitionError, match="either command"):
        bot.mcp("neither")
    with pytest.raises(BotDefinitionError, match="list of program"):
        bot.mcp("str", command="python -m server")  # type: ignore[arg-type]
    with pytest.raises(BotDefinitionError, match="1-32 letters"):
        bot.mcp("no spaces please", url="http://127.0.0.1/mcp")
    with pytest.raises(BotDefinitionError, match="http"):
        bot.mcp("ftp", url="ftp://127.0.0.1/mcp")
    bot.mcp("one", url="http://127.0.0.1/mcp")
    with pytest.raises(BotDefinitionError, match="two MCP servers"):
        bot.mcp("one", url="http://127.0.0.1/other")


def test_model_arguments_must_be_an_object_with_the_required_keys():
    server = McpServer("s", url="http://127.0.0.1:1/mcp")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    [tool] = make_mcp_tools(server, [mcp.types.Tool(name="t", input_schema=schema)])
    assert tool.parse_arguments('{"a": 1}') == {"a": 1}
    from core.framework.tools import ToolArgumentError

    for raw, says in (("[1]", "JSON object"), ("{oops", "not valid JSON"), ("{}", "missing")):
        with pytest.raises(ToolArgumentError, match=says):
            tool.parse_arguments(raw)


async def test_a_stdio_servers_stderr_is_logged_line_by_line_with_its_secrets_masked(caplog):
    """What a stdio server writes to stderr reaches the log, named after the server, and
    the secret values of its env are masked there (and never reach the worker's own
    stderr unfiltered)."""
    secret = "sk-mcp-secret-0123456789abcdef"
    script = (
        "import os, sys\n"
        "sys.stderr.write('starting with key ' + os.environ['WEATHER_API_KEY'] + '\\n')\n"
        "sys.stderr.write('x' * 5000 + '\\n')\n"
        "sys.stderr.flush()\n"
        "from tests.framework.mcp_server import server\n"
        "server.run()\n"
    )
    server = McpServer(
        "noisy",
        command=[sys.executable, "-c", script],
        env={"WEATHER_API_KEY": secret, "PYTHONPATH": str(ROOT)},
        connect_timeout_s=30,
    )
    caplog.set_level(logging.INFO, logger="core.framework.mcp")
    try:
        tools = await server.connect()
        assert {t.name for t in tools} >= {"add", "shout"}
        assert await server.call("add", {"a": 2, "b": 3}) == "5"
    finally:
        await server.close()
    lines = [r.getMessage() for r in caplog.records if "stderr:" in r.getMessage()]
    assert any("MCP server 'noisy'" in m and "starting with key ***" in m for m in lines), lines
    assert not any(secret in r.getMessage() for r in caplog.records)
    long_line = [m for m in lines if "x" * 100 in m]
    assert len(long_line) == 1, lines  # one line, cut off
    assert "x" * STDERR_LINE_MAX in long_line[0] and "x" * (STDERR_LINE_MAX + 1) not in long_line[0]

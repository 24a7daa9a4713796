"""MCP servers' tools as bot tools, through the official ``mcp`` package.

A bot names its servers with :meth:`core.framework.bot.Bot.mcp`: a command that speaks MCP over
stdio, or the URL of a streamable HTTP server. Each worker connects to them at
start-up (:func:`connect_servers`), lists their tools and offers them to the model as
``<server>_<tool>`` with the server's own JSON schema. Every call has a timeout.

A stdio server's stderr does not go to the worker's stderr as it is: each line is
logged (``INFO``, named after the server, at most :data:`STDERR_LINE_MAX` characters)
with secrets masked, including the values of its ``env`` whose names look secret
(``*KEY*``, ``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``).

A server that does not start stops the worker at start-up with an error that names
it. A server that breaks or hangs later is isolated: its calls fail (the model is told
the tool failed, the log says why) and the bot keeps answering; the connection is
made again on a later call, at most once per :data:`RECONNECT_EVERY_S`. A tool whose
name or schema the model API would reject is left out with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import BotDefinitionError, ConfigError
from core.framework.tools import TOOL_NAME_RE, Tool, ToolArgumentError
from core.infra.logs import redact, register_secret

logger = logging.getLogger(__name__)

SERVER_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
RECONNECT_EVERY_S = 5.0
# JSON-RPC error code of a request that timed out (the MCP SDK's REQUEST_TIMEOUT).
REQUEST_TIMEOUT = -32001
# The longest stderr line of a stdio server that is logged (the rest is cut off).
STDERR_LINE_MAX = 2000
_SECRET_ENV_RE = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


class _StderrRelay:
    """A stdio server's stderr: a pipe whose lines go to the log, secrets masked."""

    def __init__(self, where: str) -> None:
        self.where = where
        read_fd, write_fd = os.pipe()
        self._read = os.fdopen(read_fd, "rb", buffering=0)
        # Handed to the child as its stderr; closed here once the child has its copy.
        self.child_end = os.fdopen(write_fd, "w")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), self._read
        )
        self._task = asyncio.create_task(self._pump(reader, transport), name=self.where)

    def close_child_end(self) -> None:
        """The child holds its own copy now (or was never started)."""
        if not self.child_end.closed:
            self.child_end.close()

    async def _pump(self, reader: asyncio.StreamReader, transport: asyncio.BaseTransport) -> None:
        pending = b""
        cut = False  # the current line was logged cut off: drop the rest of it
        try:
            while chunk := await reader.read(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not cut:
                        self._log(line)
                    cut = False
                if len(pending) > STDERR_LINE_MAX:
                    if not cut:
                        self._log(pending)
                    pending, cut = b"", True
            if pending and not cut:
                self._log(pending)
        finally:
            transport.close()

    def _log(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip()[:STDERR_LINE_MAX]
        if text:
            logger.info("%s stderr: %s", self.where, redact(text))

    async def wait_closed(self, timeout_s: float = 5.0) -> None:
        """Until the child's stderr is closed (it exited) and every line is logged; at
        most ``timeout_s`` (a grandchild may hold the pipe open)."""
        self.close_child_end()
        if self._task is None:
            self._read.close()
            return
        try:
            await asyncio.wait_for(self._task, timeout_s)
        except TimeoutError:
            logger.info("%s: its stderr stayed open after it stopped; no longer read", self.where)


class McpToolError(RuntimeError):
    """The MCP server answered a call with an error, or cannot be reached."""


@dataclass
class McpServer:
    """One MCP server a bot uses (see :meth:`core.framework.bot.Bot.mcp`).

    Attributes:
        name: Short name; the server's tools are offered as ``<name>_<tool>``.
        command: The command that runs a stdio server (program and arguments).
        url: The endpoint of a streamable HTTP server.
        env: Extra environment variables for a stdio server.
        call_timeout_s: Longest run of one tool call.
        connect_timeout_s: Longest wait for the server to start and list its tools.
    """

    name: str
    command: Sequence[str] | None = None
    url: str | None = None
    env: dict[str, str] | None = None
    call_timeout_s: float = 30.0
    connect_timeout_s: float = 20.0
    _client: Any = field(default=None, init=False, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _stop: asyncio.Event | None = field(default=None, init=False, repr=False)
    _lock: asyncio.Lock | None = field(default=None, init=False, repr=False)
    _last_attempt: float = field(default=0.0, init=False, repr=False)
    _connections: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        where = f"bot.mcp({self.name!r})"
        if not SERVER_NAME_RE.match(self.name):
            raise BotDefinitionError(
                f"{where}: the name must be 1-32 letters, digits, '_' or '-' "
                "(it prefixes the tool names the model sees)."
            )
        if (self.command is None) == (self.url is None):
            raise BotDefinitionError(f"{where}: give either command=[...] or url='...', not both.")
        if self.command is not None and (
            isinstance(self.command, str) or not self.command or not all(self.command)
        ):
            raise BotDefinitionError(
                f"{where}: command must be a list of program and arguments, "
                "e.g. command=['python', '-m', 'my_server']."
            )
        for key, value in (self.env or {}).items():
            if _SECRET_ENV_RE.search(key):
                register_secret(value)  # masked in its stderr lines and every other log
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise BotDefinitionError(f"{where}: url must start with http:// or https://.")
        if self.call_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise BotDefinitionError(f"{where}: timeouts must be positive.")

    @property
    def where(self) -> str:
        """How logs and errors name this server (never its environment)."""
        target = self.url if self.url is not None else " ".join(self.command or ())
        return f"MCP server {self.name!r} ({target})"

    def _target(self, stderr: _StderrRelay | None) -> Any:
        if self.url is not None:
            return self.url
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client

        program, *args = self.command or ()
        params = StdioServerParameters(command=program, args=args, env=self.env)
        assert stderr is not None
        return stdio_client(params, errlog=stderr.child_end)

    async def _run(self, ready: asyncio.Future[list[Any]]) -> None:
        """Hold the connection open (anyio wants it entered and left in one task)."""
        from mcp import Client

        assert self._stop is not None
        stderr = _StderrRelay(self.where) if self.command is not None else None
        try:
            if stderr is not None:
                await stderr.start()
            target = self._target(stderr)
            async with Client(target, read_timeout_seconds=self.call_timeout_s) as client:
                if stderr is not None:
                    stderr.close_child_end()
                listing = await client.list_tools()
                tools = list(listing.tools)
                while listing.next_cursor:
                    listing = await client.list_tools(cursor=listing.next_cursor)
                    tools += listing.tools
                self._client = client
                ready.set_result(tools)
                self._connections += 1
                if self._connections > 1:
                    # Logged here: the call that asked for it may have timed out meanwhile.
                    logger.info("%s connected again", self.where)
                await self._stop.wait()
        except Exception as e:  # any failure of the server or its transport
            if not ready.done():
                ready.set_exception(e)
            else:
                logger.warning("%s disconnected: %s: %s", self.where, type(e).__name__, e)
        finally:
            self._client = None
            if stderr is not None:
                await stderr.wait_closed()

    async def connect(self) -> list[Any]:
        """Start the connection and return the server's tools (``mcp.types.Tool``).

        Raises:
            ConfigError: the server did not start, answer or list its tools in time.
        """
        await self.close()
        self._stop = asyncio.Event()
        self._lock = self._lock or asyncio.Lock()
        self._last_attempt = time.monotonic()
        ready: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(ready), name=f"mcp:{self.name}")
        try:
            return await asyncio.wait_for(asyncio.shield(ready), self.connect_timeout_s)
        except Exception as e:
            await self.close()
            reason = (
                f"no answer within {self.connect_timeout_s:g} s"
                if isinstance(e, TimeoutError)
                else f"{type(e).__name__}: {e}"
            )
            raise ConfigError(
                f"{self.where} did not start: {reason}. Check the command or URL in "
                "bot.mcp(...), and that the server runs on its own."
            ) from e

    async def close(self) -> None:
        """End the connection (and a stdio server's process)."""
        if self._stop is not None:
            self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await asyncio.wait_for(self._task, 5)
                except TimeoutError:
                    logger.warning("%s did not close within 5 s; cancelled", self.where)
        self._task = None
        self._client = None

    async def _connected(self) -> Any:
        """The live client, connecting again when the last attempt is old enough."""
        if self._client is not None:
            return self._client
        assert self._lock is not None, "connect() first"
        async with self._lock:
            if self._client is None:
                if time.monotonic() - self._last_attempt < RECONNECT_EVERY_S:
                    raise McpToolError(f"{self.where} is not connected")
                try:
                    await self.connect()
                except ConfigError as e:
                    raise McpToolError(str(e)) from e
        return self._client

    async def call(self, tool: str, arguments: dict[str, Any]) -> str:
        """Call one tool; its text content joined, structured content as JSON.

        Raises:
            McpToolError: the server answered with an error or cannot be reached.
        """
        client = await self._connected()
        try:
            result = await client.call_tool(
                tool, arguments, read_timeout_seconds=self.call_timeout_s
            )
        except Exception as e:  # the transport or the server failed
            if getattr(getattr(e, "error", None), "code", None) != REQUEST_TIMEOUT:
                # Not merely slow: the connection is gone. Make it again on a later call.
                logger.warning(
                    "%s disconnected (%s: %s); connecting again on a later call",
                    self.where,
                    type(e).__name__,
                    e,
                )
                self._client = None
                if self._stop is not None:
                    self._stop.set()
            raise McpToolError(f"{self.where}: {tool} failed: {type(e).__name__}: {e}") from e
        parts = [
            c.text if getattr(c, "type", "") == "text" else f"[{c.type}]" for c in result.content
        ]
        text = "\n".join(parts)
        if not text and result.structured_content is not None:
            text = json.dumps(result.structured_content, ensure_ascii=False)
        if result.is_error:
            raise McpToolError(f"{self.where}: {tool} answered an error: {text[:500]}")
        return text


@dataclass
class McpTool(Tool):
    """A tool an MCP server offers, with the server's own JSON schema."""

    server: McpServer | None = None
    remote_name: str = ""
    input_schema: dict[str, Any] = field(default_factory=dict)

    def openai_schema(self) -> dict[str, Any]:
        """The tool as a ``tools`` entry, parameters as the server describes them."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.input_schema,
            },
        }

    def parse_arguments(self, raw: str) -> dict[str, Any]:
        """The model's arguments as a JSON object (the server validates them)."""
        try:
            data = json.loads(raw or "{}")
        except json.JSONDecodeError as e:
            raise ToolArgumentError(f"arguments are not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ToolArgumentError("arguments must be a JSON object")
        missing = [k for k in self.input_schema.get("required") or () if k not in data]
        if missing:
            raise ToolArgumentError(f"missing required arguments: {', '.join(missing)}")
        return data


def _schema_problem(schema: Any) -> str | None:
    """Why the model API would reject ``schema`` as function parameters, if it would."""
    if not isinstance(schema, dict):
        return "its input schema is not a JSON object"
    if schema.get("type") != "object":
        return f"its input schema has type {schema.get('type')!r}, not 'object'"
    if not isinstance(schema.get("properties", {}), dict):
        return "its input schema's properties are not an object"
    try:
        json.dumps(schema)
    except (TypeError, ValueError):
        return "its input schema is not plain JSON"
    return None


def _caller(server: McpServer, remote: str) -> Any:
    async def call(**arguments: Any) -> str:
        return await server.call(remote, arguments)

    return call


def make_mcp_tools(server: McpServer, listed: Sequence[Any]) -> list[McpTool]:
    """Bot tools for the tools ``server`` listed; unusable ones are left out, logged."""
    tools: list[McpTool] = []
    for t in listed:
        name = f"{server.name}_{t.name}"
        problem = (
            None if TOOL_NAME_RE.match(name) else f"the name {name!r} is not a valid tool name"
        )
        problem = problem or _schema_problem(t.input_schema)
        if problem:
            logger.warning("%s: tool %r left out: %s", server.where, t.name, problem)
            continue

        description = (t.description or t.title or f"{t.name} from {server.name}").strip()
        tools.append(
            McpTool(
                name=name,
                description=description[:1024],
                fn=_caller(server, t.name),
                params=[],
                timeout_s=server.call_timeout_s,
                server=server,
                remote_name=t.name,
                input_schema={"properties": {}, **t.input_schema},
            )
        )
    return tools


async def connect_servers(servers: Sequence[McpServer], taken: set[str]) -> list[McpTool]:
    """Connect every server; their tools, none of them named like one in ``taken``.

    Raises:
        ConfigError: a server did not start, or two tools would have the same name.
    """
    out: list[McpTool] = []
    try:
        for server in servers:
            tools = make_mcp_tools(server, await server.connect())
            for tool in tools:
                if tool.name in taken:
                    raise ConfigError(
                        f"{server.where}: its tool {tool.remote_name!r} would be offered as "
                        f"{tool.name!r}, a name another tool has. Rename one of them."
                    )
                taken.add(tool.name)
                out.append(tool)
            logger.info("%s: %d tool(s)", server.where, len(tools))
    except BaseException:
        await close_servers(servers)
        raise
    return out


async def close_servers(servers: Sequence[McpServer]) -> None:
    """Close every server's connection."""
    for server in servers:
        await server.close()

"""A small MCP server for the tests, written with the official ``mcp`` package.

``python -m tests.framework.mcp_server`` serves over stdio;
``python -m tests.framework.mcp_server http PORT`` over streamable HTTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("sluice-test", log_level="CRITICAL")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two whole numbers."""
    return a + b


@server.tool()
def shout(text: str) -> str:
    """The text in capitals."""
    return text.upper()


@server.tool()
def fail(reason: str = "it broke") -> str:
    """A tool that always fails."""
    raise RuntimeError(reason)


@server.tool()
async def slow(seconds: float = 30.0) -> str:
    """A tool that takes its time."""
    await asyncio.sleep(seconds)
    return "finally"


@server.tool()
def die() -> str:
    """Stop this server's process, as a crash would."""
    sys.stdout.flush()
    import os

    os._exit(3)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()

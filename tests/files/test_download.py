"""The streamed, size-limited download (core.files.download) against a real HTTP server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from core.errors import FileRefusedError
from core.files.download import download
from tests.fakes.files import FileServer, Served

TOKEN = {"Authorization": "Bearer xoxb-secret"}


@pytest.fixture
async def server() -> AsyncIterator[tuple[FileServer, int]]:
    files = FileServer()
    app = web.Application()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await files.serve(request, request.match_info["key"])

    app.router.add_get("/f/{key}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield files, port
    finally:
        await runner.cleanup()


async def get(url: str, max_bytes: int = 10_000) -> bytes:
    async with aiohttp.ClientSession() as session:
        data, _ = await download(
            session, url, name="`f.bin`", max_bytes=max_bytes, timeout_s=30, headers=TOKEN
        )
        return data


async def test_a_file_within_the_limit_is_downloaded_with_the_token(
    server: tuple[FileServer, int],
) -> None:
    files, port = server
    files.add("ok", Served(b"hello" * 100))
    assert await get(f"http://127.0.0.1:{port}/f/ok") == b"hello" * 100
    assert files.fetches[-1].authorization == TOKEN["Authorization"]


async def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read(
    server: tuple[FileServer, int],
) -> None:
    files, port = server
    files.add("big", Served(b"x" * 50_000))
    with pytest.raises(FileRefusedError, match=r"`f\.bin` is too large \(50 KB"):
        await get(f"http://127.0.0.1:{port}/f/big")


async def test_a_body_without_a_length_stops_at_the_limit_while_streaming(
    server: tuple[FileServer, int],
) -> None:
    files, port = server
    # 5 MB sent chunked (no Content-Length) against a 100 KB limit.
    files.add("liar", Served(b"y" * 5_000_000, chunked=True))
    with pytest.raises(FileRefusedError, match="more than 100 KB"):
        await get(f"http://127.0.0.1:{port}/f/liar", max_bytes=100_000)


async def test_a_redirect_to_another_host_never_carries_the_token(
    server: tuple[FileServer, int],
) -> None:
    files, port = server
    files.add("target", Served(b"payload"))
    # Same server, other host name: a different origin as far as credentials go.
    files.add("away", Served(b"", redirect_to=f"http://localhost:{port}/f/target"))
    files.add("near", Served(b"", redirect_to=f"http://127.0.0.1:{port}/f/target"))
    assert await get(f"http://127.0.0.1:{port}/f/away") == b"payload"
    assert [(f.key, f.authorization) for f in files.fetches] == [
        ("away", TOKEN["Authorization"]),
        ("target", None),
    ]
    files.fetches.clear()
    assert await get(f"http://127.0.0.1:{port}/f/near") == b"payload"
    assert [f.authorization for f in files.fetches] == [TOKEN["Authorization"]] * 2


async def test_missing_files_redirect_loops_and_dead_hosts_are_refused_clearly(
    server: tuple[FileServer, int],
) -> None:
    files, port = server
    with pytest.raises(FileRefusedError, match=r"could not be downloaded \(HTTP 404\)"):
        await get(f"http://127.0.0.1:{port}/f/none")
    files.add("loop", Served(b"", redirect_to=f"http://127.0.0.1:{port}/f/loop"))
    with pytest.raises(FileRefusedError, match="too many redirects"):
        await get(f"http://127.0.0.1:{port}/f/loop")
    from tests.helpers import free_port

    with pytest.raises(FileRefusedError, match="could not be downloaded"):
        await get(f"http://127.0.0.1:{free_port()}/f/x")

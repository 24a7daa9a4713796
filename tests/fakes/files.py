"""Files served by the fakes, as Slack's ``url_private`` and Discord's CDN serve them.

A :class:`FileServer` holds file bodies by key and answers ``GET`` for them. A body
can be sent with its true ``Content-Length``, or chunked without one (to test a
download that must stop at its limit while streaming), or a redirect to another URL.
Each request is recorded with its ``Authorization`` header.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Served:
    """One file body and how it is served."""

    data: bytes
    content_type: str = "application/octet-stream"
    chunked: bool = False
    redirect_to: str | None = None


@dataclass
class Fetch:
    """One recorded request for a file."""

    key: str
    authorization: str | None


@dataclass
class FileServer:
    """Bodies by key; :meth:`serve` answers a request for one."""

    files: dict[str, Served] = field(default_factory=dict)
    fetches: list[Fetch] = field(default_factory=list)

    def add(self, key: str, served: Served) -> None:
        """Serve ``served`` under ``key``."""
        self.files[key] = served

    async def serve(
        self, request: web.Request, key: str, *, allowed: bool = True
    ) -> web.StreamResponse:
        """The file's body (404 if unknown, an HTML sign-in page if not ``allowed``)."""
        self.fetches.append(Fetch(key, request.headers.get("Authorization")))
        served = self.files.get(key)
        if served is None:
            return web.Response(status=404, text="not found")
        if served.redirect_to is not None:
            raise web.HTTPFound(served.redirect_to)
        if not allowed:
            # Slack answers a file request without a valid token with its sign-in page.
            return web.Response(text="<html>Sign in to Slack</html>", content_type="text/html")
        if not served.chunked:
            return web.Response(body=served.data, content_type=served.content_type)
        resp = web.StreamResponse(headers={"Content-Type": served.content_type})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        step = 256 * 1024
        try:
            for i in range(0, len(served.data), step):
                await resp.write(served.data[i : i + step])
        except (ConnectionResetError, ConnectionError):
            return resp  # the client stopped reading: what a download limit does
        await resp.write_eof()
        return resp

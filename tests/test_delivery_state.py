"""The one delivery-state type of the Slack and Discord responders and its policy for
a Redis error (core.responder.DeliveryState)."""

from __future__ import annotations

import logging

import pytest
from redis.asyncio import Redis

from core.errors import DeliveryRetryableError
from core.infra.redis import Keys
from core.responder import DeliveryState
from core.settings import Settings
from tests.helpers import free_port


async def test_fields_are_kept_under_the_jobs_key_with_a_ttl(
    settings: Settings, redis: Redis
) -> None:
    state = DeliveryState(redis, Keys(settings.key_prefix), "job-1", 600)
    assert await state.read() == {}
    assert await state.save({"ts": "1.2", "mode": "post"})
    assert await state.save({"done": "1"})
    again = DeliveryState(redis, Keys(settings.key_prefix), "job-1", 600)
    assert await again.read() == {"ts": "1.2", "mode": "post", "done": "1"}
    assert state.key == Keys(settings.key_prefix).delivered("job-1")
    assert 0 < await redis.ttl(state.key) <= 600


async def test_a_redis_error_fails_a_read_retryably_and_a_write_with_a_warning(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    state = DeliveryState(dead, Keys(settings.key_prefix), "job-2", 600)
    try:
        with pytest.raises(DeliveryRetryableError, match="cannot read delivery state"):
            await state.read()
        with caplog.at_level(logging.WARNING, logger="core.responder"):
            assert await state.save({"done": "1"}) is False
    finally:
        await dead.aclose()
    assert any("cannot record delivery state job=job-2" in r.getMessage() for r in caplog.records)

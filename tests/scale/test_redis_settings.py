"""Sentinel settings and ``WAIT`` before the ack, against the machine's real Redis
(which has no replica)."""

from __future__ import annotations

import time
import uuid

import pytest
from redis.asyncio import Redis

from core.errors import ConfigError, QueueError
from core.infra.redis import Keys, parse_sentinels, redis_settings
from core.messages import IncomingMessage
from core.settings import Settings
from core.traffic.queue import Accepted, accept_message, arq_job_id, connect_queue


@pytest.mark.parametrize(
    "value",
    ["10.0.0.1", "10.0.0.1:", ":26379", "10.0.0.1:port", "10.0.0.1:70000", " , "],
)
def test_malformed_sentinel_lists_are_a_clear_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="SLUICE_REDIS_SENTINELS"):
        parse_sentinels(value)


def test_sentinel_settings_take_only_credentials_and_database_from_redis_url() -> None:
    s = Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url="redis://user:pw@ignored.example:1234/3",
        redis_sentinels=" 10.0.0.1:26379, [::1]:26380 ,",
        redis_sentinel_master="sluice",
        redis_sentinel_password="sentinel-pw",
    )
    rs = redis_settings(s)
    assert rs.sentinel and rs.host == [("10.0.0.1", 26379), ("::1", 26380)]
    assert (rs.sentinel_master, rs.username, rs.password, rs.database) == (
        "sluice",
        "user",
        "pw",
        3,
    )
    assert rs.sentinel_password == "sentinel-pw"
    # Neither password shows in what the settings print.
    assert "sentinel-pw" not in repr(s) and "sentinel-pw" not in str(s)


def _message() -> IncomingMessage:
    return IncomingMessage(
        platform="web",
        tenant="web",
        channel="c1",
        user="u1",
        message_id=uuid.uuid4().hex,
        text="hello",
        ts=time.time(),
        is_dm=True,
    )


async def test_wait_for_a_replica_that_is_not_there_withholds_the_ack_and_keeps_the_job(
    settings: Settings, redis: Redis
) -> None:
    """No replica confirms: the adapter must not ack (QueueError -> 503); the job stays
    queued, so the platform's redelivery is a duplicate, confirmed again (and refused
    again here), and acked as a duplicate once waiting is off."""
    info = await redis.info("replication")
    if int(info.get("connected_slaves", 0)) > 0:
        pytest.skip("this Redis has a replica: WAIT 1 would succeed")
    waiting = settings.model_copy(update={"redis_wait_replicas": 1, "redis_wait_timeout_ms": 50})
    queue = await connect_queue(waiting)
    msg = _message()
    try:
        with pytest.raises(QueueError, match="0 of 1 replica"):
            await accept_message(queue, waiting, msg)
        assert await redis.exists(f"arq:job:{arq_job_id(waiting, msg)}")
        keys = Keys(waiting.key_prefix)
        assert await redis.exists(keys.dedupe("web", msg.job_id))
        # The redelivery: a duplicate, but still not confirmed on a replica.
        with pytest.raises(QueueError, match="0 of 1 replica"):
            await accept_message(queue, waiting, msg)
        # Without WAIT the same redelivery is a plain duplicate.
        assert await accept_message(queue, settings, msg) is Accepted.DUPLICATE
    finally:
        await queue.aclose()


async def test_without_wait_replicas_nothing_waits(settings: Settings) -> None:
    queue = await connect_queue(settings)
    try:
        assert await accept_message(queue, settings, _message()) is Accepted.QUEUED
    finally:
        await queue.aclose()

"""Enqueueing reply jobs: the one thing adapters do with an accepted message."""

from __future__ import annotations

import enum
import functools
import logging
import time
from datetime import UTC, datetime, timedelta

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from core.errors import BotDefinitionError, QueueError
from core.framework.bot import Bot, load_bot
from core.infra import tracing
from core.infra.redis import Keys, connect_pool, redis_settings
from core.infra.serializer import deserialize, serialize
from core.messages import IncomingMessage
from core.settings import Settings
from core.traffic.cache import cache_enabled
from core.traffic.door import ADMITTED, Line, admit, conversation_line
from core.traffic.lanes import LANES, choose_lane, lane_queue_name
from core.traffic.ordering import forget_arrival, register_arrival
from core.traffic.schedule import message_place, place_message, score_of
from core.traffic.wake import push_wake, wake_workers

logger = logging.getLogger(__name__)

# A reserved-path job not started within a minute is stale (the answer may be out).
NOTICE_EXPIRES = timedelta(seconds=60)


async def connect_queue(settings: Settings, *, max_connections: int | None = None) -> ArqRedis:
    """A Redis pool that enqueues with Sluice's serializer (not pickle), through
    :func:`core.infra.redis.connect_pool` (so Sentinel is honoured).

    ``max_connections`` caps the pool (a request beyond it fails at once with a
    ``redis.exceptions.ConnectionError``); unset, the pool is unbounded."""
    rs = redis_settings(settings)
    rs.max_connections = max_connections
    return await connect_pool(
        rs,
        job_serializer=serialize,
        job_deserializer=deserialize,
        default_queue_name=settings.queue_name,
    )


def arq_job_id(settings: Settings, msg: IncomingMessage) -> str:
    """The arq job id of a message's reply job.

    arq's own keys (``arq:job:<id>``, ``arq:result:<id>``) are not prefixed, so the
    id carries ``SLUICE_KEY_PREFIX``: two deployments sharing one Redis never take
    each other's messages for duplicates.
    """
    return f"{settings.key_prefix}:{msg.job_id}"


class Accepted(enum.Enum):
    """What became of a delivered message (:func:`enqueue_reply`, :func:`accept_message`).

    Truthy when the message was handled anew (queued, or refused at the door), falsy
    for a duplicate delivery, so ``if not await accept_message(...)`` still reads
    "a duplicate"."""

    QUEUED = "queued"
    """Admitted and queued: its answer (or first a queued notice) follows."""
    REFUSED = "refused"
    """Refused at the door (busy, or over a limit); the refusal notice follows."""
    REFUSED_QUIETLY = "refused-quietly"
    """Refused at the door; this user was already told in this limit window, so no
    notice follows."""
    DUPLICATE = "duplicate"
    """A delivery of a message already handled: nothing was done."""

    def __bool__(self) -> bool:
        return self is not Accepted.DUPLICATE

    @property
    def refused(self) -> bool:
        """Refused at the door (with or without a notice)."""
        return self in (Accepted.REFUSED, Accepted.REFUSED_QUIETLY)


@tracing.traced_enqueue
async def enqueue_reply(redis: ArqRedis, settings: Settings, msg: IncomingMessage) -> Accepted:
    """Admit ``msg`` at the door, then enqueue its ``reply`` job, in its lane and its
    conversation's line.

    The door (:func:`core.traffic.door.admit`) refuses a message when the estimated wait is over
    ``SLUICE_MAX_WAIT_S``, the queue holds ``SLUICE_MAX_QUEUED`` jobs, or the user or
    tenant is over a limit (checked and counted in one Lua call). A refused message is
    not queued; the first refusal of a user in a limit window gets its notice at once
    on the reserved path (``door_refuse``), later ones in that window none.

    The lane comes from the bot's lane rules (:func:`core.traffic.lanes.choose_lane`); with
    ``SLUICE_LANE_QUEUES=score`` (default) it sets the job's score in the one queue
    (arrival minus the lane's head start), with ``per-lane`` it picks the lane's queue.
    An admitted message may also get a reserved-path ``door_check`` job, which answers
    it from the cache at once or shows the queued notice (:func:`_door_followup`).

    Returns :attr:`Accepted.DUPLICATE` (falsy) when a job with the same id already
    exists (a duplicate delivery); otherwise the message was handled anew:
    :attr:`Accepted.QUEUED`, or refused with its notice (:attr:`Accepted.REFUSED`) or
    without one (:attr:`Accepted.REFUSED_QUIETLY`). The adapter acks a refused message
    and marks it seen, so a platform retry of it gets no second notice.

    Raises:
        QueueError: Redis could not be reached; the adapter must not ack then, so
            that the platform delivers again.
    """
    bot = _load_bot(settings)
    msg = with_lane(settings, msg, bot)
    keys = Keys(settings.key_prefix)
    arrived_ms = int(time.time() * 1000)
    # Where it would wait if admitted, for the door's estimate (no place taken yet).
    queue, estimate_ms = queue_slot_now(settings, msg, arrived_ms)
    try:
        admission = await admit(redis, keys, settings, bot, msg, queue, estimate_ms)
    except (RedisError, OSError) as e:
        raise QueueError(f"cannot admit message {msg.message_id}: {e}") from e
    if not admission.admitted:
        if admission.notice is not None:
            await _refuse(redis, settings, msg, admission.notice, admission.notice_marker)
            return Accepted.REFUSED
        return Accepted.REFUSED_QUIETLY
    if bot is not None:
        # Counted at the door: the worker's own check must not count it again.
        msg = msg.model_copy(update={"meta": {**msg.meta, ADMITTED: "1"}})
    try:
        # Only an admitted message takes its place in line (its user's fair clock).
        queue, score_ms, msg = await queue_slot(redis, settings, msg, arrived_ms)
        added = await register_arrival(
            redis, keys, msg, keep_text=bot is not None and bot.merge_burst_s > 0
        )
        try:
            job = await redis.enqueue_job(
                "reply",
                msg.model_dump(mode="json"),
                _job_id=arq_job_id(settings, msg),
                _queue_name=queue,
                _defer_until=datetime.fromtimestamp(score_ms / 1000, tz=UTC),
            )
        except BaseException:
            if added:
                await forget_arrival(redis, keys, msg)
            raise
        if job is None and added:
            # A duplicate of a message already answered: not waiting in line.
            await forget_arrival(redis, keys, msg)
        if job is not None:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(keys.lanes(), f"enqueued:{msg.lane}", 1)
                push_wake(pipe, queue)
                await pipe.execute()
    except (RedisError, OSError) as e:
        raise QueueError(f"cannot enqueue message {msg.message_id}: {e}") from e
    if job is not None:
        await _door_followup(redis, settings, keys, bot, msg, admission.line)
    logger.info(
        "enqueued platform=%s tenant=%s message=%s job=%s lane=%s new=%s",
        msg.platform,
        msg.tenant,
        msg.message_id,
        msg.job_id,
        msg.lane,
        job is not None,
    )
    return Accepted.QUEUED if job is not None else Accepted.DUPLICATE


@tracing.traced_receive
async def accept_message(
    redis: ArqRedis, settings: Settings, msg: IncomingMessage, *extra_keys: str
) -> Accepted:
    """Dedupe and enqueue one delivered message; the one call adapters make.

    Returns what became of it (:class:`Accepted`): truthy when the message was new and
    is now queued or was refused at the door (``.refused``), falsy
    (:attr:`Accepted.DUPLICATE`) for a duplicate (a platform retry, a redelivery, the
    same message under two event types). Duplicates are recognised by a marker that
    lives ``SLUICE_DEDUPE_TTL_S`` (24 h) and, until the marker is written, by arq's
    refusal of a second job with the same id, which is atomic. The marker is written
    only after the job is queued, so a message that was not enqueued is never taken
    for a duplicate.

    ``extra_keys`` are further identities of the same delivery (e.g. Slack's event
    id) that must also count as seen.

    With ``SLUICE_REDIS_WAIT_REPLICAS`` > 0 it returns only once that many replicas
    hold the job and its markers (Redis ``WAIT``), so a failover right after the ack
    loses nothing; when they do not confirm in ``SLUICE_REDIS_WAIT_TIMEOUT_MS`` it
    raises :class:`QueueError` and the adapter does not ack.

    Raises:
        QueueError: Redis is unreachable; the adapter must answer with an error so
            that the platform delivers again.
    """
    keys = Keys(settings.key_prefix)
    markers = [keys.dedupe(msg.platform, msg.job_id)]
    markers += [keys.dedupe(msg.platform, k) for k in extra_keys]
    try:
        if await redis.exists(*markers):
            logger.info("duplicate platform=%s message=%s", msg.platform, msg.message_id)
            if settings.redis_wait_replicas:
                # The first delivery may not have been confirmed on a replica yet.
                await _mark_seen(redis, settings, msg, markers)
            return Accepted.DUPLICATE
    except (RedisError, OSError) as e:
        raise QueueError(f"cannot check message {msg.message_id}: {e}") from e
    outcome = await enqueue_reply(redis, settings, msg)
    if not outcome:
        if settings.redis_wait_replicas:
            await _mark_seen(redis, settings, msg, markers)
        return outcome
    await _mark_seen(redis, settings, msg, markers)
    return outcome


async def _mark_seen(
    redis: ArqRedis, settings: Settings, msg: IncomingMessage, markers: list[str]
) -> None:
    """Write the dedupe markers; with ``SLUICE_REDIS_WAIT_REPLICAS``, wait until that
    many replicas hold them and everything written before (the job).

    Raises:
        QueueError: with ``SLUICE_REDIS_WAIT_REPLICAS``, the replicas did not confirm.
    """
    wait = settings.redis_wait_replicas
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for marker in markers:
                pipe.set(marker, b"1", ex=settings.dedupe_ttl_s)
            if wait:
                # On the markers' own connection: WAIT covers that connection's writes,
                # and the replication stream is ordered, so the job enqueued before too.
                pipe.execute_command("WAIT", wait, settings.redis_wait_timeout_ms)
            results = await pipe.execute()
    except (RedisError, OSError) as e:
        if wait:
            raise QueueError(
                f"cannot confirm message {msg.message_id} on a replica: {e}; not acking"
            ) from e
        # The job is queued; until its result expires arq still refuses a duplicate.
        logger.warning("dedupe marker not written for message=%s: %s", msg.message_id, e)
        return
    if wait and int(results[-1]) < wait:
        # Not acked: the platform delivers again, and then either the job is there
        # (a duplicate, confirmed again) or a failover lost it (enqueued anew).
        raise QueueError(
            f"message {msg.message_id}: {results[-1]} of {wait} replica(s) confirmed it "
            f"within {settings.redis_wait_timeout_ms} ms; not acking"
        )


# The jobs beside a message's reply job ``J`` that carry the message too, by their arq
# id after ``SLUICE_KEY_PREFIX:``: ``queued:J`` (and its refreshes ``queued:J:N``),
# ``refused:J`` and ``door:J``.
SIDE_JOB_KINDS = ("queued", "refused", "door")


def side_job_parent(job_id: str) -> str | None:
    """The reply job id a side job (an arq id without the key prefix) belongs to;
    ``None`` for a reply job itself."""
    kind, _, rest = job_id.partition(":")
    if kind not in SIDE_JOB_KINDS or not rest.startswith("reply:"):
        return None
    if kind == "queued":
        head, _, n = rest.rpartition(":")
        if n.isdigit() and head.count(":") >= 3:
            return head
    return rest


def notice_queue_name(settings: Settings) -> str:
    """The reserved queue: queued notices, refusals and cached answers at the door.

    Every worker process serves it with its own slots (``SLUICE_NOTICE_MAX_JOBS``, see
    :mod:`workers.notices`), so nothing on it waits for a reply job's slot."""
    return f"{settings.queue_name}:door"


async def _refuse(
    redis: ArqRedis, settings: Settings, msg: IncomingMessage, text: str, marker: str | None
) -> None:
    """Queue the refusal notice on the reserved path.

    Raises:
        QueueError: it could not be queued; the notice marker is taken back, so that
            the platform's redelivery of the message gets the notice.
    """
    try:
        await redis.enqueue_job(
            "door_refuse",
            msg.model_dump(mode="json"),
            text,
            _job_id=f"{settings.key_prefix}:refused:{msg.job_id}",
            _queue_name=notice_queue_name(settings),
            _expires=NOTICE_EXPIRES,
        )
        await wake_workers(redis, notice_queue_name(settings))
    except (RedisError, OSError) as e:
        try:
            if marker is not None:
                await redis.delete(marker)
        except (RedisError, OSError) as e2:
            logger.error("cannot take back the door notice marker of %s: %s", msg.message_id, e2)
        raise QueueError(f"cannot queue the refusal of message {msg.message_id}: {e}") from e


async def _door_followup(
    redis: ArqRedis,
    settings: Settings,
    keys: Keys,
    bot: Bot | None,
    msg: IncomingMessage,
    line: Line,
) -> None:
    """A reserved-path ``door_check`` job for a queued message that may have a cached
    answer (nothing earlier of its conversation in flight) or whose expected wait passes
    ``SLUICE_QUEUED_NOTICE_AFTER_S`` (it then shows "Queued: #N in line, about N s").
    A message behind an earlier one of its conversation waits for that one too
    (:func:`core.traffic.door.conversation_line`), whatever its own place.
    The notice is a courtesy: if it cannot be queued the message still is."""
    try:
        first_in_line = await redis.zrange(keys.conv_pending(msg.conversation_id), 0, 0) == [
            msg.job_id.encode()
        ]
        if not first_in_line:
            line = await conversation_line(
                redis,
                keys,
                settings,
                msg,
                line,
                queue=_lane_queue(settings, msg.lane),
                queues=reply_queues(settings),
            )
        wait_s = line.wait_s
        notice = (
            settings.queued_notice_after_s > 0
            and wait_s is not None
            and wait_s > settings.queued_notice_after_s
        )
        try_cache = bool(
            bot is not None
            and bot.merge_burst_s <= 0
            and not msg.meta.get("command")
            and cache_enabled(settings, bot, msg)
            and first_in_line
        )
        if not notice and not try_cache:
            return
        await redis.enqueue_job(
            "door_check",
            msg.model_dump(mode="json"),
            line.place,
            round(wait_s) if notice and wait_s is not None else 0,
            try_cache,
            _job_id=f"{settings.key_prefix}:door:{msg.job_id}",
            _queue_name=notice_queue_name(settings),
            _expires=NOTICE_EXPIRES,
        )
        await wake_workers(redis, notice_queue_name(settings))
    except (RedisError, OSError) as e:
        # The message itself is queued; only the courtesy notice is lost.
        logger.warning("queued notice not sent for message=%s: %s", msg.message_id, e)


async def queue_slot(
    redis: ArqRedis, settings: Settings, msg: IncomingMessage, arrived_ms: int
) -> tuple[str, int, IncomingMessage]:
    """The queue ``msg`` waits in, its score there, and ``msg`` carrying its place.

    Takes the message's place in line (:func:`core.traffic.schedule.place_message`: its
    user's fair-share clock, the deadline index). The score is its fair start less its
    lane's head start in the one queue (only the fair start in its lane's queue with
    ``per-lane``), in the in-time band or, when it cannot be answered within
    ``SLUICE_TARGET_WAIT_S`` anyway, the late band (the over-share band when it came
    over its user's share)."""
    queue = _lane_queue(settings, msg.lane)
    place = await place_message(
        redis,
        settings,
        msg,
        queue=queue,
        arq_id=arq_job_id(settings, msg),
        arrived_ms=arrived_ms,
    )
    msg = msg.model_copy(
        update={
            "fair_ms": place.fair_ms,
            "late_at_ms": place.late_at_ms,
            "over_share": place.over_share,
        }
    )
    queue, score_ms = queue_slot_now(settings, msg, arrived_ms)
    return queue, score_ms, msg


def queue_slot_now(settings: Settings, msg: IncomingMessage, now_ms: int) -> tuple[str, int]:
    """The queue of ``msg``'s job and its score there as of ``now_ms`` (its place, in
    the band it is in by then); a job that parks goes back to this score."""
    place = message_place(settings, msg, now_ms)
    boosted = settings.lane_queues != "per-lane"
    return _lane_queue(settings, msg.lane), score_of(
        settings, msg.lane, place, now_ms, boosted=boosted
    )


def default_reply_queue(settings: Settings) -> str:
    """The queue of the default lane: side jobs (e.g. ``feedback``) go there."""
    return _lane_queue(settings, "default")


def _lane_queue(settings: Settings, lane: str) -> str:
    if settings.lane_queues == "per-lane":
        return lane_queue_name(settings, lane)
    return settings.queue_name


def reply_queues(settings: Settings) -> list[str]:
    """Every queue a reply job can be in."""
    if settings.lane_queues == "per-lane":
        return [lane_queue_name(settings, lane) for lane in LANES]
    return [settings.queue_name]


def _load_bot(settings: Settings) -> Bot | None:
    try:
        return _bot_at(settings.app)
    except BotDefinitionError as e:
        logger.error("cannot load the bot to choose a lane: %s", e)
        return None


@functools.lru_cache(maxsize=8)
def _bot_at(path: str | None) -> Bot:
    # Once per process: a bot factory function must not run on every enqueue.
    return load_bot(path)


def message_lane(settings: Settings, msg: IncomingMessage) -> str:
    """The lane :func:`enqueue_reply` puts ``msg`` in (the bot of ``SLUICE_APP`` decides),
    for adapters that tell the sender, e.g. the web chat's 202 body."""
    return with_lane(settings, msg, _load_bot(settings)).lane


def with_lane(settings: Settings, msg: IncomingMessage, bot: Bot | None) -> IncomingMessage:
    """``msg`` with the lane its bot's rules choose (the adapter's lane when none match)."""
    if bot is None:
        return msg
    lane = choose_lane(bot, msg)
    return msg if lane == msg.lane else msg.model_copy(update={"lane": lane})

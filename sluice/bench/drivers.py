"""Simulated users: they send the planned messages and time the replies they see.

Sluice: each user is a web chat tab (``POST /api/session`` signed in through the
bench's hook, ``POST /api/messages``, replies over SSE from ``GET /api/events``).
Naive: each message is one ``POST`` whose response body streams the answer. Times
are seconds from the schedule's start (``t0``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import aiohttp

from bots.web.security import COOKIE as SESSION_COOKIE
from sluice.bench.bot import BENCH_USER_HEADER
from sluice.bench.scenarios import Planned

LEAD_S = 2.0  # time to open connections before the first message
FLOOD_CONCURRENCY = 32  # a flooder's POSTs in flight at once


@dataclass
class Observation:
    """What one message's user saw."""

    planned: Planned
    sent_s: float | None = None
    ack_s: float | None = None
    first_s: float | None = None
    done_s: float | None = None
    notice_s: float | None = None  # the first "queued" notice seen (Sluice's web chat)
    kind: str | None = None  # answer | notice | error | rejected; None = no reply seen
    cached: bool = False
    lane: str | None = None  # Sluice: from the 202 body; naive: the planned lane
    # Sluice: the door refused it (202 body "refused"); "notice" says whether its
    # refusal notice follows (else the user was told earlier in the window).
    refused: bool = False
    refusal_notice: bool = False

    def __post_init__(self) -> None:
        if self.lane is None:
            # Until (or unless) the adapter says otherwise, the lane the schedule planned.
            self.lane = self.planned.lane

    @property
    def ttft_s(self) -> float | None:
        """Send to the first visible text."""
        if self.sent_s is None or self.first_s is None:
            return None
        return self.first_s - self.sent_s

    @property
    def first_visible_s(self) -> float | None:
        """Send to the first thing the user sees: the answer's first text, a queued
        notice, or the whole reply (a notice or an error), whichever came first."""
        if self.sent_s is None:
            return None
        seen = [t for t in (self.first_s, self.notice_s, self.done_s) if t is not None]
        return min(seen) - self.sent_s if seen else None

    @property
    def full_s(self) -> float | None:
        """Send to the whole reply."""
        if self.sent_s is None or self.done_s is None:
            return None
        return self.done_s - self.sent_s


class Clock:
    """Seconds since the schedule's start."""

    def __init__(self) -> None:
        self.t0 = time.monotonic() + LEAD_S

    def now(self) -> float:
        """Seconds since t0 (negative before it)."""
        return time.monotonic() - self.t0

    async def until(self, at_s: float) -> None:
        """Sleep until ``at_s``."""
        delay = at_s - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass
class Progress:
    """Counters the progress bar reads."""

    sent: int = 0
    finished: int = 0


def session_id(run_id: str, user: int) -> str:
    """The name of one simulated user: the bench's sign-in hook takes it from the
    ``X-Bench-User`` header, so its web user id is ``web:<name>``."""
    return f"{run_id}u{user}"


def _session(http_limit: int = 0) -> aiohttp.ClientSession:
    # No shared cookie jar: each simulated user sends its own session cookie.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=http_limit),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def sign_in(http: aiohttp.ClientSession, base: str, name: str) -> dict[str, str]:
    """Open a simulated user's web chat session; returns the headers its requests carry
    (its name for the bench's sign-in hook and its session cookie).

    Raises:
        aiohttp.ClientError: the adapter refused or did not answer.
    """
    who = {BENCH_USER_HEADER: name}
    async with http.post(f"{base}/api/session", json={}, headers=who) as resp:
        if resp.status != 200:
            raise aiohttp.ClientResponseError(
                resp.request_info, (), status=resp.status, message=await resp.text()
            )
        morsel = resp.cookies.get(SESSION_COOKIE)
        if morsel is None:
            raise aiohttp.ClientResponseError(
                resp.request_info, (), status=resp.status, message="no session cookie"
            )
        return {**who, "Cookie": f"{SESSION_COOKIE}={morsel.value}"}


class SluiceUsers:
    """Web chat tabs against the Sluice web adapter."""

    def __init__(self, base: str, plan: list[Planned], run_id: str, deadline_s: float) -> None:
        self.base = base
        self.plan = plan
        self.run_id = run_id
        self.deadline_s = deadline_s
        self.obs = [Observation(p) for p in plan]
        self.progress = Progress()
        self._by_mid: dict[str, Observation] = {}
        self._early: dict[str, list[tuple[float, dict[str, Any]]]] = defaultdict(list)
        self.clock = Clock()

    async def run(self) -> list[Observation]:
        """Run every user to the end (all replies seen, or the deadline)."""
        per_user: dict[int, list[Observation]] = defaultdict(list)
        for o in self.obs:
            per_user[o.planned.user].append(o)
        async with _session() as http:
            await asyncio.gather(*(self._user(http, u, obs) for u, obs in per_user.items()))
        return self.obs

    def _finished(self, obs: list[Observation]) -> bool:
        # A quiet refusal gets nothing more: the 202 said so.
        return all(o.kind is not None or (o.refused and not o.refusal_notice) for o in obs)

    def _apply(self, o: Observation, at: float, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "delta" and o.first_s is None:
            o.first_s = at
        elif kind == "queued" and o.notice_s is None:
            o.notice_s = at
        elif kind == "done" and o.kind is None:
            o.done_s = at
            if o.first_s is None:
                o.first_s = at
            o.kind = str(event.get("kind", "answer"))
            o.cached = bool(event.get("cached", False))
            self.progress.finished += 1

    def _event(self, at: float, event: dict[str, Any], wake: asyncio.Event) -> None:
        mid = event.get("message_id")
        if not isinstance(mid, str) or event.get("type") not in ("delta", "queued", "done"):
            return
        o = self._by_mid.get(mid)
        if o is None:
            self._early[mid].append((at, event))
        else:
            self._apply(o, at, event)
            wake.set()

    async def _listen(
        self, http: aiohttp.ClientSession, headers: dict[str, str], wake: asyncio.Event
    ) -> None:
        last_id = "0-0"
        while True:
            url = f"{self.base}/api/events?since={last_id}"
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url, headers=headers) as resp:
                    async for raw in resp.content:
                        line = raw.decode().rstrip("\n")
                        if line.startswith("id: "):
                            last_id = line[4:]
                        elif line.startswith("data: "):
                            self._event(self.clock.now(), json.loads(line[6:]), wake)
            await asyncio.sleep(0.2)  # the stream ended: reconnect where it left off

    async def _send(
        self, http: aiohttp.ClientSession, headers: dict[str, str], o: Observation
    ) -> None:
        await self.clock.until(o.planned.at_s)
        o.sent_s = self.clock.now()
        self.progress.sent += 1
        try:
            async with http.post(
                f"{self.base}/api/messages", json={"text": o.planned.text}, headers=headers
            ) as resp:
                body = await resp.json(content_type=None)
                o.ack_s = self.clock.now() - o.sent_s
                if resp.status != 202:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, (), status=resp.status, message=str(body)
                    )
        except (aiohttp.ClientError, OSError, json.JSONDecodeError):
            o.kind, o.done_s = "rejected", self.clock.now()
            self.progress.finished += 1
            return
        mid = str(body["message_id"])
        o.lane = str(body.get("lane") or o.lane)
        o.refused = bool(body.get("refused", False))
        o.refusal_notice = o.refused and bool(body.get("notice", False))
        if o.refused and not o.refusal_notice:
            self.progress.finished += 1
        self._by_mid[mid] = o
        for at, event in self._early.pop(mid, []):
            self._apply(o, at, event)

    async def _user(self, http: aiohttp.ClientSession, user: int, obs: list[Observation]) -> None:
        await self.clock.until(obs[0].planned.at_s - LEAD_S / 2)
        try:
            headers = await sign_in(http, self.base, session_id(self.run_id, user))
        except (aiohttp.ClientError, OSError):
            for o in obs:  # no session: every message of this user counts as refused
                o.kind, o.sent_s, o.done_s = "rejected", self.clock.now(), self.clock.now()
                self.progress.sent += 1
                self.progress.finished += 1
            return
        wake = asyncio.Event()
        listener = asyncio.create_task(self._listen(http, headers, wake))
        try:
            if obs[0].planned.flooder:
                # A flooder does not wait for one POST before the next.
                gate = asyncio.Semaphore(FLOOD_CONCURRENCY)

                async def send(o: Observation) -> None:
                    async with gate:
                        await self._send(http, headers, o)

                await asyncio.gather(*(send(o) for o in obs))
                wake.set()
            for o in obs if not obs[0].planned.flooder else ():
                await self._send(http, headers, o)
                if o.kind is not None:
                    wake.set()
            while not self._finished(obs) and self.clock.now() < self.deadline_s:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=1.0)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


class NaiveUsers:
    """One streamed HTTP request per message against the naive server."""

    def __init__(self, base: str, plan: list[Planned], run_id: str, deadline_s: float) -> None:
        self.base = base
        self.plan = plan
        self.run_id = run_id
        self.deadline_s = deadline_s
        self.obs = [Observation(p) for p in plan]
        self.progress = Progress()
        self.clock = Clock()

    async def run(self) -> list[Observation]:
        """Send every message and read every answer (or give up at the deadline)."""
        async with _session() as http:
            await asyncio.gather(*(self._one(http, o) for o in self.obs))
        return self.obs

    async def _one(self, http: aiohttp.ClientSession, o: Observation) -> None:
        await self.clock.until(o.planned.at_s)
        o.sent_s = self.clock.now()
        self.progress.sent += 1
        session = session_id(self.run_id, o.planned.user)
        remaining = max(1.0, self.deadline_s - o.sent_s)
        try:
            async with asyncio.timeout(remaining):
                await self._exchange(http, session, o)
        except TimeoutError:
            return  # no reply seen before the deadline
        except (aiohttp.ClientError, OSError, json.JSONDecodeError):
            if o.kind is None:
                o.kind, o.done_s = "rejected", self.clock.now()
                self.progress.finished += 1

    async def _exchange(self, http: aiohttp.ClientSession, session: str, o: Observation) -> None:
        async with http.post(
            f"{self.base}/api/messages", json={"session": session, "text": o.planned.text}
        ) as resp:
            if resp.status != 200:
                raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
            async for raw in resp.content:
                event = json.loads(raw)
                now = self.clock.now()
                if event["type"] == "delta" and o.first_s is None:
                    o.first_s = now
                elif event["type"] == "done":
                    o.done_s = now
                    o.first_s = o.first_s if o.first_s is not None else now
                    o.kind = str(event["kind"])
                    self.progress.finished += 1
        # The naive platform ack is the end of the handler: the response is complete.
        if o.done_s is not None and o.sent_s is not None:
            o.ack_s = o.done_s - o.sent_s

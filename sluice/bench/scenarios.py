"""Named load scenarios and the message schedule they produce.

A scenario is the offered load (users, messages, timing, repeats, heavy users) plus
the simulated provider (limits and latency). The schedule is open-loop: every
message is sent at its planned time whether or not earlier replies came, so both
designs get exactly the same load.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from typing import Any

FAQ = (
    "What are your opening hours?",
    "How do I reset my password?",
    "Where can I download the invoice?",
    "How do I invite a teammate?",
    "What does the free plan include?",
    "How do I export my data?",
    "Is there an API?",
    "How do I cancel my subscription?",
    "Which regions do you host in?",
    "How do I turn on two-factor authentication?",
    "What is the refund policy?",
    "How do I change the language?",
    "Can I use it on mobile?",
    "How do I contact support?",
    "What's new in this release?",
    "How do I delete my account?",
    "Do you offer discounts for schools?",
    "How do I connect Slack?",
    "What are the rate limits?",
    "How do I upgrade my plan?",
)


@dataclass(frozen=True)
class Scenario:
    """One benchmark's load and simulated provider."""

    name: str
    users: int
    messages_per_user: int
    duration_s: float
    repeat_ratio: float = 0.3
    billing_ratio: float = 0.1
    heavy_users: int = 0
    heavy_factor: int = 10
    rpm: int | None = 600
    tpm: int | None = None
    first_token_ms: float = 300.0
    token_ms: float = 10.0
    tokens: int = 40
    drain_timeout_s: float = 120.0
    seed: int = 1
    # The flood scenario: one user sends flood_messages within flood_duration_s from
    # flood_start_s on, and tenant_users more users (one tenant's) send tenant_factor
    # times the normal share each.
    flood_messages: int = 0
    flood_start_s: float = 20.0
    flood_duration_s: float = 10.0
    tenant_users: int = 0
    tenant_factor: int = 10
    # The provider pool: ``providers`` simulators share ``rpm`` / ``tpm`` equally
    # (SLUICE_PROVIDERS); with ``kill_provider_at_s``, the last one is killed that many
    # seconds into the run.
    providers: int = 1
    kill_provider_at_s: float | None = None

    def scaled(self, factor: float) -> Scenario:
        """Fewer (or more) users, heavy users and provider capacity; same timing."""
        if factor == 1:
            return self
        return replace(
            self,
            users=max(1, round(self.users * factor)),
            heavy_users=round(self.heavy_users * factor),
            tenant_users=round(self.tenant_users * factor),
            flood_messages=round(self.flood_messages * factor),
            rpm=max(1, round(self.rpm * factor)) if self.rpm else None,
            tpm=max(1, round(self.tpm * factor)) if self.tpm else None,
        )

    @property
    def total_messages(self) -> int:
        """Messages the schedule sends."""
        light = (self.users - self.heavy_users) * self.messages_per_user
        heavy = self.heavy_users * self.messages_per_user * self.heavy_factor
        tenant = self.tenant_users * self.messages_per_user * self.tenant_factor
        return light + heavy + tenant + self.flood_messages

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready parameters."""
        return {**asdict(self), "total_messages": self.total_messages}


LAUNCH_DAY = Scenario(
    name="launch-day",
    users=1000,
    messages_per_user=2,
    duration_s=60,
    repeat_ratio=0.3,
    heavy_users=10,
    heavy_factor=10,
    rpm=600,
    first_token_ms=300,
    token_ms=10,
    tokens=40,
)
# Half the provider's limit (600 rpm -> 300 messages a minute) for two minutes.
STEADY = replace(
    LAUNCH_DAY,
    name="steady",
    users=300,
    messages_per_user=2,
    duration_s=120,
    heavy_users=0,
)
TEN_X = replace(LAUNCH_DAY, name="10x", users=10_000, heavy_users=100, drain_timeout_s=300)
# Placeholder: the history helper's flush benchmark is called instead of a load run.
FLUSH = replace(LAUNCH_DAY, name="flush")
SERIALIZER = replace(LAUNCH_DAY, name="serializer")
# Placeholder: score ordering vs one queue per lane (sluice.bench.lanes) is run instead.
LANES = replace(LAUNCH_DAY, name="lanes")
# 200 normal users chat (3 messages each in a minute, half the provider's limit) while
# one user sends 5,000 messages in 10 s and one tenant's 10 users send 10x their share.
FLOOD = replace(
    LAUNCH_DAY,
    name="flood",
    users=200,
    messages_per_user=3,
    duration_s=60,
    heavy_users=0,
    flood_messages=5000,
    flood_start_s=20.0,
    flood_duration_s=10.0,
    tenant_users=10,
    tenant_factor=10,
    drain_timeout_s=180,
)
# The same normal users without the flooder and the heavy tenant: the flood run's yardstick.
FLOOD_CALM = replace(FLOOD, name="flood-calm", flood_messages=0, tenant_users=0)

# Launch-day against two simulators of 300 rpm each (one pool) instead of one of 600;
# and the same with the second simulator killed 20 s into the run (the survivor's 300 rpm
# then answers the rest: a longer drain).
LAUNCH_DAY_POOL = replace(LAUNCH_DAY, name="launch-day-pool", providers=2)
LAUNCH_DAY_POOL_KILL = replace(
    LAUNCH_DAY_POOL, name="launch-day-pool-kill", kill_provider_at_s=20.0, drain_timeout_s=480
)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        LAUNCH_DAY,
        STEADY,
        TEN_X,
        FLUSH,
        LANES,
        SERIALIZER,
        FLOOD,
        FLOOD_CALM,
        LAUNCH_DAY_POOL,
        LAUNCH_DAY_POOL_KILL,
    )
}
USER_KINDS = ("light", "heavy", "heavy-tenant", "flooder")


@dataclass(frozen=True)
class Planned:
    """One message of the schedule."""

    index: int
    user: int
    seq: int
    at_s: float
    text: str
    repeated: bool
    billing: bool = False
    heavy: bool = False
    flooder: bool = False
    heavy_tenant: bool = False

    @property
    def kind(self) -> str:
        """Which kind of user sent it (one of :data:`USER_KINDS`)."""
        if self.flooder:
            return "flooder"
        if self.heavy_tenant:
            return "heavy-tenant"
        return "heavy" if self.heavy else "light"

    @property
    def lane(self) -> str:
        """The lane the bench bot's rules (:mod:`sluice.bench.bot`) choose: billing
        questions ``high``, other messages of heavy users ``bulk``, the rest ``default``."""
        if self.billing:
            return "high"
        return "bulk" if self.heavy else "default"


def plan(scenario: Scenario) -> list[Planned]:
    """The schedule: each user's messages at sorted random times within the duration.

    The first ``heavy_users`` users send ``heavy_factor`` times as many messages.
    The ``flood`` scenario adds ``tenant_users`` users sending ``tenant_factor`` times
    as many, and one user sending ``flood_messages`` within ``flood_duration_s``.
    A ``repeat_ratio`` share of messages are common questions (cacheable), a
    ``billing_ratio`` share are billing questions (the ``high`` lane); the rest are
    unique to their user.
    """
    rng = random.Random(scenario.seed)
    out: list[tuple[float, int, int, str, bool, bool]] = []
    tenant_end = scenario.users + scenario.tenant_users
    for user in range(tenant_end + (1 if scenario.flood_messages else 0)):
        n = scenario.messages_per_user
        if user < scenario.heavy_users:
            n *= scenario.heavy_factor
        elif user >= tenant_end:
            n = scenario.flood_messages
        elif user >= scenario.users:
            n *= scenario.tenant_factor
        if user >= tenant_end:
            start, span = scenario.flood_start_s, scenario.flood_duration_s
        else:
            start, span = 0.0, scenario.duration_s
        times = sorted(start + rng.uniform(0, span) for _ in range(n))
        for seq, at in enumerate(times):
            draw = rng.random()
            billing = False
            if draw < scenario.repeat_ratio:
                text, repeated = rng.choice(FAQ), True
            elif draw < scenario.repeat_ratio + scenario.billing_ratio:
                invoice = rng.randrange(10**6)
                text = (
                    f"User {user} billing question {seq}: why was invoice {invoice} charged twice?"
                )
                repeated, billing = False, True
            else:
                text = (
                    f"User {user} asks question {seq}: how do I set up item {rng.randrange(10**6)}?"
                )
                repeated = False
            out.append((at, user, seq, text, repeated, billing))
    out.sort()
    return [
        Planned(
            index=i,
            user=u,
            seq=s,
            at_s=at,
            text=t,
            repeated=r,
            billing=b,
            heavy=u < scenario.heavy_users,
            heavy_tenant=scenario.users <= u < tenant_end,
            flooder=u >= tenant_end,
        )
        for i, (at, u, s, t, r, b) in enumerate(out)
    ]

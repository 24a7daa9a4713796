"""Traffic control keeps tenants and users apart: cache keys (property-based) and rate-limit
counters (real Redis). Cache entries never served across tenants end to end:
``tests/test_traffic_e2e.py::test_fifty_identical_questions_cost_one_llm_call_and_tenants_never_share``.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.framework.bot import Bot
from core.infra.redis import Keys
from core.messages import IncomingMessage
from core.traffic.cache import cache_digest
from core.traffic.ratelimit import RateLimiter, limits_for

PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_word = st.text(alphabet=st.characters(blacklist_categories=["Cs", "Zs", "Cc"]), min_size=1)
_content = st.lists(_word, min_size=1, max_size=6).map(" ".join)
_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": _content}
    ),
    min_size=1,
    max_size=5,
)
_params = st.fixed_dictionaries(
    {
        "temperature": st.none() | st.floats(0, 2, allow_nan=False),
        "max_tokens": st.none() | st.integers(1, 4000),
    }
)
_id = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)


def _respace(text: str) -> str:
    """The same words with other whitespace around and between them."""
    return "  " + text.replace(" ", " \n\t ") + "\n"


@PROPS
@given(tenant=_id, bot=_id, model=_id, params=_params, messages=_messages)
def test_the_same_context_always_gives_the_same_cache_key(
    tenant: str, bot: str, model: str, params: dict[str, Any], messages: list[dict[str, str]]
) -> None:
    key = cache_digest(tenant, bot, model, params, messages)
    respaced = [{**m, "content": _respace(m["content"])} for m in messages]
    reordered = dict(reversed(list(params.items())))
    assert cache_digest(tenant, bot, model, reordered, respaced) == key


@PROPS
@given(
    tenant=_id,
    bot=_id,
    model=_id,
    params=_params,
    messages=_messages,
    change=st.sampled_from(
        ["tenant", "bot", "model", "temperature", "max_tokens", "content", "role", "extra turn"]
    ),
    index=st.integers(0, 10),
)
def test_any_difference_in_tenant_model_params_prompt_or_context_changes_the_key(
    tenant: str,
    bot: str,
    model: str,
    params: dict[str, Any],
    messages: list[dict[str, str]],
    change: str,
    index: int,
) -> None:
    key = cache_digest(tenant, bot, model, params, messages)
    args: dict[str, Any] = {
        "tenant": tenant,
        "bot": bot,
        "model": model,
        "params": dict(params),
        "messages": copy.deepcopy(messages),
    }
    i = index % len(messages)
    if change in ("tenant", "bot", "model"):
        args[change] += "x"
    elif change == "temperature":
        args["params"]["temperature"] = (params["temperature"] or 0.0) + 0.5
    elif change == "max_tokens":
        args["params"]["max_tokens"] = (params["max_tokens"] or 0) + 1
    elif change == "content":
        args["messages"][i]["content"] += "!"
    elif change == "role":
        roles = ["system", "user", "assistant"]
        args["messages"][i]["role"] = roles[(roles.index(messages[i]["role"]) + 1) % 3]
    else:
        args["messages"].insert(i, {"role": "user", "content": "earlier"})
    assert cache_digest(**args) != key, change


def _msg(platform: str, tenant: str, user: str) -> IncomingMessage:
    return IncomingMessage(
        platform=platform,
        tenant=tenant,
        channel="C1",
        user=user,
        message_id=uuid.uuid4().hex,
        text="hello",
    )


async def test_the_same_user_id_in_another_workspace_or_platform_has_its_own_limit(settings, redis):
    limiter = RateLimiter(redis, Keys(settings.key_prefix))
    s = settings.model_copy(update={"user_requests_per_window": 2, "user_window_s": 86_400})
    limits = limits_for(s, Bot(), _msg("slack", "T1", "U1"))
    verdicts = [await limiter.check(_msg("slack", "T1", "U1"), limits) for _ in range(3)]
    assert [v.allowed for v in verdicts] == [True, True, False]
    # Slack user ids are unique only within a workspace: U1 of T2 is someone else.
    assert (await limiter.check(_msg("slack", "T2", "U1"), limits)).allowed
    assert (await limiter.check(_msg("discord", "T1", "U1"), limits)).allowed
    assert (await limiter.check(_msg("slack", "T1", "U2"), limits)).allowed


async def test_a_workspace_at_its_limit_leaves_other_workspaces_and_their_tokens_alone(
    settings, redis
):
    limiter = RateLimiter(redis, Keys(settings.key_prefix))
    s = settings.model_copy(
        update={
            "tenant_requests_per_window": 3,
            "user_window_s": 86_400,
            "user_tokens_per_day": 100,
        }
    )
    limits = limits_for(s, Bot(), _msg("slack", "T1", "U1"))
    for n in range(3):
        assert (await limiter.check(_msg("slack", "T1", f"U{n}"), limits)).allowed
    refused = await limiter.check(_msg("slack", "T1", "U9"), limits)
    assert not refused.allowed and refused.scope.startswith("tenant")
    assert (await limiter.check(_msg("slack", "T2", "U9"), limits)).allowed
    assert (await limiter.check(_msg("discord", "T1", "U9"), limits)).allowed
    # Tokens one user spent count against that user only.
    await limiter.record_tokens(_msg("slack", "T2", "U1"), 500)
    assert not (await limiter.check(_msg("slack", "T2", "U1"), limits)).allowed
    assert (await limiter.check(_msg("slack", "T3", "U1"), limits)).allowed

"""Discord DMs: the DM policy (everyone / members / nobody), one tenant per DM user,
one refusal notice per user per window. Real discord.py against the fake Discord."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from bots.discord.intake import DM_REFUSED
from bots.discord.interactions import token_ref
from core.history.hot import split_conversation_id
from core.infra.redis import Keys
from core.settings import Settings
from core.traffic.ratelimit import Limits, RateLimiter
from tests.discord.conftest import GUILD, ROLE, IntakeLog, queued, wait_for
from tests.fakes.discord_fake import DiscordFake

ALICE = DiscordFake.user(610000000000000001, "alice")  # a member of GUILD
MALLORY = DiscordFake.user(610000000000000002, "mallory")  # in no guild of the bot
BOB = DiscordFake.user(610000000000000003, "bob")  # a member of GUILD
OTHER_GUILD = "100000000000000009"
MEMBERS = "/guilds/{guild_id}/members/{user_id}"


def notices(fake: DiscordFake, channel: str) -> list[str]:
    return [m["content"] for m in fake.bot_messages(channel)]


async def dm(fake: DiscordFake, user: dict[str, object], channel: str, text: str) -> dict[str, Any]:
    await fake.dm_channel(channel, user)
    return await fake.send_user_message(channel, user, text)


async def test_default_policy_answers_members_and_refuses_others_with_one_notice(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings, intake_log: IntakeLog
) -> None:
    assert discord_settings.discord_dm_policy == "members"
    fake.add_member(GUILD, ALICE)
    async with adapter():
        await dm(fake, MALLORY, "510000000000000002", "let me in")
        await wait_for(lambda: notices(fake, "510000000000000002"))
        again = await dm(fake, MALLORY, "510000000000000002", "again")
        and_again = await dm(fake, MALLORY, "510000000000000002", "and again")
        await dm(fake, ALICE, "510000000000000001", "hello as a member")
        await wait_for(lambda: queued(redis, discord_settings))
        await intake_log.handled(again, and_again)  # refused, after the notice logic ran
    [msg] = await queued(redis, discord_settings)
    assert (msg.text, msg.tenant, msg.is_dm) == ("hello as a member", f"dm-{ALICE['id']}", True)
    # One notice for three refused DMs, and it pings nobody.
    assert notices(fake, "510000000000000002") == [DM_REFUSED["members"]]
    [post] = [
        c
        for c in fake.calls_to("POST", "/channels/{channel_id}/messages")
        if c.major == "510000000000000002"
    ]
    assert post.body["allowed_mentions"] == {"parse": []}
    # Membership was looked up once per user, then remembered.
    looked_up = sorted(c.path for c in fake.calls_to("GET", MEMBERS))
    assert looked_up == sorted(
        [f"/guilds/{GUILD}/members/{MALLORY['id']}", f"/guilds/{GUILD}/members/{ALICE['id']}"]
    )


async def test_members_policy_uses_the_guild_allow_list_and_the_role_lists(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    fake.add_guild(OTHER_GUILD)
    fake.add_member(GUILD, ALICE, [ROLE])
    fake.add_member(OTHER_GUILD, BOB)
    # Alice is a member of GUILD, which is not allowed: refused.
    async with adapter(discord_allow_guilds=[OTHER_GUILD]):
        await dm(fake, ALICE, "510000000000000011", "only in a guild that is not allowed")
        await dm(fake, BOB, "510000000000000012", "member of the allowed guild")
        await wait_for(lambda: queued(redis, discord_settings))
        await wait_for(lambda: notices(fake, "510000000000000011"))
    assert [m.text for m in await queued(redis, discord_settings)] == [
        "member of the allowed guild"
    ]
    await redis.delete(*[k async for k in redis.scan_iter(f"{discord_settings.key_prefix}:*")])
    # With a role allow-list the member needs one of the roles in that guild.
    async with adapter(discord_allow_roles=[ROLE]):
        await dm(fake, BOB, "510000000000000012", "member without the role")
        await dm(fake, ALICE, "510000000000000011", "member with the role")
        await wait_for(lambda: queued(redis, discord_settings))
        await wait_for(lambda: notices(fake, "510000000000000012"))
    assert [m.text for m in await queued(redis, discord_settings)] == ["member with the role"]
    await redis.delete(*[k async for k in redis.scan_iter(f"{discord_settings.key_prefix}:*")])
    async with adapter(discord_deny_roles=[ROLE]):
        await dm(fake, ALICE, "510000000000000011", "member with a denied role")
        await wait_for(lambda: len(notices(fake, "510000000000000011")) == 2)
    assert await queued(redis, discord_settings) == []


async def test_everyone_policy_answers_any_dm_and_nobody_policy_none(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings, intake_log: IntakeLog
) -> None:
    async with adapter(discord_dm_policy="everyone"):
        await dm(fake, MALLORY, "510000000000000021", "anyone may ask")
        await wait_for(lambda: queued(redis, discord_settings))
    assert fake.calls_to("GET", MEMBERS) == []
    fake.add_member(GUILD, ALICE)
    async with adapter(discord_dm_policy="nobody"):
        refused = await dm(fake, ALICE, "510000000000000022", "even a member")
        await wait_for(lambda: notices(fake, "510000000000000022"))
        await intake_log.handled(refused)
    assert [m.text for m in await queued(redis, discord_settings)] == ["anyone may ask"]
    assert notices(fake, "510000000000000022") == [DM_REFUSED["nobody"]]


async def test_each_dm_user_is_their_own_tenant_so_one_cannot_spend_anothers_budget(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    fake.add_member(GUILD, ALICE)
    fake.add_member(GUILD, BOB)
    async with adapter():
        await dm(fake, ALICE, "510000000000000031", "from alice")
        await dm(fake, BOB, "510000000000000032", "from bob")
        await wait_for(lambda: _count(redis, discord_settings, 2))
    by_text = {m.text: m for m in await queued(redis, discord_settings)}
    alice, bob = by_text["from alice"], by_text["from bob"]
    assert (alice.tenant, bob.tenant) == (f"dm-{ALICE['id']}", f"dm-{BOB['id']}")
    # The tenant survives the history's conversation ids (flush, export, purge).
    assert split_conversation_id(alice.conversation_id) == (
        "discord",
        f"dm-{ALICE['id']}",
        "510000000000000031",
        None,
    )
    limiter = RateLimiter(redis, Keys(discord_settings.key_prefix))
    limits = Limits(
        window_s=60,
        user_requests=None,
        tenant_requests=None,
        user_tokens_per_day=None,
        tenant_tokens_per_day=1000,
    )
    await limiter.record_tokens(alice, 1000)  # Alice spends her tenant's whole day
    spent = await limiter.check(alice, limits)
    assert not spent.allowed and spent.scope == "tenant:tokens"
    assert (await limiter.check(bob, limits)).allowed


async def _count(redis: Redis, settings: Settings, n: int) -> bool:
    return len(await queued(redis, settings)) == n


async def test_ask_in_a_dm_follows_the_dm_policy(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    fake.add_member(GUILD, ALICE)
    async with adapter():
        await fake.dm_channel("510000000000000041", MALLORY)
        refused = await fake.invoke_ask("510000000000000041", MALLORY, "may I?")
        await fake.dm_channel("510000000000000042", ALICE)
        taken = await fake.invoke_ask("510000000000000042", ALICE, "and I?")
        await wait_for(lambda: refused.original is not None)
        await wait_for(lambda: queued(redis, discord_settings))
    assert refused.callback_type == 5  # the fake, like Discord, refuses a callback after 3 s
    assert refused.original["content"] == DM_REFUSED["members"]
    [msg] = await queued(redis, discord_settings)
    assert (msg.text, msg.tenant) == ("and I?", f"dm-{ALICE['id']}")
    assert msg.meta["interaction"] == token_ref(taken.token)


async def test_a_failed_membership_lookup_refuses_for_now_and_is_not_remembered(
    adapter, fake: DiscordFake, redis: Redis, discord_settings: Settings
) -> None:
    fake.add_member(GUILD, ALICE)
    fake.fail("GET", r"/guilds/\d+/members/", 500, times=1)
    async with adapter(discord_retries=0):
        await dm(fake, ALICE, "510000000000000051", "while Discord fails")
        await wait_for(lambda: notices(fake, "510000000000000051"))
        await dm(fake, ALICE, "510000000000000051", "after it recovered")
        await wait_for(lambda: queued(redis, discord_settings))
    assert notices(fake, "510000000000000051") == [DM_REFUSED["unchecked"]]
    assert [m.text for m in await queued(redis, discord_settings)] == ["after it recovered"]

"""Bot definitions: schemas from type hints, command parsing, and the author's mistakes."""

from __future__ import annotations

import enum
from typing import Literal

import pytest

from core.errors import BotDefinitionError
from core.framework.bot import Bot, LaneRule, MessageContext, Reply
from core.messages import IncomingMessage


def _ctx(text: str = "", **kw: object) -> MessageContext:
    fields: dict[str, object] = {
        "platform": "slack",
        "tenant": "T1",
        "channel": "C1",
        "user": "U1",
        "message_id": "m1",
        "text": text,
    }
    fields.update(kw)
    return MessageContext(**fields)  # type: ignore[arg-type]


def _msg(text: str = "hi", **kw: object) -> IncomingMessage:
    fields: dict[str, object] = {
        "platform": "slack",
        "tenant": "T1",
        "channel": "C1",
        "user": "U1",
        "message_id": "m1",
        "text": text,
    }
    fields.update(kw)
    return IncomingMessage(**fields)  # type: ignore[arg-type]


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


# --- tools -------------------------------------------------------------------------


def test_tool_schema_comes_from_type_hints_and_docstring():
    bot = Bot()

    @bot.tool
    async def search(
        ctx: MessageContext,
        query: str,
        limit: int = 5,
        ratio: float = 0.5,
        exact: bool = False,
        mode: Literal["fast", "deep"] = "fast",
        color: Color | None = None,
        tags: list[str] | None = None,
        weights: dict[str, float] | None = None,
    ) -> list[str]:
        """Search the knowledge base.

        Longer explanation that the model also reads.

        Args:
            query: Words to look for.
            limit: Most results to return;
                more costs more.
        """
        return []

    fn = bot.tools["search"].openai_schema()["function"]
    assert fn["name"] == "search"
    assert fn["description"] == (
        "Search the knowledge base.\n\nLonger explanation that the model also reads."
    )
    props = fn["parameters"]["properties"]
    assert "ctx" not in props
    assert props["query"] == {"type": "string", "description": "Words to look for."}
    assert props["limit"] == {
        "type": "integer",
        "description": "Most results to return; more costs more.",
        "default": 5,
    }
    assert props["ratio"]["type"] == "number" and props["exact"]["type"] == "boolean"
    assert props["mode"] == {"type": "string", "enum": ["fast", "deep"], "default": "fast"}
    assert props["color"] == {
        "anyOf": [{"type": "string", "enum": ["red", "blue"]}, {"type": "null"}]
    }
    assert props["tags"]["anyOf"][0] == {"type": "array", "items": {"type": "string"}}
    assert props["weights"]["anyOf"][0] == {
        "type": "object",
        "additionalProperties": {"type": "number"},
    }
    assert fn["parameters"]["required"] == ["query"]
    assert fn["parameters"]["additionalProperties"] is False


def test_sphinx_style_param_descriptions_are_read():
    bot = Bot()

    @bot.tool(name="find-user")
    async def find(email: str) -> str:
        """Find a user.

        :param email: Their e-mail address.
        """
        return email

    props = bot.tools["find-user"].openai_schema()["function"]["parameters"]["properties"]
    assert props["email"]["description"] == "Their e-mail address."


async def test_tool_arguments_are_validated_and_converted():
    bot = Bot()

    @bot.tool
    async def repeat(word: str, times: int = 1, color: Color = Color.RED) -> str:
        """Repeat a word."""
        return f"{word * times}:{color.value}"

    tool = bot.tools["repeat"]
    assert await tool.invoke(_ctx(), '{"word": "ab", "times": "2", "color": "blue"}') == "abab:blue"
    with pytest.raises(ValueError, match="times"):
        await tool.invoke(_ctx(), '{"word": "ab", "times": "many"}')
    with pytest.raises(ValueError, match="extra"):
        await tool.invoke(_ctx(), '{"word": "ab", "extra": 1}')
    with pytest.raises(ValueError, match="not valid JSON"):
        await tool.invoke(_ctx(), "{word")


def test_tool_with_an_untyped_argument_is_refused_with_the_fix():
    bot = Bot()
    with pytest.raises(BotDefinitionError) as err:

        @bot.tool
        async def weather(city, days: int = 1) -> str:  # type: ignore[no-untyped-def]
            """The weather."""
            return ""

    assert str(err.value) == (
        "@bot.tool weather(): argument 'city' has no type annotation, so Sluice cannot tell "
        "the model what to pass. Annotate it, e.g. `city: str` (or int, float, bool, "
        "Literal[...], list[str], ...)."
    )


def test_tool_mistakes_name_the_fix():
    bot = Bot()
    with pytest.raises(BotDefinitionError, match=r"is not async: define it with `async def"):

        @bot.tool
        def sync_tool(x: str) -> str:  # type: ignore[arg-type]
            """Sync."""
            return x

    with pytest.raises(BotDefinitionError, match=r"has no docstring.*Add one"):

        @bot.tool
        async def undocumented(x: str) -> str:
            return x

    with pytest.raises(BotDefinitionError, match=r"has type .*set.*Use str, int"):

        @bot.tool
        async def odd(x: set[int]) -> str:
            """Odd."""
            return ""

    with pytest.raises(BotDefinitionError, match="`ctx: MessageContext`"):

        @bot.tool
        async def untyped_ctx(ctx) -> str:  # type: ignore[no-untyped-def]
            """Needs ctx."""
            return ""

    @bot.tool
    async def once(x: str) -> str:
        """Once."""
        return x

    with pytest.raises(BotDefinitionError, match="two tools are named 'once'"):
        bot.tool(name="once")(once)


# --- commands ----------------------------------------------------------------------


def _weather_bot() -> Bot:
    bot = Bot()

    @bot.command("weather", help="Forecast for a city.")
    async def weather(ctx: MessageContext, city: str, days: int = 1) -> str:
        return f"{city}|{days}|{ctx.user}"

    @bot.command("alert", help="Set an alert.")
    async def alert(level: Literal["low", "high"], loud: bool = False) -> str:
        return f"{level}|{loud}"

    return bot


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/weather Paris 2", "Paris|2|U1"),
        ("/WEATHER Paris", "Paris|1|U1"),
        ("weather Paris", "Paris|1|U1"),
        ("weather Paris 3", "Paris|3|U1"),
        ('/weather "New York"', "New York|1|U1"),
        ("/alert HIGH yes", "high|True"),
        ("alert low", "low|False"),
    ],
)
async def test_command_arguments_are_parsed_from_text(text, expected):
    reply = await _weather_bot().intercept(_ctx(text))
    assert reply is not None and reply.kind == "answer"
    assert reply.text == expected


async def test_last_text_argument_takes_the_rest():
    bot = Bot()

    @bot.command("ask", help="Ask.")
    async def ask(question: str) -> str:
        return question

    reply = await bot.intercept(_ctx("/ask what is  a 'sluice'?"))
    assert reply is not None and reply.text == "what is  a 'sluice'?"


async def test_text_that_does_not_fit_a_bare_command_goes_to_the_model():
    bot = _weather_bot()
    texts = ("help me with this", "alert everyone now", "weather", "weather in Paris today")
    for text in (*texts, "weatherman Paris"):
        assert await bot.intercept(_ctx(text)) is None, text


async def test_explicit_command_with_bad_arguments_gets_usage():
    bot = _weather_bot()
    reply = await bot.intercept(_ctx("/alert medium"))
    assert reply == Reply(
        text="Level must be one of low, high, not 'medium'. Usage: `/alert <level> [loud]`",
        kind="notice",
    )
    reply = await bot.intercept(_ctx('/weather "Paris'))
    assert reply is not None and reply.kind == "notice" and "No closing quotation" in reply.text


async def test_adapter_named_command_runs_with_its_arguments():
    bot = _weather_bot()
    reply = await bot.intercept(_ctx("Oslo 4"), command="weather")
    assert reply is not None and reply.text == "Oslo|4|U1"
    # A platform command the bot does not define (Slack's /ask) is a question.
    assert await bot.intercept(_ctx("what is up"), command="ask") is None


async def test_bare_commands_can_be_turned_off():
    bot = Bot(bare_commands=False)

    @bot.command("ping", help="Ping.")
    async def ping() -> str:
        return "pong"

    assert await bot.intercept(_ctx("ping")) is None
    reply = await bot.intercept(_ctx("/ping"))
    assert reply is not None and reply.text == "pong"


async def test_command_that_raises_gets_a_short_apology():
    bot = Bot()

    @bot.command("crash", help="Crash.")
    async def crash() -> str:
        raise RuntimeError("bug")

    reply = await bot.intercept(_ctx("/crash"))
    assert reply is not None and reply.kind == "error" and "Traceback" not in reply.text


def test_two_commands_with_one_name_are_refused_with_the_fix():
    bot = Bot(name="helper")

    @bot.command("status", help="Status.")
    async def status_a() -> str:
        return ""

    with pytest.raises(BotDefinitionError) as err:

        @bot.command("status", help="Status again.")
        async def status_b() -> str:
            return ""

    assert str(err.value) == (
        "Bot 'helper': two commands are named 'status' (status_a() and status_b()). "
        'Give one of them another name: @bot.command("other-name").'
    )


def test_command_mistakes_name_the_fix():
    bot = Bot()
    with pytest.raises(BotDefinitionError, match="command names must be 1-32 lowercase"):
        bot.command("Weather Now", help="x")(_async_noop)
    with pytest.raises(BotDefinitionError, match="has no help text"):

        @bot.command("nohelp")
        async def nohelp() -> str:
            return ""

    with pytest.raises(BotDefinitionError, match="Discord allows 100"):
        bot.command("long", help="x" * 101)(_async_noop)
    with pytest.raises(BotDefinitionError, match="argument 'city' has no type annotation"):

        @bot.command("w", help="w")
        async def w(city) -> str:  # type: ignore[no-untyped-def]
            return ""

    with pytest.raises(BotDefinitionError, match="required argument 'b' follows an optional"):

        @bot.command("order", help="o")
        async def order(a: int = 1, *, b: int) -> str:
            return ""


async def _async_noop() -> str:
    return ""


def test_command_specs_are_platform_neutral():
    specs = {s.name: s.as_dict() for s in _weather_bot().command_specs()}
    assert set(specs) == {"weather", "alert", "model", "listen", "help"}
    # /listen is Discord's; Slack's registration leaves it out.
    assert {s.name for s in _weather_bot().command_specs("slack")} == {
        "weather",
        "alert",
        "model",
        "help",
    }
    assert specs["weather"] == {
        "name": "weather",
        "description": "Forecast for a city.",
        "usage": "/weather <city> [days]",
        "params": [
            {
                "name": "city",
                "type": "string",
                "required": True,
                "description": "city",
                "choices": None,
                "default": None,
            },
            {
                "name": "days",
                "type": "integer",
                "required": False,
                "description": "days",
                "choices": None,
                "default": 1,
            },
        ],
    }
    assert specs["alert"]["params"][0]["choices"] == ["low", "high"]
    assert specs["alert"]["params"][1]["type"] == "boolean"


async def test_own_help_command_replaces_the_built_in_one():
    bot = Bot()

    @bot.command("help", help="Our help.")
    async def my_help() -> str:
        return "ask us anything"

    reply = await bot.intercept(_ctx("help"))
    assert reply is not None and reply.text == "ask us anything"


# --- hooks -------------------------------------------------------------------------


async def test_hooks_rewrite_answer_or_pass_in_order():
    bot = Bot()
    seen: list[str] = []

    @bot.before
    async def upper(ctx: MessageContext, text: str) -> str:
        return text.upper()

    @bot.before
    async def record(ctx: MessageContext, text: str) -> None:
        seen.append(text)

    @bot.after
    async def footer(ctx: MessageContext, reply: Reply) -> str:
        return reply.text + " -- bot"

    ctx = _ctx("hello")
    assert await bot.intercept(ctx) is None
    assert ctx.text == "HELLO" and seen == ["HELLO"]
    final = await bot.finish(ctx, Reply(text="answer"))
    assert final.text == "answer -- bot"
    # Notices and apologies are not decorated.
    notice = Reply(text="slow down", kind="notice")
    assert await bot.finish(ctx, notice) == notice


async def test_after_hook_can_block_an_answer():
    bot = Bot()

    @bot.after
    async def block(ctx: MessageContext, reply: Reply) -> Reply | None:
        if "secret" in reply.text:
            return Reply(text="I can't share that.", kind="notice")
        return None

    blocked = await bot.finish(_ctx(), Reply(text="the secret is 42"))
    assert blocked == Reply(text="I can't share that.", kind="notice")


async def test_hook_returning_the_wrong_type_fails_closed():
    bot = Bot()

    @bot.before
    async def wrong(ctx: MessageContext, text: str) -> int:  # type: ignore[type-var]
        return 3

    reply = await bot.intercept(_ctx("hi"))
    assert reply is not None and reply.kind == "error"


def test_hook_mistakes_name_the_fix():
    bot = Bot()
    with pytest.raises(BotDefinitionError, match=r"not async: define it as `async def"):
        bot.before(lambda ctx, text: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(BotDefinitionError, match=r"takes 1 argument.*must take two"):

        @bot.after  # type: ignore[arg-type]
        async def one(reply: Reply) -> None:
            return None


# --- prompts and lanes -------------------------------------------------------------


async def test_system_prompt_by_channel_tenant_dm_and_platform():
    bot = Bot(
        system_prompt="default",
        system_prompts={
            "channel:C9": "channel C9",
            "tenant:T2": "tenant T2",
            "dm": "a DM",
            "platform:discord": "discord",
        },
    )
    assert await bot.system_prompt_for(_ctx()) == "default"
    assert await bot.system_prompt_for(_ctx(channel="C9", tenant="T2")) == "channel C9"
    assert await bot.system_prompt_for(_ctx(tenant="T2", is_dm=True)) == "tenant T2"
    assert await bot.system_prompt_for(_ctx(is_dm=True, platform="discord")) == "a DM"
    assert await bot.system_prompt_for(_ctx(platform="discord")) == "discord"


async def test_prompt_function_comes_first_and_falls_back():
    bot = Bot(system_prompt="default")

    @bot.prompt
    async def by_user(ctx: MessageContext) -> str | None:
        if ctx.user == "boom":
            raise RuntimeError("bug")
        return f"Hello {ctx.user_name}" if ctx.user_name else None

    assert await bot.system_prompt_for(_ctx(user_name="Ada")) == "Hello Ada"
    assert await bot.system_prompt_for(_ctx()) == "default"
    assert await bot.system_prompt_for(_ctx(user="boom", user_name="X")) == "default"


def test_bad_system_prompts_key_is_refused():
    with pytest.raises(BotDefinitionError, match=r"system_prompts key 'C1' is not understood"):
        Bot(system_prompts={"C1": "x"})


def test_lane_rules_first_match_wins_and_functions_come_first():
    bot = Bot(
        lanes=[
            LaneRule("high", words=["billing"]),
            LaneRule("high", dm=True, platforms=["slack"]),
            LaneRule("bulk", channels=["C-random"]),
            LaneRule("high", commands=True),
        ]
    )
    assert bot.lane_for(_msg("my Billing is wrong", channel="C-random")) == "high"
    assert bot.lane_for(_msg("billings")) == "default"
    assert bot.lane_for(_msg("hi", is_dm=True)) == "high"
    assert bot.lane_for(_msg("hi", is_dm=True, platform="discord")) == "default"
    assert bot.lane_for(_msg("hi", channel="C-random")) == "bulk"
    assert bot.lane_for(_msg("/status")) == "high"
    assert bot.lane_for(_msg("x", meta={"command": "status"})) == "high"

    @bot.lane
    def admins(ctx: MessageContext) -> str | None:
        return "bulk" if ctx.user == "U-bot-tester" else None

    assert bot.lane_for(_msg("billing", user="U-bot-tester")) == "bulk"
    assert bot.lane_for(_msg("billing")) == "high"


def test_lane_rule_mistakes_are_refused():
    with pytest.raises(BotDefinitionError, match="unknown lane 'urgent'; use one of high"):
        LaneRule("urgent")
    with pytest.raises(BotDefinitionError, match=r"words must be a list, e.g. words=\['billing'\]"):
        LaneRule("high", words="billing")

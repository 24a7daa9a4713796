"""The bot definition: what a user of Sluice writes.

A bot is plain Python in the user's own module::

    from sluice import Bot, MessageContext

    bot = Bot(name="helper", system_prompt="You answer questions about our product.")

    @bot.command("ping", help="Check that the bot is alive.")
    async def ping(ctx: MessageContext) -> str:
        return "pong"

    @bot.tool
    async def lookup(topic: str) -> str:
        \"\"\"Look a topic up in the handbook.

        Args:
            topic: What the user asks about, in a few words.
        \"\"\"
        return HANDBOOK.get(topic, "nothing found")

    @bot.before
    async def no_secrets(ctx: MessageContext, text: str) -> str | None:
        return text.replace("hunter2", "[password]")

and ``SLUICE_APP=mybot:bot`` points workers and adapters at it. Without
``SLUICE_APP`` the built-in :data:`DEFAULT_BOT` answers. ``docs/guide.md`` describes
every decorator and field.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from core.errors import BotDefinitionError
from core.framework.admin import admin_commands
from core.framework.commands import (
    Command,
    CommandFunc,
    CommandSpec,
    CommandUsageError,
    help_text,
    make_command,
    split_invocation,
)
from core.framework.context import MessageContext
from core.framework.hooks import AfterHook, BeforeHook, Hook, make_hook, run_after, run_before
from core.framework.mcp import McpServer, close_servers, connect_servers
from core.framework.routing import LaneRule, check_lane
from core.framework.tools import Tool, ToolFunc, make_tool
from core.messages import IncomingMessage, Reply

__all__ = ["DEFAULT_BOT", "Bot", "LaneRule", "MessageContext", "Reply", "load_bot"]

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, concise assistant in a team chat. Answer clearly; use Markdown "
    "sparingly; say so when you do not know."
)
COMMAND_APOLOGY = "Sorry, that command failed. Please try again later."

PromptFunc = Callable[[MessageContext], "str | Awaitable[str | None] | None"]
LaneFunc = Callable[[MessageContext], "str | None"]
_PROMPT_KEY_RE = re.compile(r"^(dm|(platform|tenant|channel):.+)$")
_ADMIN_COMMANDS = admin_commands()
F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=CommandFunc)
T = TypeVar("T", bound=ToolFunc)
B = TypeVar("B", bound=BeforeHook)
A = TypeVar("A", bound=AfterHook)


@dataclass
class Bot:
    """A chat bot: persona, model and parameters, commands, tools, hooks, lane rules.

    Attributes:
        name: Shown in logs and used to scope the response cache.
        system_prompt: The persona sent first in every conversation (the default
            when neither ``system_prompts`` nor a ``@bot.prompt`` function decide).
        model: Model id; ``None`` means the ``SLUICE_MODEL`` setting.
        fallback_model: Model to answer with when no provider serving ``model`` can
            (see ``SLUICE_PROVIDERS``); ``None`` means the ``SLUICE_FALLBACK_MODEL`` setting.
        temperature: Sampling temperature; ``None`` leaves the provider's default.
        max_tokens: Longest answer in tokens; ``None`` means ``SLUICE_LLM_MAX_TOKENS``.
        context_turns: Earlier turns sent with each message; ``None`` means the setting.
        system_prompts: Overrides of the system prompt by where the message comes from;
            keys ``"channel:<id>"``, ``"tenant:<id>"``, ``"dm"``, ``"platform:<name>"``,
            most specific first in that order.
        lanes: Lane rules, first match wins (see :mod:`core.framework.routing`).
        tool_max_steps: Rounds of tool calls per message; ``None`` means the setting.
        tool_timeout_s: Time for all tool runs of one message; ``None`` means the setting.
        bare_commands: Whether ``name args`` (without ``/``) runs a command when the
            arguments fit (see :mod:`core.framework.commands`).
        params: Extra Chat Completions parameters passed through as they are.
        cache_answers: Traffic control: ``False`` turns the response cache off for this bot.
        no_cache_channels: Channels whose answers are never cached or served from cache.
        limits: Overrides of the limit settings by name (``user_requests_per_window``,
            ``user_tokens_per_day``, ``tenant_requests_per_window``,
            ``tenant_tokens_per_day``, ``user_window_s``); ``None`` as a value lifts it.
        merge_burst_s: When > 0, messages one user sends within this many seconds of
            each other in a conversation are answered as one turn.
        vision: Whether the model reads images (attached images become image parts);
            ``None`` means the ``SLUICE_VISION`` setting.
    """

    name: str = "assistant"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    model: str | None = None
    fallback_model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    context_turns: int | None = None
    # --- Framework: prompts, lanes, tools, commands ---
    system_prompts: dict[str, str] = field(default_factory=dict)
    lanes: list[LaneRule] = field(default_factory=list)
    tool_max_steps: int | None = None
    tool_timeout_s: float | None = None
    bare_commands: bool = True
    _commands: dict[str, Command] = field(default_factory=dict, init=False, repr=False)
    _tools: dict[str, Tool] = field(default_factory=dict, init=False, repr=False)
    _mcp: list[McpServer] = field(default_factory=list, init=False, repr=False)
    _mcp_tools: dict[str, Tool] = field(default_factory=dict, init=False, repr=False)
    _before: list[Hook] = field(default_factory=list, init=False, repr=False)
    _after: list[Hook] = field(default_factory=list, init=False, repr=False)
    _prompt_fns: list[PromptFunc] = field(default_factory=list, init=False, repr=False)
    _lane_fns: list[LaneFunc] = field(default_factory=list, init=False, repr=False)
    _help: Command | None = field(default=None, init=False, repr=False)
    # --- end Framework ---
    params: dict[str, Any] = field(default_factory=dict)
    # --- Traffic control ---
    cache_answers: bool = True
    no_cache_channels: frozenset[str] = frozenset()
    limits: dict[str, int | None] = field(default_factory=dict)
    merge_burst_s: float = 0.0
    # --- Files users attach ---
    vision: bool | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise BotDefinitionError("Bot(name=...) must not be empty: give your bot a name.")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise BotDefinitionError(
                f"Bot {self.name!r}: temperature={self.temperature} is outside 0..2."
            )
        self._check_framework_fields()

    def _check_framework_fields(self) -> None:
        for key in self.system_prompts:
            if not _PROMPT_KEY_RE.match(key):
                raise BotDefinitionError(
                    f"Bot {self.name!r}: system_prompts key {key!r} is not understood; use "
                    '"channel:<id>", "tenant:<id>", "dm" or "platform:<slack|discord|web>".'
                )
        for rule in self.lanes:
            if not isinstance(rule, LaneRule):
                raise BotDefinitionError(
                    f"Bot {self.name!r}: lanes must hold LaneRule(...) objects, "
                    f"not {type(rule).__name__}."
                )
        if self.tool_max_steps is not None and self.tool_max_steps < 0:
            raise BotDefinitionError(f"Bot {self.name!r}: tool_max_steps must be 0 or more.")
        if self.tool_timeout_s is not None and self.tool_timeout_s <= 0:
            raise BotDefinitionError(f"Bot {self.name!r}: tool_timeout_s must be above 0.")

    # --- registration -------------------------------------------------------------

    def command(self, name: str | None = None, *, help: str | None = None) -> Callable[[C], C]:
        """Register a command: ``@bot.command("weather", help="Forecast for a city.")``.

        The function is ``async``, its arguments typed; a ``MessageContext`` argument
        receives the context. It returns the answer text (or a ``Reply``). See
        :mod:`core.framework.commands` for when a message runs a command.

        Raises:
            BotDefinitionError: two commands with one name, or a malformed function.
        """

        def register(fn: C) -> C:
            cmd_name = name or getattr(fn, "__name__", "").replace("_", "-")
            if cmd_name in self._commands:
                other = getattr(self._commands[cmd_name].fn, "__name__", "?")
                raise BotDefinitionError(
                    f"Bot {self.name!r}: two commands are named {cmd_name!r} "
                    f"({other}() and {getattr(fn, '__name__', '?')}()). "
                    'Give one of them another name: @bot.command("other-name").'
                )
            self._commands[cmd_name] = make_command(fn, cmd_name, help)
            return fn

        return register

    @overload
    def tool(self, fn: T, /) -> T: ...

    @overload
    def tool(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float | None = None,
    ) -> Callable[[T], T]: ...

    def tool(
        self,
        fn: ToolFunc | None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Offer a typed async function to the model: ``@bot.tool`` or ``@bot.tool(name=...)``.

        The schema comes from the type hints, the descriptions from the docstring (see
        :mod:`core.framework.tools`).

        Raises:
            BotDefinitionError: two tools with one name, or a malformed function.
        """

        def register(f: ToolFunc) -> ToolFunc:
            t = make_tool(f, name=name, description=description, timeout_s=timeout_s)
            if t.name in self._tools:
                raise BotDefinitionError(
                    f"Bot {self.name!r}: two tools are named {t.name!r}. "
                    'Rename one, or pass @bot.tool(name="other_name").'
                )
            self._tools[t.name] = t
            return f

        return register(fn) if fn is not None else register

    def mcp(
        self,
        name: str,
        *,
        command: Sequence[str] | None = None,
        url: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 20.0,
    ) -> McpServer:
        """Offer an MCP server's tools to the model, as ``<name>_<tool>``.

        Give ``command`` (a server speaking MCP over stdio, started by each worker) or
        ``url`` (a streamable HTTP server). Workers connect at start-up and stop with
        an error that names the server if it does not start within
        ``connect_timeout_s``; each call is bounded by ``timeout_s``; a server that
        breaks later only makes its own tools fail (see :mod:`core.framework.mcp`). Needs the
        ``mcp`` package: ``pip install 'sluice[mcp]'``.

        Raises:
            BotDefinitionError: a bad name, both or neither of ``command`` and ``url``,
                or a second server with the same name.
        """
        if any(s.name == name for s in self._mcp):
            raise BotDefinitionError(f"Bot {self.name!r}: two MCP servers are named {name!r}.")
        server = McpServer(
            name,
            command=command,
            url=url,
            env=env,
            call_timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
        )
        self._mcp.append(server)
        return server

    async def start_mcp(self) -> None:
        """Connect the MCP servers and offer their tools (workers call this at start-up).

        Raises:
            ConfigError: a server did not start, or a tool name is taken.
        """
        if self._mcp:
            tools = await connect_servers(self._mcp, set(self._tools))
            self._mcp_tools = {t.name: t for t in tools}

    async def stop_mcp(self) -> None:
        """Close the MCP servers' connections (workers call this at shutdown)."""
        await close_servers(self._mcp)
        self._mcp_tools = {}

    def before(self, fn: B) -> B:
        """Register a hook run before the answer (see :mod:`core.framework.hooks`)."""
        self._before.append(make_hook(fn, "before"))
        return fn

    @property
    def has_before_hooks(self) -> bool:
        """Whether before-hooks may rewrite or answer a message (the cache at the door
        then leaves the message to its reply job, so hooks run once)."""
        return bool(self._before)

    def after(self, fn: A) -> A:
        """Register a hook run on each answer before it is sent (:mod:`core.framework.hooks`)."""
        self._after.append(make_hook(fn, "after"))
        return fn

    def prompt(self, fn: F) -> F:
        """Register a function ``(ctx) -> str | None`` choosing the system prompt.

        It may be sync or async. ``None`` falls back to ``system_prompts`` and
        ``system_prompt``; so does a function that raises (the error is logged).
        """
        if len(inspect.signature(fn).parameters) != 1:
            raise BotDefinitionError(
                f"@bot.prompt {getattr(fn, '__name__', fn)!r} must take one argument: "
                "`def prompt(ctx: MessageContext) -> str | None`."
            )
        self._prompt_fns.append(fn)
        return fn

    def lane(self, fn: F) -> F:
        """Register a function ``(ctx) -> "high" | "default" | "bulk" | None`` choosing the lane.

        Asked before the ``lanes`` rules; ``None`` passes to the next.
        """
        if inspect.iscoroutinefunction(fn):
            raise BotDefinitionError(
                f"@bot.lane {getattr(fn, '__name__', fn)!r} must be a plain (not async) "
                "function: adapters call it while acknowledging the platform."
            )
        self._lane_fns.append(fn)
        return fn

    # --- what adapters and workers use -----------------------------------------------

    @property
    def tools(self) -> dict[str, Tool]:
        """The registered tools by name, the connected MCP servers' included."""
        return {**self._tools, **self._mcp_tools}

    @property
    def commands(self) -> dict[str, Command]:
        """The commands by name, ``help`` included (built in unless you define one)."""
        cmds = dict(self._commands)
        for name, builtin in _ADMIN_COMMANDS.items():
            cmds.setdefault(name, builtin)
        if "help" not in cmds:
            if self._help is None:
                self._help = make_command(self._builtin_help, "help", "List the commands.")
            cmds["help"] = self._help
        return cmds

    async def _builtin_help(self, ctx: MessageContext) -> str:
        offered = [
            c for c in self.commands.values() if c.platforms is None or ctx.platform in c.platforms
        ]
        return help_text(offered)

    def command_specs(self, platform: str | None = None) -> list[CommandSpec]:
        """Every command (``help`` included) in a platform-neutral form for registration;
        with ``platform``, only those offered there (``/listen`` is Discord's)."""
        return [
            c.spec()
            for c in self.commands.values()
            if platform is None or c.platforms is None or platform in c.platforms
        ]

    def lane_for(self, msg: IncomingMessage) -> str:
        """The lane to enqueue ``msg`` in: ``@bot.lane`` functions, then ``lanes`` rules."""
        if self._lane_fns:
            ctx = MessageContext.from_message(msg)
            for fn in self._lane_fns:
                try:
                    chosen = fn(ctx)
                except Exception:  # the bot author's code: keep the message moving
                    logger.exception("lane function %s raised; ignoring it", fn)
                    continue
                if chosen is not None:
                    try:
                        return check_lane(chosen, f"@bot.lane {getattr(fn, '__name__', fn)}")
                    except BotDefinitionError as e:
                        logger.error("%s", e)
        for rule in self.lanes:
            if rule.matches(msg):
                return rule.lane
        return msg.lane

    async def system_prompt_for(self, ctx: MessageContext) -> str:
        """The system prompt for this message (``@bot.prompt``, ``system_prompts``, default)."""
        for fn in self._prompt_fns:
            try:
                value = fn(ctx)
                if inspect.isawaitable(value):
                    value = await value
            except Exception:  # the bot author's code: the static prompt still works
                logger.exception(
                    "prompt function %s raised message=%s; using the static prompt",
                    getattr(fn, "__name__", fn),
                    ctx.message_id,
                )
                continue
            if isinstance(value, str):
                return value
        for key in (
            f"channel:{ctx.channel}",
            f"tenant:{ctx.tenant}",
            "dm" if ctx.is_dm else "",
            f"platform:{ctx.platform}",
        ):
            if key in self.system_prompts:
                return self.system_prompts[key]
        return self.system_prompt

    async def intercept(self, ctx: MessageContext, command: str | None = None) -> Reply | None:
        """Before-hooks, then commands: a ``Reply`` when the model is not needed.

        The worker calls the two halves separately (:meth:`run_before_hooks` first, so
        that only rewritten text is ever recorded); this runs both, for tests and
        other callers.
        """
        early = await self.run_before_hooks(ctx)
        if early is not None:
            return early
        return await self.run_command(ctx, command)

    async def run_before_hooks(self, ctx: MessageContext) -> Reply | None:
        """The before-hooks on ``ctx.text`` (which they may rewrite); a ``Reply`` stops."""
        return await run_before(self._before, ctx)

    async def run_command(self, ctx: MessageContext, command: str | None = None) -> Reply | None:
        """Run the command ``ctx.text`` invokes, if any, and the after-hooks on its answer.

        ``command`` is the name an adapter passed (``meta["command"]``); then
        ``ctx.text`` holds only its arguments. ``None`` means: not a command.
        """
        commands = self.commands
        if command and command.lower() in commands:
            found: tuple[str, str, bool] | None = (command.lower(), ctx.text, True)
        else:
            found = split_invocation(ctx.text, set(commands), self.bare_commands)
        if found is None:
            return None
        name, args, explicit = found
        cmd = commands[name]
        if cmd.explicit_only and not explicit:
            return None
        try:
            cmd.parse(args)
        except CommandUsageError as e:
            if not explicit:
                return None  # "help me with…": not a command; the model answers
            problem = str(e)
            problem = problem[:1].upper() + problem[1:]
            return Reply(text=f"{problem}. Usage: `{cmd.usage}`", kind="notice")
        ctx.command = name
        try:
            result = await cmd.run(ctx, args)
        except Exception:  # the bot author's code: log it, apologise briefly
            logger.exception("command %s raised message=%s", name, ctx.message_id)
            return Reply(text=COMMAND_APOLOGY, kind="error")
        reply = result if isinstance(result, Reply) else Reply(text=str(result))
        return await run_after(self._after, ctx, reply)

    async def finish(self, ctx: MessageContext, reply: Reply) -> Reply:
        """The after-hooks on an answer of the model."""
        return await run_after(self._after, ctx, reply)


DEFAULT_BOT = Bot()


def load_bot(path: str | None) -> Bot:
    """Load the bot named by an import path ``module:attribute``.

    The attribute may be a :class:`Bot` or a function without arguments returning
    one. ``None`` or an empty path gives :data:`DEFAULT_BOT`. The module is imported
    with the current folder on ``sys.path``.

    Raises:
        BotDefinitionError: the path is malformed, the module or attribute is
            missing, importing the module failed, or it is not a bot; the message
            names the fix.
    """
    if not path:
        return DEFAULT_BOT
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise BotDefinitionError(
            f"SLUICE_APP={path!r} is not an import path: write it as 'module:attribute', "
            "for example SLUICE_APP=mybot:bot."
        )
    # Like uvicorn: the bot's module is found relative to the current folder, also when
    # Sluice runs as a console script (whose own folder is first on sys.path).
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise BotDefinitionError(
                f"SLUICE_APP={path!r}: module {module_name!r} imports {e.name!r}, which is not "
                f"installed. Install it (pip install ...) in the environment that runs Sluice."
            ) from e
        raise BotDefinitionError(
            f"SLUICE_APP={path!r}: cannot import module {module_name!r} ({e}). Run Sluice "
            "from the folder that holds it, or install it, so that Python can import it."
        ) from e
    except BotDefinitionError as e:
        raise BotDefinitionError(f"SLUICE_APP={path!r}: {e}") from e
    except Exception as e:
        raise BotDefinitionError(
            f"SLUICE_APP={path!r}: importing {module_name!r} failed with "
            f"{type(e).__name__}: {e}. Fix that error in your bot module."
        ) from e
    try:
        obj = getattr(module, attr)
    except AttributeError as e:
        raise BotDefinitionError(
            f"SLUICE_APP={path!r}: module {module_name!r} has no attribute {attr!r}. "
            "Define it there, e.g. `bot = Bot(...)`."
        ) from e
    if callable(obj) and not isinstance(obj, Bot):
        obj = obj()
    if not isinstance(obj, Bot):
        raise BotDefinitionError(
            f"SLUICE_APP={path!r} names a {type(obj).__name__}, not a core.framework.bot.Bot: "
            "point it at a Bot instance or a function returning one."
        )
    return obj

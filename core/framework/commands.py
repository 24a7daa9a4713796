"""Commands: typed functions a user runs by name, answered without the model.

``@bot.command`` registers one::

    @bot.command("weather", help="Weather forecast for a city.")
    async def weather(ctx: MessageContext, city: str, days: int = 1) -> str:
        return f"{city}: sunny for {days} day(s)"

**When a message is a command.** After the adapter strips the bot's mention, a
message runs a command when

1. the adapter says so: ``IncomingMessage.meta["command"]`` names a registered
   command (Slack slash commands, Discord application commands) and ``text`` holds
   only the arguments; or
2. the text starts with ``/name`` (any case) followed by a space or the end; or
3. the text starts with the bare ``name`` (``Bot(bare_commands=True)``, the default)
   *and* the rest parses as the command's arguments. ``weather Paris 2`` runs the
   command; ``help me write an email`` does not (``help`` takes no arguments), so the
   model answers it.

Arguments are split like a shell (``/weather "New York" 2``); a last parameter of
type ``str`` takes the rest of the text as it is (``/ask what is a sluice?``). Values
are converted to the annotated type (``str``, ``int``, ``float``, ``bool``,
``Literal[...]``, an ``Enum``, ``X | None``). A wrong explicit invocation (``/weather``
without a city) gets a short usage notice; it never reaches the model.

:meth:`core.framework.bot.Bot.command_specs` lists the commands in a platform-neutral form for
adapters that register them with Slack or Discord.
"""

from __future__ import annotations

import enum
import inspect
import io
import re
import shlex
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from core.errors import BotDefinitionError
from core.framework.context import MessageContext
from core.framework.tools import parse_docstring, resolve_hints
from core.messages import Reply

CommandFunc = Callable[..., Awaitable["str | Reply"]]
COMMAND_NAME_RE = re.compile(r"^[a-z0-9_-]{1,32}$")
MAX_DESCRIPTION = 100  # Discord's limit for command and option descriptions

_TYPE_NAMES: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_TRUE = {"true", "yes", "y", "on", "1"}
_FALSE = {"false", "no", "n", "off", "0"}


class CommandUsageError(ValueError):
    """The text does not fit the command's arguments; ``str(err)`` is shown to the user."""


@dataclass(frozen=True)
class CommandParamSpec:
    """One argument of a command, platform-neutral.

    Attributes:
        name: The argument's name.
        type: ``"string"``, ``"integer"``, ``"number"`` or ``"boolean"``.
        required: Whether the user must give it.
        description: From the function's docstring (``Args:``), else the name.
        choices: The allowed values (``Literal`` or ``Enum``), or ``None``.
        default: The default when not required.
    """

    name: str
    type: str
    required: bool
    description: str
    choices: list[str | int | float] | None = None
    default: Any = None


@dataclass(frozen=True)
class CommandSpec:
    """A command as adapters register it (Slack slash command, Discord application command).

    Attributes:
        name: Lowercase name without the slash.
        description: The help text (at most 100 characters).
        usage: One line such as ``/weather <city> [days]``.
        params: The arguments in order.
    """

    name: str
    description: str
    usage: str
    params: list[CommandParamSpec]

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for JSON or a platform's registration payload)."""
        return {
            "name": self.name,
            "description": self.description,
            "usage": self.usage,
            "params": [p.__dict__.copy() for p in self.params],
        }


@dataclass(frozen=True)
class _Param:
    name: str
    annotation: Any
    base: Any  # the annotation without `| None`
    required: bool
    default: Any
    description: str


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
        return None
    return annotation


def _type_of(base: Any) -> tuple[str, list[Any] | None] | None:
    """``(type name, choices)`` of a supported argument type, else ``None``."""
    if base in _TYPE_NAMES:
        return _TYPE_NAMES[base], None
    if get_origin(base) is Literal:
        values = list(get_args(base))
        names = {_TYPE_NAMES.get(type(v)) for v in values}
        if len(names) == 1 and None not in names:
            return names.pop() or "string", values
        return None
    if isinstance(base, type) and issubclass(base, enum.Enum):
        values = [m.value for m in base]
        names = {_TYPE_NAMES.get(type(v)) for v in values}
        if len(names) == 1 and None not in names:
            return names.pop() or "string", values
    return None


def _convert(p: _Param, raw: str) -> Any:
    base = p.base
    if base is str:
        return raw
    if base is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise CommandUsageError(f"{p.name} must be yes or no, not {raw!r}")
    if base is int:
        try:
            return int(raw)
        except ValueError:
            raise CommandUsageError(f"{p.name} must be a whole number, not {raw!r}") from None
    if base is float:
        try:
            return float(raw)
        except ValueError:
            raise CommandUsageError(f"{p.name} must be a number, not {raw!r}") from None
    type_choices = _type_of(base)
    assert type_choices is not None and type_choices[1] is not None
    for choice in type_choices[1]:
        if str(choice).lower() == raw.lower():
            return base(choice) if isinstance(base, type) else choice
    allowed = ", ".join(str(c) for c in type_choices[1])
    raise CommandUsageError(f"{p.name} must be one of {allowed}, not {raw!r}")


@dataclass
class Command:
    """A registered command: its function, arguments and help text."""

    name: str
    help: str
    fn: CommandFunc
    params: list[_Param] = field(default_factory=list)
    context_param: str | None = None
    explicit_only: bool = False  # run only as ``/name`` (the built-in admin commands)
    platforms: frozenset[str] | None = None  # where it is offered (``None``: everywhere)

    @property
    def usage(self) -> str:
        """``/name <required> [optional]``."""
        parts = [f"/{self.name}"]
        for p in self.params:
            parts.append(f"<{p.name}>" if p.required else f"[{p.name}]")
        return " ".join(parts)

    def spec(self) -> CommandSpec:
        """The platform-neutral description adapters register."""
        params = []
        for p in self.params:
            kind, choices = _type_of(p.base) or ("string", None)
            default = p.default.value if isinstance(p.default, enum.Enum) else p.default
            params.append(
                CommandParamSpec(
                    p.name, kind, p.required, p.description or p.name, choices, default
                )
            )
        return CommandSpec(self.name, self.help, self.usage, params)

    def parse(self, text: str) -> dict[str, Any]:
        """Arguments from the text after the command name.

        Raises:
            CommandUsageError: missing, extra or badly typed arguments, or unbalanced quotes.
        """
        stream = io.StringIO(text)
        lexer = shlex.shlex(stream, posix=True)
        lexer.whitespace_split = True
        lexer.commenters = ""
        values: dict[str, Any] = {}
        n = len(self.params)
        try:
            for i, p in enumerate(self.params):
                if i == n - 1 and p.base is str:
                    # The last text argument takes the rest, as typed.
                    rest = (stream.read() or "").strip()
                    if len(rest) >= 2 and rest[0] == rest[-1] and rest[0] in "\"'":
                        rest = rest[1:-1]
                    if rest:
                        values[p.name] = rest
                    break
                token = lexer.get_token()
                if token is None or token == lexer.eof:
                    break
                values[p.name] = _convert(p, token)
            extra = lexer.get_token() if len(values) == n or not self.params else None
        except CommandUsageError:
            raise
        except ValueError as e:  # shlex: "No closing quotation"
            raise CommandUsageError(f"cannot read the arguments: {e}") from None
        if extra is not None and extra != lexer.eof:
            raise CommandUsageError(f"unexpected text: {extra!r}")
        for p in self.params:
            if p.name not in values:
                if p.required:
                    raise CommandUsageError(f"missing {p.name}")
                values[p.name] = p.default
        return values

    async def run(self, ctx: MessageContext, text: str) -> str | Reply:
        """Parse the arguments and call the function (its exceptions propagate)."""
        kwargs = self.parse(text)
        if self.context_param:
            kwargs[self.context_param] = ctx
        return await self.fn(**kwargs)


def _read_params(
    fn: CommandFunc, where: str, param_docs: dict[str, str]
) -> tuple[list[_Param], str | None]:
    hints = resolve_hints(fn, where)
    params: list[_Param] = []
    context_param = None
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise BotDefinitionError(f"{where}: *args/**kwargs are not supported; name each one.")
        if p.name not in hints:
            fix = f"{p.name}: MessageContext" if p.name in ("ctx", "context") else f"{p.name}: str"
            raise BotDefinitionError(
                f"{where}: argument {p.name!r} has no type annotation, so Sluice cannot parse "
                f"it from the text. Annotate it, e.g. `{fix}`."
            )
        annotation = hints[p.name]
        if annotation is MessageContext:
            context_param = p.name
            continue
        base = _strip_optional(annotation)
        if base is None or _type_of(base) is None:
            raise BotDefinitionError(
                f"{where}: argument {p.name!r} has type {annotation!r}; commands take str, "
                "int, float, bool, Literal[...], an Enum, or one of these | None."
            )
        required = p.default is inspect.Parameter.empty
        params.append(
            _Param(
                p.name,
                annotation,
                base,
                required,
                None if required else p.default,
                param_docs.get(p.name, "")[:MAX_DESCRIPTION],
            )
        )
    return params, context_param


def make_command(fn: CommandFunc, name: str, help: str | None) -> Command:
    """Build a :class:`Command` from a typed async function.

    Raises:
        BotDefinitionError: a bad name, no help text, a sync function, an untyped or
            unsupported argument.
    """
    fname = getattr(fn, "__name__", repr(fn))
    where = f"@bot.command({name!r}) on {fname}()"
    if not COMMAND_NAME_RE.match(name):
        raise BotDefinitionError(
            f"{where}: command names must be 1-32 lowercase letters, digits, '-' or '_' "
            f"(Slack and Discord both accept those), e.g. @bot.command({name.lower()[:32]!r})."
        )
    if not inspect.iscoroutinefunction(fn):
        raise BotDefinitionError(f"{where} is not async: define it with `async def {fname}(...)`.")
    summary, param_docs = parse_docstring(fn.__doc__)
    text = (help or summary.split("\n")[0]).strip()
    if not text:
        raise BotDefinitionError(
            f'{where} has no help text: pass help="What it does." or give it a docstring; '
            "`help` and Discord show it."
        )
    if len(text) > MAX_DESCRIPTION:
        raise BotDefinitionError(
            f"{where}: the help text has {len(text)} characters; Discord allows "
            f"{MAX_DESCRIPTION}. Shorten it (put details in the docstring)."
        )
    params, context_param = _read_params(fn, where, param_docs)
    seen_optional = False
    for prm in params:
        if not prm.required:
            seen_optional = True
        elif seen_optional:
            raise BotDefinitionError(
                f"{where}: required argument {prm.name!r} follows an optional one; "
                "put required arguments first."
            )
    return Command(name, text, fn, params, context_param)


def split_invocation(text: str, names: set[str], bare: bool) -> tuple[str, str, bool] | None:
    """``(name, arguments text, explicit)`` when ``text`` starts with a command name.

    ``explicit`` is true for ``/name``; a bare ``name`` counts only when ``bare`` is true.
    """
    m = re.match(r"^(/?)([A-Za-z0-9_-]{1,32})(?:\s+|$)", text)
    if not m:
        return None
    slash, word = m.group(1), m.group(2).lower()
    if word not in names or (not slash and not bare):
        return None
    return word, text[m.end() :], bool(slash)


def help_text(commands: list[Command]) -> str:
    """What the built-in ``help`` command answers."""
    lines = ["Commands:"]
    for c in commands:
        lines.append(f"• `{c.usage}`: {c.help}")
    lines.append("Anything else is answered by the assistant.")
    return "\n".join(lines)

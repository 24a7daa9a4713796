"""Tools: typed async functions the model may call (OpenAI function calling).

``@bot.tool`` turns a function into a :class:`Tool`. The JSON schema comes from the
type hints, the descriptions from the docstring (Google ``Args:`` or ``:param x:``
style)::

    @bot.tool
    async def lookup(ctx: MessageContext, topic: str, limit: int = 3) -> str:
        \"\"\"Look up a topic in the FAQ.

        Args:
            topic: A few words naming what the user asks about.
            limit: How many entries to return.
        \"\"\"

Supported parameter types: ``str``, ``int``, ``float``, ``bool``, ``Literal[...]``,
``Enum`` subclasses, ``list[X]``, ``dict[str, X]``, ``X | None``, and unions of these.
A parameter annotated :class:`~core.framework.context.MessageContext` receives the message's
context and is not shown to the model. Mistakes (no annotation, an unsupported type,
a sync function, no docstring) raise :class:`~core.errors.BotDefinitionError` when the
bot module is imported, naming the function and the fix.

At run time arguments are validated with pydantic; a bad argument, an exception or a
timeout becomes an *error result* the model reads (``{"error": ...}``), never a
traceback shown to the user. When the tool itself raises, the model reads only
``{"error": "the tool NAME failed (error id ...)"}``: an exception's text can hold a
DSN, an internal host name or a key, and the model may quote it to the user. The
exception, its traceback and the same error id go to the log, masked
(:mod:`core.infra.logs`).
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import logging
import re
import time
import types
import typing
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from core.errors import BotDefinitionError
from core.framework.context import MessageContext

logger = logging.getLogger(__name__)

ToolFunc = Callable[..., Awaitable[Any]]
TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_SCALARS: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


class UnsupportedType(TypeError):
    """An annotation that has no JSON schema here."""


def json_schema(annotation: Any) -> dict[str, Any]:
    """The JSON schema of a parameter type (see the module docstring for what is supported).

    Raises:
        UnsupportedType: the type cannot be described to the model.
    """
    if annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}
    origin = get_origin(annotation)
    if origin is Literal:
        values = list(get_args(annotation))
        kinds = {_SCALARS.get(type(v)) for v in values}
        if None in kinds or len(kinds) != 1:
            raise UnsupportedType("Literal values must all be str, all int, or all float")
        return {"type": kinds.pop(), "enum": values}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = [m.value for m in annotation]
        kinds = {_SCALARS.get(type(v)) for v in values}
        if None in kinds or len(kinds) != 1:
            raise UnsupportedType(f"enum {annotation.__name__} must have str or int values")
        return {"type": kinds.pop(), "enum": values}
    if annotation is list or origin is list:
        args = get_args(annotation)
        items = json_schema(args[0]) if args else {}
        return {"type": "array", "items": items}
    if annotation is dict or origin is dict:
        args = get_args(annotation)
        if args and args[0] is not str:
            raise UnsupportedType("dict keys must be str")
        value_schema = json_schema(args[1]) if args else {}
        return {"type": "object", "additionalProperties": value_schema}
    if origin is Union or origin is types.UnionType:
        members = [a for a in get_args(annotation) if a is not type(None)]
        schemas = [json_schema(a) for a in members]
        if type(None) in get_args(annotation):
            schemas.append({"type": "null"})
        return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    raise UnsupportedType(f"{annotation!r} is not supported")


def resolve_hints(fn: Callable[..., Any], where: str) -> dict[str, Any]:
    """``fn``'s type hints, or a :class:`BotDefinitionError` that says how to fix them."""
    try:
        return typing.get_type_hints(fn)
    except Exception as e:  # a NameError from a forward reference, usually
        raise BotDefinitionError(
            f"{where}: cannot resolve its type hints ({type(e).__name__}: {e}). "
            "Import every type used in the annotations at module level."
        ) from e


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """``(description, {param: description})`` from a Google- or Sphinx-style docstring."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    summary: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    arg_indent: int | None = None
    for line in lines:
        stripped = line.strip()
        sphinx = re.match(r"^:param\s+(?:[^:]*\s)?(\w+):\s*(.*)$", stripped)
        if sphinx:
            current = sphinx.group(1)
            params[current] = sphinx.group(2).strip()
            section = "sphinx"
            continue
        if re.match(r"^(Args|Arguments|Parameters|Params):\s*$", stripped):
            section, current, arg_indent = "args", None, None
            continue
        if re.match(r"^[A-Z][A-Za-z ]*:\s*$", stripped) and not line.startswith(" "):
            section, current = "other", None
            continue
        if section == "args":
            indent = len(line) - len(line.lstrip())
            m = re.match(r"^(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", stripped)
            if m and (arg_indent is None or indent <= arg_indent):
                arg_indent = indent
                current = m.group(1)
                params[current] = m.group(2).strip()
            elif current and stripped:
                params[current] = f"{params[current]} {stripped}".strip()
            continue
        if section == "sphinx":
            if current and stripped and not stripped.startswith(":"):
                params[current] = f"{params[current]} {stripped}".strip()
            continue
        if section is None:
            summary.append(stripped)
    description = "\n".join(summary).strip()
    # Paragraphs keep their breaks; lines within one paragraph are joined.
    description = re.sub(r"(?<!\n)\n(?!\n)", " ", description)
    return description, params


@dataclass(frozen=True)
class ToolParam:
    """One parameter the model fills in."""

    name: str
    annotation: Any
    schema: dict[str, Any]
    required: bool
    default: Any = None
    description: str = ""


@dataclass
class Tool:
    """A function the model can call, with its OpenAI schema.

    Attributes:
        name: The function name the model uses.
        description: What the tool does (from the docstring's first paragraph).
        fn: The async function.
        params: The parameters the model fills in, in order.
        context_param: The name of the parameter that receives the
            :class:`~core.framework.context.MessageContext`, if any.
        timeout_s: Longest run of one call; ``None`` means ``SLUICE_TOOL_CALL_TIMEOUT_S``.
    """

    name: str
    description: str
    fn: ToolFunc
    params: list[ToolParam]
    context_param: str | None = None
    timeout_s: float | None = None
    _model: type[BaseModel] | None = field(default=None, repr=False)

    def openai_schema(self) -> dict[str, Any]:
        """The tool as the ``tools`` entry of a Chat Completions request."""
        properties: dict[str, Any] = {}
        for p in self.params:
            prop = dict(p.schema)
            if p.description:
                prop["description"] = p.description
            if not p.required and p.default is not None:
                prop["default"] = p.default.value if isinstance(p.default, enum.Enum) else p.default
            properties[p.name] = prop
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {
                    "type": "object",
                    "properties": properties,
                    "required": [p.name for p in self.params if p.required],
                    "additionalProperties": False,
                },
            },
        }

    def parse_arguments(self, raw: str) -> dict[str, Any]:
        """Validate the model's JSON arguments into Python values.

        Raises:
            ToolArgumentError: not a JSON object, a missing or extra argument, a bad value.
        """
        try:
            data = json.loads(raw or "{}")
        except json.JSONDecodeError as e:
            raise ToolArgumentError(f"arguments are not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ToolArgumentError("arguments must be a JSON object")
        assert self._model is not None
        try:
            model = self._model.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in err['loc']) or 'arguments'}: {err['msg']}"
                for err in e.errors()
            )
            raise ToolArgumentError(f"invalid arguments: {problems}") from e
        return {p.name: getattr(model, p.name) for p in self.params}

    async def invoke(self, ctx: MessageContext, raw_arguments: str) -> Any:
        """Call the function with validated arguments (exceptions propagate)."""
        return await self.call(ctx, self.parse_arguments(raw_arguments))

    async def call(self, ctx: MessageContext, arguments: dict[str, Any]) -> Any:
        """Call the function with arguments already validated by :meth:`parse_arguments`."""
        kwargs = dict(arguments)
        if self.context_param:
            kwargs[self.context_param] = ctx
        return await self.fn(**kwargs)


class ToolArgumentError(ValueError):
    """The model called a tool with arguments that do not fit its signature."""


def format_result(value: Any) -> str:
    """A tool's return value as the text of a ``tool`` message."""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return json.dumps(value, default=str, ensure_ascii=False)


def make_tool(
    fn: ToolFunc,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = None,
) -> Tool:
    """Build a :class:`Tool` from a typed async function.

    Raises:
        BotDefinitionError: the function is not async, has an untyped or unsupported
            parameter, no docstring (and no ``description=``), or a bad name.
    """
    fname = getattr(fn, "__name__", repr(fn))
    tool_name = name or fname
    where = f"@bot.tool {fname}()"
    if not TOOL_NAME_RE.match(tool_name):
        raise BotDefinitionError(
            f"{where}: the tool name {tool_name!r} must be 1-64 letters, digits, '_' or '-'. "
            "Pass name='...' to choose another."
        )
    if not inspect.iscoroutinefunction(fn):
        raise BotDefinitionError(
            f"{where} is not async: define it with `async def {fname}(...)` "
            "(run blocking work with `await asyncio.to_thread(...)` inside it)."
        )
    summary, param_docs = parse_docstring(fn.__doc__)
    description = description or summary
    if not description:
        raise BotDefinitionError(
            f"{where} has no docstring: the model chooses tools by their description. "
            'Add one, e.g. """Look up an answer in the FAQ.""", or pass description="...".'
        )
    hints = resolve_hints(fn, where)
    params: list[ToolParam] = []
    context_param: str | None = None
    fields: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise BotDefinitionError(
                f"{where}: *args/**kwargs cannot be described to the model; "
                "list each argument with a type instead."
            )
        if p.name not in hints:
            fix = (
                f"`{p.name}: MessageContext`"
                if p.name in ("ctx", "context")
                else f"`{p.name}: str` (or int, float, bool, Literal[...], list[str], ...)"
            )
            raise BotDefinitionError(
                f"{where}: argument {p.name!r} has no type annotation, so Sluice cannot tell "
                f"the model what to pass. Annotate it, e.g. {fix}."
            )
        annotation = hints[p.name]
        if annotation is MessageContext:
            context_param = p.name
            continue
        try:
            schema = json_schema(annotation)
        except UnsupportedType as e:
            raise BotDefinitionError(
                f"{where}: argument {p.name!r} has type {annotation!r}, which cannot be "
                f"described to the model ({e}). Use str, int, float, bool, Literal[...], an "
                "Enum, list[...], dict[str, ...] or X | None."
            ) from e
        required = p.default is inspect.Parameter.empty
        default = None if required else p.default
        params.append(
            ToolParam(p.name, annotation, schema, required, default, param_docs.get(p.name, ""))
        )
        fields[p.name] = (annotation, ... if required else default)
    model = create_model(f"{tool_name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
    return Tool(tool_name, description, fn, params, context_param, timeout_s, model)


async def run_tool_call(
    tools: dict[str, Tool],
    ctx: MessageContext,
    call: dict[str, Any],
    timeout_s: float,
    max_chars: int,
) -> tuple[str, bool]:
    """Run one tool call of the model; ``(result text, ok)``.

    Never raises for the tool's own failures: an unknown tool, bad arguments, an
    exception or a timeout become ``{"error": "..."}`` for the model. For an
    exception the model reads only that the tool failed and an error id; the
    exception with its traceback goes to the log under the same id.
    """
    name = str(call.get("name", ""))
    tool = tools.get(name)
    if tool is None:
        known = ", ".join(sorted(tools)) or "none"
        return json.dumps({"error": f"there is no tool named {name!r} (tools: {known})"}), False
    limit = min(timeout_s, tool.timeout_s) if tool.timeout_s else timeout_s
    started = time.monotonic()
    try:
        arguments = tool.parse_arguments(str(call.get("arguments") or "{}"))
    except ToolArgumentError as e:
        # Only about the model's own arguments: it needs the detail to call again.
        logger.warning("tool %s: bad arguments message=%s: %s", name, ctx.message_id, e)
        return json.dumps({"error": f"{name}: {e}"}), False
    try:
        async with asyncio.timeout(limit):
            value = await tool.call(ctx, arguments)
    except TimeoutError:
        logger.warning("tool %s timed out after %.1fs message=%s", name, limit, ctx.message_id)
        return json.dumps({"error": f"{name} did not finish within {limit:.3g} s"}), False
    except Exception:  # the bot author's code: any failure is reported, not raised
        error_id = uuid.uuid4().hex[:12]
        logger.exception("tool %s raised message=%s error_id=%s", name, ctx.message_id, error_id)
        return json.dumps({"error": tool_failed_text(name, error_id)}), False
    text = format_result(value)
    logger.info(
        "tool %s ok in %.0fms message=%s",
        name,
        (time.monotonic() - started) * 1000,
        ctx.message_id,
    )
    if len(text) > max_chars:
        text = text[:max_chars] + f"\n[truncated: the result had {len(text):,} characters]"
    return text, True


def tool_failed_text(name: str, error_id: str) -> str:
    """What the model reads when a tool raised: no exception text, only an id to look up."""
    return (
        f"the tool {name} failed (error id {error_id}); "
        "its details are in the server log, not available here"
    )

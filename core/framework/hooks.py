"""Hooks: the bot's own code before and after the answer is made.

``@bot.before`` runs on every non-empty message before anything answers it (commands
and the model). It gets the context and the text and returns:

- ``None``: go on unchanged;
- a ``str``: the new text (e.g. personal data masked). The new text is what commands
  and the model see *and what is stored in history*;
- a :class:`~core.messages.Reply`: answer with it at once. Commands and the model are
  not run (use ``Reply(text=..., kind="notice")`` to refuse).

``@bot.after`` runs on every answer (``Reply.kind == "answer"``: the model's or a
command's; not on notices or apologies) before it is sent, and returns ``None``
(unchanged), a ``str`` (the new text, e.g. with a footer) or a ``Reply`` (e.g. a
refusal instead of the answer). Streamed text is replaced by the final text when the
answer is finished.

Hooks run in the order they were registered. **A hook that raises fails closed**: the
error is logged with the hook's name and traceback and the user gets a short apology
(``HOOK_APOLOGY``), without the model being called (before) or the answer being sent
(after). A broken moderation or redaction hook must never let a message through.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from core.errors import BotDefinitionError
from core.framework.context import MessageContext
from core.messages import Reply

logger = logging.getLogger(__name__)

BeforeHook = Callable[[MessageContext, str], Awaitable["str | Reply | None"]]
AfterHook = Callable[[MessageContext, Reply], Awaitable["str | Reply | None"]]

HOOK_APOLOGY = "Sorry, something went wrong while preparing my answer. Please try again later."


@dataclass(frozen=True)
class Hook:
    """A registered hook and where it runs."""

    name: str
    stage: Literal["before", "after"]
    fn: Callable[..., Awaitable[str | Reply | None]]


def make_hook(fn: Callable[..., Awaitable[str | Reply | None]], stage: str) -> Hook:
    """Check a hook's shape at registration.

    Raises:
        BotDefinitionError: not async, or not two positional parameters.
    """
    name = getattr(fn, "__qualname__", repr(fn))
    second = "text: str" if stage == "before" else "reply: Reply"
    shape = f"`async def {getattr(fn, '__name__', 'hook')}(ctx: MessageContext, {second})`"
    if not inspect.iscoroutinefunction(fn):
        raise BotDefinitionError(f"@bot.{stage} hook {name} is not async: define it as {shape}.")
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(params) != 2:
        raise BotDefinitionError(
            f"@bot.{stage} hook {name} takes {len(params)} argument(s); it must take two: {shape}."
        )
    return Hook(name, "before" if stage == "before" else "after", fn)


def _apology(hook: Hook, ctx: MessageContext, problem: str) -> Reply:
    logger.error(
        "hook %s (%s) failed message=%s platform=%s: %s; the user gets an apology",
        hook.name,
        hook.stage,
        ctx.message_id,
        ctx.platform,
        problem,
    )
    return Reply(text=HOOK_APOLOGY, kind="error")


async def run_before(hooks: list[Hook], ctx: MessageContext) -> Reply | None:
    """Run the before-hooks on ``ctx.text``; a ``Reply`` means: answer with it now.

    Rewrites ``ctx.text`` in place when a hook returns new text.
    """
    for hook in hooks:
        try:
            result = await hook.fn(ctx, ctx.text)
        except Exception as e:  # the bot author's code: fail closed, see the module docstring
            logger.exception("hook %s raised", hook.name)
            return _apology(hook, ctx, f"{type(e).__name__}: {e}")
        if result is None:
            continue
        if isinstance(result, Reply):
            logger.info("hook %s answered message=%s itself", hook.name, ctx.message_id)
            return result
        if isinstance(result, str):
            ctx.text = result
            continue
        return _apology(hook, ctx, f"returned {type(result).__name__}; expected str, Reply or None")
    return None


async def run_after(hooks: list[Hook], ctx: MessageContext, reply: Reply) -> Reply:
    """Run the after-hooks on an answer; returns what to send."""
    if reply.kind != "answer":
        return reply
    for hook in hooks:
        try:
            result = await hook.fn(ctx, reply)
        except Exception as e:  # the bot author's code: fail closed, see the module docstring
            logger.exception("hook %s raised", hook.name)
            return _apology(hook, ctx, f"{type(e).__name__}: {e}")
        if result is None:
            continue
        if isinstance(result, Reply):
            reply = result
        elif isinstance(result, str):
            reply = reply.model_copy(update={"text": result})
        else:
            return _apology(
                hook, ctx, f"returned {type(result).__name__}; expected str, Reply or None"
            )
        if reply.kind != "answer":
            break
    return reply

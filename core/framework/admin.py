"""The built-in admin commands: ``/model`` and ``/listen``.

Every bot has them (unless it defines commands of the same names). Only admins may
change anything: users listed in ``SLUICE_ADMIN_USERS``, and on Discord members with
the *Manage Server* permission (:attr:`MessageContext.is_admin`). Anyone may ask
what is in use. Both are run only when invoked explicitly (``/model``, not a bare
``model``), so a message that merely starts with the word goes to the model.

``/model``
    ``/model`` shows the model in use here and the allowed ones; ``/model NAME``
    chooses a model from ``SLUICE_ALLOWED_MODELS`` for this channel, ``/model NAME
    tenant`` for the whole workspace/server; ``/model default [tenant]`` goes back.
``/listen``
    ``/listen on|off`` (Discord): answer every message in this channel without a
    mention, or stop. ``/listen`` shows the state.

The choices are stored by :class:`core.traffic.choices.Choices`, which the worker
puts on the context (:attr:`MessageContext.choices`).
"""

from __future__ import annotations

from typing import Literal

from core.framework.commands import Command, make_command
from core.framework.context import MessageContext

NOT_ADMIN = "Sorry, only admins can change {what}. Ask an admin of this {place}."
NO_STORE = "This command works only when the bot runs in a Sluice worker."
NO_MODELS = (
    "Choosing the model is off: the operator has not listed any models in "
    "SLUICE_ALLOWED_MODELS. Using `{model}`."
)
DEFAULT = "default"
MAX_SHOWN_NAME = 64


def _place(ctx: MessageContext) -> str:
    return {"slack": "workspace", "discord": "server"}.get(ctx.platform, "chat")


def _shown(name: str) -> str:
    # Whatever the user typed is echoed inert: no mentions or markup, bounded length.
    cleaned = "".join(ch for ch in name if ch.isalnum() or ch in "-_.:/")
    return cleaned[:MAX_SHOWN_NAME] or "?"


async def model_command(
    ctx: MessageContext,
    name: str | None = None,
    scope: Literal["channel", "tenant"] = "channel",
) -> str:
    """Show or choose the model for this channel or the whole workspace (admins).

    Args:
        name: A model from the allowed list, or "default"; empty to show the current one.
        scope: "channel" (the default) or "tenant" (the whole workspace or server).
    """
    choices = ctx.choices
    if choices is None:
        return NO_STORE
    for_channel, for_tenant = await choices.chosen_model(ctx.platform, ctx.tenant, ctx.channel)
    current = for_channel or for_tenant or choices.default_model
    if not choices.allowed_models:
        return NO_MODELS.format(model=current)
    allowed = ", ".join(f"`{m}`" for m in choices.allowed_models)
    if name is None:
        where = (
            "chosen for this channel"
            if for_channel
            else f"chosen for this {_place(ctx)}"
            if for_tenant
            else "the default"
        )
        return f"Model here: `{current}` ({where}). Allowed: {allowed}."
    if not ctx.is_admin:
        return NOT_ADMIN.format(what="the model", place=_place(ctx))
    channel = None if scope == "tenant" else ctx.channel
    where = f"this {_place(ctx)}" if channel is None else "this channel"
    if name.lower() == DEFAULT:
        await choices.set_model(ctx.platform, ctx.tenant, channel, None)
        return f"Model for {where} reset to the default."
    if name not in choices.allowed_models:
        return f"`{_shown(name)}` is not an allowed model. Allowed: {allowed}."
    await choices.set_model(ctx.platform, ctx.tenant, channel, name)
    return f"Model for {where} is now `{name}`."


async def listen_command(ctx: MessageContext, state: Literal["on", "off"] | None = None) -> str:
    """Answer every message in this channel without a mention, or stop (admins, Discord).

    Args:
        state: "on" or "off"; empty to show the current state.
    """
    choices = ctx.choices
    if choices is None:
        return NO_STORE
    if ctx.platform != "discord" or ctx.is_dm:
        return "Listening without a mention is available in Discord server channels only."
    if state is None:
        on = await choices.listening(ctx.platform, ctx.tenant, ctx.channel)
        return (
            "I answer every message in this channel."
            if on
            else "I answer in this channel only when mentioned or replied to."
        )
    if not ctx.is_admin:
        return NOT_ADMIN.format(what="where I listen", place=_place(ctx))
    await choices.set_listening(ctx.platform, ctx.tenant, ctx.channel, state == "on")
    if state == "on":
        return (
            "I now answer every message in this channel, without a mention "
            "(the bot needs the message-content intent to read them)."
        )
    return "I now answer in this channel only when mentioned or replied to."


def admin_commands() -> dict[str, Command]:
    """The built-in admin commands by name, run only when invoked as ``/name``."""
    out = {}
    for name, fn, platforms in (
        ("model", model_command, None),
        ("listen", listen_command, frozenset({"discord"})),
    ):
        cmd = make_command(fn, name, None)
        cmd.explicit_only = True
        cmd.platforms = platforms
        out[name] = cmd
    return out

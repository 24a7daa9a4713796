"""A support bot: lane rules, personal data masked before the model sees it, commands.

- **Lanes**: DMs and messages about outages or billing go to the ``high`` lane; the
  ``#random``-style channels listed in ``BULK_CHANNELS`` to ``bulk``.
- **Redaction** (``@bot.before``): e-mail addresses and phone numbers are replaced by
  ``[email]`` / ``[phone]`` before the model, the cache or the history see the text.
- **Refusal** (``@bot.before``): questions asking for passwords are answered by the hook
  itself, without a model call.
- **Footer** (``@bot.after``): channel answers point to the ``ticket`` command.
- **Context**: in a DM the bot may discuss the person's own account; in a channel it
  is told not to (``@bot.prompt``).
- **Commands**: ``/ticket <summary>`` and ``/status``.

Run it::

    SLUICE_APP=examples.support_bot.bot:bot sluice dev
"""

from __future__ import annotations

import hashlib
import re

from sluice import Bot, LaneRule, MessageContext, Reply

BULK_CHANNELS = ["C0RANDOM"]
EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# International or local numbers: 7+ digits, optionally grouped by spaces, dots or dashes.
PHONE = re.compile(r"(?<![\w@])\+?\d[\d ().-]{5,}\d(?!\w)")
REFUSAL = (
    "I can't help with passwords. Reset yours at https://example.com/reset, "
    "or open a ticket with `/ticket <summary>`."
)
CHANNEL_PROMPT = (
    "You are the support assistant of ExampleCo in a shared channel. Be brief. Never "
    "discuss a person's account details here; ask them to send you a direct message."
)
DM_PROMPT = (
    "You are the support assistant of ExampleCo in a private conversation. You may help "
    "with the person's own account. Be warm and precise."
)

bot = Bot(
    name="support",
    system_prompt=CHANNEL_PROMPT,
    lanes=[
        LaneRule("high", dm=True),
        LaneRule("high", words=["outage", "down", "billing", "invoice", "urgent"]),
        LaneRule("bulk", channels=BULK_CHANNELS),
    ],
)


def redact(text: str) -> str:
    """``text`` with e-mail addresses and phone numbers masked."""
    return PHONE.sub("[phone]", EMAIL.sub("[email]", text))


@bot.before
async def mask_personal_data(ctx: MessageContext, text: str) -> str | None:
    """Mask e-mail addresses and phone numbers; what is stored is the masked text."""
    masked = redact(text)
    return masked if masked != text else None


@bot.before
async def refuse_passwords(ctx: MessageContext, text: str) -> Reply | None:
    """Questions about passwords get a fixed answer, never a model's."""
    if re.search(r"\bpass(word|code)s?\b", text, re.IGNORECASE):
        return Reply(text=REFUSAL, kind="notice")
    return None


@bot.after
async def ticket_footer(ctx: MessageContext, reply: Reply) -> str | None:
    """In channels, point to the ticket command under each answer."""
    if ctx.is_dm or ctx.command:
        return None
    return reply.text + "\n\n_Need a human? `/ticket <summary>`_"


@bot.prompt
def prompt_for(ctx: MessageContext) -> str:
    """A DM may discuss the person's account; a channel may not."""
    return DM_PROMPT if ctx.is_dm else CHANNEL_PROMPT


@bot.command("ticket", help="Open a support ticket.")
async def ticket(ctx: MessageContext, summary: str) -> str:
    """Open a ticket (here: a stable number from the message id).

    Args:
        summary: What is wrong, in a sentence.
    """
    number = int(hashlib.sha256(ctx.message_id.encode()).hexdigest()[:6], 16) % 100_000
    who = ctx.user_name or ctx.user
    return f"Ticket #{number} opened for {who}: {redact(summary)}"


@bot.command("status", help="Show the service status.")
async def status(ctx: MessageContext) -> str:
    """The status page, in one line."""
    return "All systems operational. Details: https://status.example.com"

"""A bot whose tool fails with secrets in its exception, as a real tool would when its
database or an upstream API refuses it: ``SLUICE_APP=tests.reliability.secret_bot:bot``.

The secrets come from the worker's environment (``TEST_ORDERS_DSN`` and
``TEST_ORDERS_API_KEY``), never from the conversation, so a test can tell a leak
from an echo of the user's own text.
"""

from __future__ import annotations

import os

from core.framework.bot import Bot

bot = Bot(name="secret-tools", system_prompt="You look up orders.")


class OrdersDatabaseError(Exception):
    """What a database driver raises: its message names the DSN it could not use."""


@bot.tool
async def order_status(order: str) -> str:
    """Look up the status of an order.

    Args:
        order: The order number.
    """
    dsn = os.environ["TEST_ORDERS_DSN"]
    key = os.environ["TEST_ORDERS_API_KEY"]
    try:
        raise ConnectionRefusedError(f"orders-api.internal refused Authorization: Bearer {key}")
    except ConnectionRefusedError as e:
        raise OrdersDatabaseError(f"cannot look up order {order}: connect to {dsn} failed") from e

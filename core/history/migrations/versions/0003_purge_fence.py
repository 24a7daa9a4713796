"""history_fence: the purge epoch that fences out flushes started before a purge.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``history_fence`` with its one row (``id = 1``, ``epoch = 0``).

    A purge increments ``epoch`` in the transaction that deletes the rows; a flush
    reads it before it reads the backlog and compares it inside each insert
    transaction, so a flush that stalled across a purge rolls back instead of
    writing the purged rows again (``core.history.store.insert_values``).
    """
    fence = op.create_table(
        "history_fence",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.bulk_insert(fence, [{"id": 1, "epoch": 0}])


def downgrade() -> None:
    """Drop ``history_fence``."""
    op.drop_table("history_fence")

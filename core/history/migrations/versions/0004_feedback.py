"""feedback: one 👍/👎 vote per user per answer.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``feedback``: ``(platform, tenant, message_id, user)`` is unique, so a
    user's second vote on an answer replaces the first (``core.history.feedback``).
    ``message_id`` is the id of the message the answer replied to, as in ``messages``
    (the answer itself is stored as ``<message_id>:answer``)."""
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=255), nullable=False),
        sa.Column("channel", sa.String(length=255), nullable=False),
        sa.Column("message_id", sa.String(length=255), nullable=False),
        sa.Column("user", sa.String(length=255), nullable=False),
        sa.Column("vote", sa.SmallInteger(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.UniqueConstraint("platform", "tenant", "message_id", "user", name="uq_feedback_vote"),
    )
    op.create_index("ix_feedback_tenant_user", "feedback", ["tenant", "user"])
    op.create_index("ix_feedback_ts", "feedback", ["ts"])


def downgrade() -> None:
    """Drop ``feedback``."""
    op.drop_index("ix_feedback_ts", table_name="feedback")
    op.drop_index("ix_feedback_tenant_user", table_name="feedback")
    op.drop_table("feedback")
